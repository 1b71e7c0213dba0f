"""Rényi-DP accounting in pure Python, so the torch-free function can use it.

Mechanisms:

* the sampled Gaussian mechanism (DP-SGD; Mironov, Talwar and Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism", section 3),
  for integer and fractional orders; sampling rate 1 is the plain Gaussian;
* the multi-dimensional Skellam mechanism (Agarwal, Kairouz and Liu 2021,
  "The Skellam Mechanism for Differentially Private Federated Learning",
  theorem 3.5), for the distributed integer noise of user-level DP.

RDP composes by addition at each order; ``epsilon`` converts to (epsilon,
delta) with Balle et al. 2020's bound (the one Opacus uses), so a ledger here
and Opacus' ``RDPAccountant`` agree on the same Gaussian settings (tested to
1%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# The orders Opacus uses by default, so the optimal order is found on the same grid.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
INTEGER_ORDERS: tuple[float, ...] = tuple(float(a) for a in range(2, 64))


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    if a < b:
        raise ValueError("log of a negative number")
    if a == b:
        return -math.inf
    return a + math.log(-math.expm1(b - a))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), also where erfc underflows (x beyond about 26)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    # Asymptotic series: erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - ...)
    x2 = x * x
    return -x2 - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-0.5 / x2 + 0.75 / (x2 * x2))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log E[(mu_mix / mu_0)^alpha] for integer alpha: a finite binomial sum."""
    total = -math.inf
    for i in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
        term = log_coef + i * math.log(q) + (alpha - i) * math.log1p(-q)
        total = _log_add(total, term + (i * i - i) / (2 * sigma**2))
    return total


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """The same for fractional alpha: two alternating series split at z0 (section 3.3)."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    coef = 1.0  # generalized binomial coefficient C(alpha, i), built up term by term
    i = 0
    while True:
        j = alpha - i
        log_coef = math.log(abs(coef))
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30 or i > 10_000:
            return _log_add(log_a0, log_a1)
        coef *= (alpha - i) / (i + 1)
        i += 1


def sampled_gaussian(
    *, q: float, sigma: float, steps: int = 1, orders: Sequence[float] = ORDERS
) -> list[float]:
    """RDP at each order of ``steps`` compositions of the sampled Gaussian mechanism.

    ``sigma`` is the noise multiplier (noise std / L2 sensitivity); ``q`` the
    Poisson sampling rate (1: no sampling).
    """
    if not 0 <= q <= 1 or sigma < 0 or steps < 0:
        raise ValueError(f"need 0 <= q <= 1, sigma >= 0, steps >= 0 (q={q}, sigma={sigma})")
    out = []
    for a in orders:
        if q == 0:
            rdp = 0.0
        elif sigma == 0:
            rdp = math.inf
        elif q == 1.0:
            rdp = a / (2 * sigma**2)
        elif float(a).is_integer():
            rdp = _log_a_int(q, sigma, int(a)) / (a - 1)
        else:
            rdp = _log_a_frac(q, sigma, a) / (a - 1)
        out.append(rdp * steps)
    return out


def skellam(
    *, variance: float, l2: float, l1: float, orders: Sequence[float] = INTEGER_ORDERS
) -> list[float]:
    """RDP of adding symmetric Skellam noise of total ``variance`` to an integer vector
    whose sensitivity is ``l2`` (L2 norm) and ``l1`` (L1 norm), in integer units.

    The first term is the Gaussian's alpha * l2^2 / (2 variance); the second is
    the price of discreteness, which vanishes as the variance grows. Stated for
    integer orders only.

    User-level releases stay on this RDP bound: ``dp_accounting``'s PLD accountant,
    which DP-SGD uses (``fedcore.dp.pld``), has no event for the distributed,
    multi-dimensional Skellam mechanism.
    """
    if variance <= 0:
        return [math.inf for _ in orders]
    out = []
    for a in orders:
        if not float(a).is_integer() or a < 2:
            raise ValueError("the Skellam bound is stated for integer orders >= 2")
        gauss = a * l2**2 / (2 * variance)
        extra = min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * variance**2), 3 * l1 / (2 * variance))
        out.append(gauss + extra)
    return out


def epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) for ``delta`` (Balle et al. 2020, theorem 21)."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best = (math.inf, math.nan)
    for a, r in zip(orders, rdp, strict=True):
        if a <= 1 or math.isinf(r) or math.isnan(r):
            continue
        eps = r - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        if eps < best[0]:
            best = (eps, a)
    return (max(0.0, best[0]), best[1])


@dataclass
class Ledger:
    """RDP spent so far at fixed orders; composition is addition.

    Kept as plain lists so a device can persist it as JSON across restarts.
    """

    orders: list[float] = field(default_factory=lambda: list(INTEGER_ORDERS))
    rdp: list[float] = field(default_factory=list)
    events: int = 0

    def __post_init__(self) -> None:
        if not self.rdp:
            self.rdp = [0.0] * len(self.orders)
        if len(self.rdp) != len(self.orders):
            raise ValueError("rdp and orders differ in length")

    def plus(self, rdp: Sequence[float]) -> Ledger:
        return Ledger(
            list(self.orders), [a + b for a, b in zip(self.rdp, rdp, strict=True)], self.events + 1
        )

    def epsilon(self, delta: float) -> float:
        return epsilon(self.orders, self.rdp, delta)[0]
