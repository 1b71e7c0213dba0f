"""User-level distributed DP: every member adds a share of Skellam noise in the
integer domain, before masking, so that only the noisy cohort sum ever exists.

Per member: clip the model delta to L2 norm ``clip`` (C), quantize it with
the cohort's fixed-point code (step 2C / (2^bits - 1), stochastic rounding),
then add symmetric Skellam noise (Poisson - Poisson) of variance
``(z * C * scale)^2 / m`` per coordinate, where ``scale`` = 1 / step is the
integer units per real unit and m = ``expected_survivors``. Skellam is closed
under addition, so any s >= m survivors' noises sum to Skellam noise of
variance s/m times the target: the sum always carries at least noise std z*C
(the DP-FedAvg calibration of McMahan et al. 2018), and the release's epsilon
is computed from the variance actually present (``release``). Fewer than m
survivors would carry less noise than the config promises, so the cohort's
minimum is m (``fedcore.server.formation``): such a cohort aborts and
releases nothing, and every release's epsilon is at most ``target_epsilon``.

Neighbouring relation: **zero-out**. The weight slot carries no noise and the
survivor count is published with every release, so the guarantee is between
two cohorts that differ in one user's delta being replaced by zeros, not in
whether that user took part (add/remove).

The noise comes from a Philox generator keyed with 256 bits from the OS
(``secure_generator``): cryptographically seeded, never numpy's default seed.
Decoding is centred: the modular sum is read as a signed offset from the sum
of the members' mid-range codes, so noise that pushes a coordinate below zero
or above the code range does not wrap. ``bits`` leaves room for 12 standard
deviations of the largest noise the cohort can carry, and puts the target
noise at about 2^16 code units: the step is then far below the noise, so the
code's precision costs nothing, and the Poisson rates stay moderate.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedcore.dp import rdp
from fedcore.errors import IntegrityError
from fedcore.secagg.quantize import Quantizer

MECHANISM = "skellam"
TAIL_SIGMAS = 12  # headroom, in noise standard deviations, against wrapping mod 2^32
NOISE_STD_UNITS = 2**16  # the target noise's standard deviation, in integer code units
# What a release's (epsilon, delta) is between: one user's delta replaced by zeros. Not
# add/remove: the weight slot (the survivor count) is published without noise.
NEIGHBOURING = "zero-out"


@dataclass(frozen=True)
class DistributedDP:
    """Fixed in the cohort config; members and the function derive the same numbers.

    Each release is (epsilon, delta)-DP for **zero-out** neighbours (one user's
    delta replaced by zeros; the survivor count is public), with epsilon at most
    ``target_epsilon`` as long as at least ``expected_survivors`` members survive,
    which the cohort's minimum enforces.
    """

    clip: float  # C: L2 bound of each member's delta
    noise_multiplier: float  # z: the sum carries noise std z * C per coordinate
    delta: float
    members: int  # n, the cohort size
    expected_survivors: int  # m: noise is sized so that m survivors reach the target
    bits: int

    @classmethod
    def for_cohort(
        cls, *, clip: float, noise_multiplier: float, delta: float, n: int, min_survivors: int
    ) -> DistributedDP:
        if not (clip > 0 and noise_multiplier > 0 and 0 < delta < 1 and 1 <= min_survivors <= n):
            raise ValueError("need clip > 0, noise_multiplier > 0, 0 < delta < 1, 1 <= m <= n")
        # Window: n members' codes deviate from their mid-range by at most n * 2^(bits-1);
        # the noise of up to n survivors has std z * 2^(bits-1) * sqrt(n / m).
        spread = n + TAIL_SIGMAS * noise_multiplier * math.sqrt(n / min_survivors)
        room = 32 - math.ceil(math.log2(spread))
        # Finer codes buy nothing once the noise dwarfs the step: aim the target noise at
        # NOISE_STD_UNITS integer units (discreteness then costs < 1e-3 in RDP, and the
        # Poisson rate stays where numpy's sampler is exact; at 1e14 its variance was 3% off).
        bits = min(room, 1 + round(math.log2(NOISE_STD_UNITS / noise_multiplier)))
        if bits < 8:
            raise ValueError(f"noise multiplier {noise_multiplier} leaves fewer than 8 bits")
        return cls(clip, noise_multiplier, delta, n, min_survivors, bits)

    @classmethod
    def from_dict(cls, doc: Any, *, where: str) -> DistributedDP:
        try:
            if doc["mechanism"] != MECHANISM:
                raise ValueError(f"unknown mechanism {doc['mechanism']!r}")
            out = cls(
                clip=float(doc["clip"]),
                noise_multiplier=float(doc["noise_multiplier"]),
                delta=float(doc["delta"]),
                members=int(doc["members"]),
                expected_survivors=int(doc["expected_survivors"]),
                bits=int(doc["bits"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IntegrityError(f"{where}: bad dp parameters: {exc}") from None
        if not (out.clip > 0 and out.noise_multiplier > 0 and 8 <= out.bits <= 31):
            raise IntegrityError(f"{where}: invalid dp parameters {out}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": MECHANISM, **asdict(self)}

    # -- the integer code (the secure-aggregation quantizer, range [-C, C]) ----------
    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, bits=self.bits)

    @property
    def levels(self) -> int:
        return self.quantizer.levels

    @property
    def step(self) -> float:
        return self.quantizer.step

    @property
    def weight_code(self) -> int:
        """The code of 1.0, each member's weight slot: the slots sum to the survivor count."""
        return round((1.0 + self.clip) / self.step)

    @property
    def member_variance(self) -> float:
        """Skellam variance each member adds per coordinate, in integer units."""
        return (self.noise_multiplier * self.clip / self.step) ** 2 / self.expected_survivors

    def sensitivity(self, dim: int) -> tuple[float, float]:
        """(L2, L1) sensitivity of the sum in integer units for one member added or removed.

        Stochastic rounding moves each coordinate by less than one unit, so the
        quantized vector's L2 norm is below C / step + sqrt(dim).
        """
        l2 = self.clip / self.step + math.sqrt(dim)
        return l2, min(l2 * l2, math.sqrt(dim) * l2)

    # -- device side --------------------------------------------------------------
    def privatize(self, delta: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
        """Codes of [clip(delta), 1] with this member's noise on the delta part.

        Returns the uint32 codes and the delta's L2 norm before clipping.
        """
        x = np.asarray(delta, dtype=np.float64).ravel()
        if not np.isfinite(x).all():
            raise ValueError("cannot privatize NaN or infinity")
        norm = float(np.linalg.norm(x))
        if norm > self.clip:
            x = x * (self.clip / norm)
        codes = self.quantizer.quantize(x, rng)[0].astype(np.int64)
        codes += skellam_noise(codes.size, self.member_variance, rng)
        out = np.empty(codes.size + 1, dtype=np.uint32)
        out[:-1] = np.mod(codes, 2**32).astype(np.uint32)
        out[-1] = self.weight_code
        return out, norm

    # -- function side -------------------------------------------------------------
    def decode_sum(self, total: np.ndarray, count: int) -> np.ndarray:
        """The noisy float sum of ``count`` members' clipped deltas (the weight slot dropped)."""
        centre = np.uint32((count * self.levels // 2) % 2**32)
        offset = (np.asarray(total[:-1], dtype=np.uint32) - centre).view(np.int32)
        codes = float(count * self.levels // 2) + offset.astype(np.float64)
        return codes * self.step - count * self.clip

    def decode_checked(self, total: np.ndarray, count: int) -> np.ndarray:
        """The noisy mean of ``count`` members' clipped deltas, if honest members could
        have produced ``total``; ValueError (the cohort aborts) otherwise.

        Honest bounds: each member's codes lie in [0, levels] before its noise, so the
        sum's offset from the centre is at most ``count * levels / 2`` plus the noise,
        which we allow ``TAIL_SIGMAS`` standard deviations of the ``count`` survivors'
        Skellam sum. The mean of deltas each clipped to C has L2 norm at most C; with
        stochastic rounding (< 1 step per coordinate) and the noise of the mean (std
        sigma per coordinate, norm at most sigma * (sqrt(d) + TAIL_SIGMAS) but with
        probability about exp(-TAIL_SIGMAS^2 / 2)), the released mean's L2 norm is at
        most C + step * sqrt(d) + sigma * (sqrt(d) + TAIL_SIGMAS).
        """
        centre = count * self.levels // 2
        offset = (np.asarray(total[:-1], dtype=np.uint32) - np.uint32(centre % 2**32)).view(
            np.int32
        )
        noise_std = math.sqrt(count * self.member_variance)  # integer code units
        limit = count * self.levels / 2 + 1 + TAIL_SIGMAS * noise_std
        if (over := int(np.count_nonzero(np.abs(offset.astype(np.int64)) > limit))) > 0:
            raise ValueError(
                f"{over} coordinates of the sum lie beyond what {count} members' codes "
                f"and noise can produce (|offset| <= {limit:.6g} code units)"
            )
        mean = self.decode_sum(total, count) / count
        dim = mean.size
        sigma = noise_std * self.step / count
        bound = self.clip + self.step * math.sqrt(dim) + sigma * (math.sqrt(dim) + TAIL_SIGMAS)
        norm = float(np.linalg.norm(mean))
        if not norm <= bound:
            raise ValueError(
                f"mean update's L2 norm {norm:.6g} exceeds the honest bound {bound:.6g} "
                f"(clip {self.clip} plus rounding and noise)"
            )
        return mean

    def target_epsilon(self, dim: int) -> float:
        """The per-release epsilon the config promises: the one at ``expected_survivors``.

        Formation sets the cohort's minimum to ``expected_survivors``, so every
        release has at least that much noise and an epsilon at most this.
        """
        return float(self.release(self.expected_survivors, dim)["epsilon"])

    def release(self, survivors: int, dim: int) -> dict[str, Any]:
        """The guarantee of one cohort sum with ``survivors`` members' noise in it.

        Zero-out neighbours: the weight slot carries no noise and the survivor count
        is published, so the (epsilon, delta) holds between cohorts that differ in one
        user's delta replaced by zeros, not in that user's presence.
        """
        variance = survivors * self.member_variance
        l2, l1 = self.sensitivity(dim)
        orders = rdp.INTEGER_ORDERS
        curve = rdp.skellam(variance=variance, l2=l2, l1=l1, orders=orders)
        eps, order = rdp.epsilon(orders, curve, self.delta)
        return {
            "mechanism": MECHANISM,
            "neighbouring": NEIGHBOURING,
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "effective_noise_multiplier": math.sqrt(variance) * self.step / self.clip,
            "survivors": survivors,
            "expected_survivors": self.expected_survivors,
            "delta": self.delta,
            "epsilon": eps,
            "order": order,
            "rdp_orders": list(orders),
            "rdp": curve,
        }

    def worst_case_rdp(self, min_members: int, dim: int) -> list[float]:
        """RDP of a release this member joins, assuming only ``min_members`` survive."""
        l2, l1 = self.sensitivity(dim)
        return rdp.skellam(
            variance=min_members * self.member_variance, l2=l2, l1=l1, orders=rdp.INTEGER_ORDERS
        )


def secure_generator() -> np.random.Generator:
    """numpy's Philox keyed with 256 bits from the OS CSPRNG (a fresh key per call)."""
    key = int.from_bytes(os.urandom(16), "little")
    counter = int.from_bytes(os.urandom(32), "little")
    return np.random.Generator(np.random.Philox(key=key, counter=counter))


def skellam_noise(size: int, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Symmetric Skellam samples: Poisson(v/2) - Poisson(v/2), variance v."""
    lam = variance / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)
