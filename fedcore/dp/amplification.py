"""Amplification by sampling that the devices control: random check-ins of the update.

SECURITY first. The amplified epsilon holds only while nobody learns a member's coin:

* the coin comes from the OS CSPRNG (``draw_checkin``: ``os.urandom``), never from
  ``--seed`` or any generator a seed reaches; a coin anyone can replay is no coin;
* the coin is drawn after the cohort's membership is fixed (when the member trains), so
  the server cannot form or fill cohorts by it;
* the member behaves the same on both sides of the coin: it trains either way (training
  time is visible), uploads a masked input with weight slot 1 either way, reveals its
  shares either way, and books the same (amplified) spend either way, so even the time it
  stops joining, when its budget runs out, does not depend on its coins;
* only the cohort's noisy sum is ever unmasked: the secure-aggregation assumption the
  user-level guarantee already rests on (fewer than t of a member's share holders collude
  with the server). A plaintext cohort shows the update itself, so ``booked_rate`` never
  grants amplification there.

The mechanism. A member of a cohort with user-level distributed DP
(``fedcore.dp.distributed``) draws its own coin with probability ``p`` when it trains:
heads, its clipped, noised update enters the masked sum as before; tails, it uploads
zeros (clipped, noised and masked like any update). Its noise share goes in either way,
so the sum's noise and the published survivor count do not depend on the coin. For the
zero-out neighbouring relation that the releases are stated for (one user's delta
replaced by zeros), the release given everything before it is then exactly

    with the user's delta: (1 - p) * M(0) + p * M(x)     without it: M(0)

with M the Skellam release and the other members' inputs the same on both sides: the
Poisson-subsampled mechanism at rate p, its coin independent across releases. Its RDP at
integer order alpha is bounded, for any base mechanism of RDP eps(.) and in both
directions, by Zhu and Wang 2019 ("Poisson Subsampled Rényi Differential Privacy", ICML,
theorem 6, the general upper bound):

    eps'(alpha) <= 1/(alpha-1) * log( (1-p)^(alpha-1) * (alpha*p - p + 1)
                     + C(alpha,2) p^2 (1-p)^(alpha-2) e^eps(2)
                     + 3 * sum_{l=3..alpha} C(alpha,l) p^l (1-p)^(alpha-l) e^((l-1) eps(l)) )

and by eps(alpha) itself (Rényi divergence is jointly quasi-convex), so
``poisson_subsampled`` takes the smaller at each order. With the factor 3 replaced by 1
and eps(l) = l / (2 sigma^2) the sum is Mironov, Talwar and Zhang's exact RDP of the
sampled Gaussian at integer orders; the tests check the bound against it and against
``dp_accounting``'s PLD of the Poisson-sampled Gaussian.

Why not Balle et al.'s random check-ins in time (Balle, Kairouz, McMahan, Thakkar and
Thakurta 2020, "Privacy Amplification via Random Check-Ins"): their theorems are for
epsilon0-DP local randomizers, one update per slot (or an average of such updates), with
a server that processes the slots the devices chose and hides who checked in. Here no
member's update is DP on its own (the noise is distributed over the cohort), cohorts
are formed first-come at a fixed size (a check-in skipped by one device moves others into
other cohorts, so membership is not independent across releases), and each config names
its members. docs/design-notes.md (issue 14, amplification) has the long form.

Torch-free and ``dp_accounting``-free: the device's ledger uses it; the aggregation
function never needs it (the coin is the devices' business).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

from fedcore.dp.rdp import INTEGER_ORDERS

MECHANISM = "random-check-in"  # the name a device's log and privacy.json use
_BITS = 53  # a double's mantissa: p * 2^53 is exact, so the threshold is floor(p * 2^53)


def draw_checkin(p: float, *, entropy: Callable[[int], bytes] = os.urandom) -> bool:
    """This member's coin for one release: True (its update goes in) with probability
    floor(p * 2^53) / 2^53, at most ``p``, from 53 bits of ``entropy`` (the OS CSPRNG).

    ``entropy`` is injectable for tests only; a device never passes anything seeded.
    Raises ``ValueError`` unless 0 <= p <= 1.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"need 0 <= p <= 1 (got {p})")
    draw = int.from_bytes(entropy(8), "big") >> (64 - _BITS)
    return draw < math.floor(p * 2**_BITS)


def booked_rate(p: float, *, secure: bool, distributed_dp: bool) -> float:
    """The sampling rate a device may book a release at: ``p`` where its coin is hidden
    (a secure-aggregation cohort whose release is the distributed-DP noisy sum), else
    1.0 (no amplification: a plaintext upload shows the update, and without distributed
    DP there is no release to amplify).

    Raises ``ValueError`` unless 0 < p <= 1 (p = 0 would never contribute anything).
    """
    if not 0 < p <= 1:
        raise ValueError(f"the check-in probability must be in (0, 1] (got {p})")
    return p if secure and distributed_dp else 1.0


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_sum(terms: Sequence[float]) -> float:
    top = max(terms)
    if top == math.inf or top == -math.inf:
        return top
    return top + math.log(sum(math.exp(t - top) for t in terms))


def poisson_subsampled(
    *, rdp: Sequence[float], orders: Sequence[float], q: float, factor: float = 3.0
) -> list[float]:
    """RDP at each of ``orders`` of a mechanism of RDP ``rdp`` whose input is included
    with probability ``q`` (Zhu and Wang 2019, theorem 6; see the module docstring), each
    order capped by the mechanism's own RDP.

    ``orders`` must be integers >= 2 and include every integer from 2 up to each order
    (the bound at alpha reads eps(2) ... eps(alpha)): ``rdp.INTEGER_ORDERS`` does.
    ``factor`` is the theorem's 3; only a test passes 1 (the Gaussian's exact sum).
    q = 1: ``rdp`` unchanged; q = 0: zeros. Raises ``ValueError`` otherwise.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"need 0 <= q <= 1 (got {q})")
    if len(rdp) != len(orders):
        raise ValueError("rdp and orders differ in length")
    at: dict[int, float] = {}
    for a, r in zip(orders, rdp, strict=True):
        if not float(a).is_integer() or a < 2:
            raise ValueError(f"the bound is stated for integer orders >= 2 (got {a})")
        at[int(a)] = float(r)
    if q == 1:
        return [float(r) for r in rdp]
    if q == 0:
        return [0.0] * len(rdp)
    log_q, log_1q = math.log(q), math.log1p(-q)
    out = []
    for a, base in zip(orders, rdp, strict=True):
        alpha = int(a)
        if any(ell not in at for ell in range(2, alpha + 1)):
            raise ValueError(f"order {alpha} needs every integer order from 2 to {alpha}")
        terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q)]
        for ell in range(2, alpha + 1):
            weight = 0.0 if ell == 2 else math.log(factor)
            terms.append(
                weight + _log_comb(alpha, ell) + ell * log_q + (alpha - ell) * log_1q
                + (ell - 1) * at[ell]
            )  # fmt: skip
        out.append(min(float(base), _log_sum(terms) / (alpha - 1)))
    return out


def booked_rdp(worst: Sequence[float], rate: float) -> list[float]:
    """What a device books for a user-level release: its worst-case RDP (on
    ``rdp.INTEGER_ORDERS``, as ``DistributedDP.worst_case_rdp`` gives it) amplified at
    check-in ``rate`` (``booked_rate``; 1.0: unchanged). The device and the DP benchmark
    both call this, so the benchmark's epsilons are the devices'."""
    if rate >= 1:
        return list(worst)
    return poisson_subsampled(rdp=worst, orders=INTEGER_ORDERS, q=rate)
