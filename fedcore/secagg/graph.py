"""SecAgg+'s sparse neighbour graph (Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", section 3).

Members are placed on a ring in a pseudo-random order derived from the
cohort's public ``graph_seed``, and each is joined to its k/2 nearest members
on either side (a Harary graph). Masks and shares exist only along edges, so
each device's work is O(k) instead of O(n). k >= n - 1 gives the original
all-pairs protocol. The graph is public: the server and every member compute
the same one from the config.
"""

from __future__ import annotations

import hashlib
import math

# Chance, per cohort, that some member keeps fewer than t live neighbours and
# the cohort must abort, at the configured dropout rate.
ABORT_PROBABILITY = 1e-6


def default_degree(n: int, max_dropout: float = 0.1, colluders: int | None = None) -> int:
    """The smallest even k >= 2 * ceil(log2 n) that survives ``max_dropout``.

    Unmasking member v needs t (see ``default_threshold``) of v's k neighbours alive. With each
    member dropping independently with probability ``max_dropout``, k is the
    least degree for which n * P(Binomial(k, 1 - max_dropout) < t) is at most
    ``ABORT_PROBABILITY``. For a fixed rate k still grows as O(log n), but the
    constant matters: at 10% dropouts k is 38 for n = 100 and 42 for n = 1000;
    at 30% a cohort of 100 needs all pairs (k = 99). Capped at n - 1.
    """
    if n <= 1:
        return 0
    if not 0.0 <= max_dropout < 0.5:
        raise ValueError("max_dropout must be in [0, 0.5): t > k/2 needs a live majority")
    k = 2 * math.ceil(math.log2(n))
    c = COLLUDERS if colluders is None else colluders
    while k < n - 1 and n * _too_few_alive(k, 1.0 - max_dropout, c) > ABORT_PROBABILITY:
        k += 2
    return min(n - 1, k)


def _too_few_alive(k: int, p_alive: float, colluders: int) -> float:
    """P(Binomial(k, p_alive) < t): too few live neighbours (the member's own share of its
    seed is not counted, so this also covers the key of a member that dropped)."""
    t = default_threshold(k, colluders)
    return sum(math.comb(k, i) * p_alive**i * (1 - p_alive) ** (k - i) for i in range(t))


# Share holders of a member (its neighbours) that may collude with a malicious server.
# One is the least that makes the model "server plus a member" (Bell et al. 2020) rather
# than "server alone"; each one costs half a dropout of tolerance (``default_threshold``).
COLLUDERS = 1


def default_threshold(k: int, colluders: int = COLLUDERS) -> int:
    """t = floor((k + 1 + c) / 2) + 1, at most k + 1: more than half of a member's k + 1
    share holders even after ``c`` of them side with the server.

    Each member holds a share of its own secrets besides its k neighbours (as in
    Bonawitz et al.'s all-pairs protocol). Honest holders reveal one kind of share per
    member, so a server showing some holders a U3 with the victim and others one
    without it collects t of each kind only if ``2 (t - c) <= k + 1 - c``: colluders
    give both kinds. A strict majority (c = 0) stops the server alone, and
    ``tests/adversary/test_consistency.py`` reconstructed a victim at n = 12, k = 8,
    t = 5 with one colluding neighbour; t > (k + 1 + c) / 2 stops it. The price is
    dropout tolerance: a cohort of 5 (k = 4) survives one dropout, not two.
    """
    return min(k + 1, (k + 1 + colluders) // 2 + 1)


def neighbours(members: list[str], *, k: int, seed: bytes) -> dict[str, set[str]]:
    n = len(members)
    if len(set(members)) != n:
        raise ValueError("duplicate member ids")
    if k >= n - 1:
        return {m: set(members) - {m} for m in members}
    if k < 1:
        raise ValueError(f"degree {k} must be at least 1")
    half = math.ceil(k / 2)
    ring = sorted(members, key=lambda m: hashlib.sha256(seed + m.encode()).digest())
    out: dict[str, set[str]] = {m: set() for m in members}
    for i, m in enumerate(ring):
        for d in range(1, half + 1):
            for peer in (ring[(i + d) % n], ring[(i - d) % n]):
                out[m].add(peer)
                out[peer].add(m)
    return out
