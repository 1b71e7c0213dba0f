"""Fixed-point quantization with stochastic rounding and headroom for the sum.

Each coordinate x is clipped to [-clip, clip] and mapped to an integer
q in [0, 2^bits - 1] with step = 2*clip / (2^bits - 1), rounding up with
probability equal to the fractional part (so E[q] is exact up to 2^-24 of a
step, the resolution of the float32 uniforms). With
``bits = bits_for(n)`` the sum of n members' q is below 2^32 and never wraps,
so the modular sum that secure aggregation reveals *is* the integer sum.

Error bound (documented, and checked by property tests): for one member and
an unclipped coordinate, |dequantized - x| < step; for the sum of n members,
|decoded sum - true sum| < n * step, and the weighted mean's error is below
n * step / (sum of weights). With clip = 1 and n = 10 (bits = 28) the step is
7.5e-9. Values beyond the clip are clipped, which is counted and reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def bits_for(n: int) -> int:
    """The most bits per value such that n values of 2^bits - 1 sum below 2^32."""
    if n < 1:
        raise ValueError("need at least one member")
    bits = 32 - math.ceil(math.log2(n)) if n > 1 else 31
    if bits < 8:
        raise ValueError(f"a cohort of {n} leaves fewer than 8 bits per value")
    return bits


@dataclass(frozen=True)
class Quantizer:
    clip: float
    bits: int

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"clip must be positive and finite, got {self.clip}")
        if not 1 <= self.bits <= 31:
            raise ValueError(f"bits must be in [1, 31], got {self.bits}")

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def step(self) -> float:
        return 2.0 * self.clip / self.levels

    def quantize(
        self,
        x: np.ndarray,
        rng: np.random.Generator,
        *,
        in_place: bool = False,
        exact_last: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """(uint32 codes, number of clipped coordinates).

        ``exact_last``: the code of the last coordinate, given rather than rounded (a
        secure member's weight slot, ``SecAggParams.weight_code``, which the function
        checks exactly against the signed declarations); in [0, levels].

        Stochastic rounding as floor(s + u), u ~ U[0, 1): it rounds up with
        probability frac(s), like comparing u against frac(s), in two passes
        fewer. Working in place on one float64 buffer keeps this under a third
        of a device's masking cost at the real model size; ``in_place`` lets a
        caller that owns a float64 ``x`` skip even that buffer (``x`` is then
        overwritten).
        """
        x = np.asarray(x)
        if not np.isfinite(x).all():
            raise ValueError("cannot quantize NaN or infinity")
        clipped = int(np.count_nonzero(np.abs(x) > self.clip))
        if in_place and x.dtype == np.float64 and x.flags.writeable:
            s = np.clip(x, -self.clip, self.clip, out=x)
        else:
            s = np.clip(x, -self.clip, self.clip, dtype=np.float64)
        s += self.clip
        s *= 1.0 / self.step
        # float32 uniforms (twice as fast to draw) bias the rounding by < 2^-24 of a step.
        s += rng.random(s.shape, dtype=np.float32)
        np.floor(s, out=s)
        np.minimum(s, self.levels, out=s)  # guards s = levels + rounding error of the scale
        codes = s.astype(np.uint32)
        if exact_last is not None:
            if not 0 <= exact_last <= self.levels:
                raise ValueError(f"exact code {exact_last} outside [0, {self.levels}]")
            codes[-1] = exact_last
        return codes, clipped

    def dequantize_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """Float sum of ``count`` members' values from the (non-wrapping) sum of their codes."""
        return np.asarray(total, dtype=np.float64) * self.step - count * self.clip

    def sum_error_bound(self, count: int) -> float:
        return count * self.step
