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


def default_degree(n: int) -> int:
    """An even k = O(log n): 2 * ceil(log2 n), capped at n - 1."""
    if n <= 1:
        return 0
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def default_threshold(k: int) -> int:
    """t = floor(k/2) + 1: a majority of a member's neighbours must cooperate to unmask it."""
    return k // 2 + 1


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
