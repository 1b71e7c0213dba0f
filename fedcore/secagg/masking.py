"""The double-masking algebra of Bonawitz et al. 2017 (section 4), modulo 2^32.

A member u uploads  y_u = x_u + PRG(b_u) + sum_{v in N(u)} s(u,v) * PRG(s_uv)
with s(u,v) = +1 if u < v else -1, so pairwise masks cancel in the sum over
members that both uploaded. The server removes the self masks PRG(b_u) of
the members that uploaded and, for a neighbour v that dropped after sharing,
the survivors' pairwise masks toward v (which it can recompute once v's
secret key is reconstructed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedcore.secagg.crypto import add_masks, pair_sign


def mask_input(
    q: np.ndarray, *, me: str, self_seed: bytes, pair_seeds: Mapping[str, bytes]
) -> np.ndarray:
    """y = q + PRG(self_seed) + sum_v sign(me, v) PRG(pair_seed_v)  (mod 2^32).

    Masks in place when ``q`` is already a uint32 vector (the quantizer's fresh
    output, which no one else holds); the copy would cost as much as a mask.
    """
    y = np.asarray(q, dtype=np.uint32)
    terms = [(1, self_seed)] + [(pair_sign(me, v), seed) for v, seed in pair_seeds.items()]
    return add_masks(y, terms)


def remove_masks(
    total: np.ndarray,
    *,
    self_seeds: Iterable[bytes],
    dangling: Iterable[tuple[str, str, bytes]] = (),
) -> np.ndarray:
    """Strip self masks and the survivors' masks toward dropped neighbours, in place.

    ``dangling`` holds (survivor u, dropped v, seed s_uv): u added sign(u, v) PRG(s_uv),
    which has no partner in the sum because v never uploaded.
    """
    terms = [(-1, seed) for seed in self_seeds]
    terms += [(-pair_sign(u, v), seed) for u, v, seed in dangling]
    return add_masks(total, terms)
