"""The function's honest bounds on a decoded sum, and user-level releases within their target.

Issue 13 item 4 (server half): an unmasked sum is checked, before anything is committed,
against what the counted members' encoders can produce (codes, total weight, the mean's
L2 norm). Issue 14 item 2: under user-level DP the cohort's minimum is the survivor
count the noise is sized for, so no release's epsilon exceeds the config's target.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcore.dp.distributed import DistributedDP
from fedcore.secagg.protocol import SecAggParams
from fedcore.server import secure
from fedcore.server.formation import Formation, Waiting
from fedcore.server.settings import ServerSettings

SCHEMA = {"w": ("F32", (6, 5)), "b": ("F32", (5,))}
DIM = 35


def _codes(params: SecAggParams, deltas: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """The unmasked sum of honest members' [w*delta, w] codes (what secure aggregation reveals)."""
    q, rng = params.quantizer(), np.random.default_rng(0)
    total = np.zeros(DIM + 1, dtype=np.uint32)
    for d, w in zip(deltas, weights, strict=True):
        total += q.quantize(np.append(w * d, w), rng)[0]
    return total


@pytest.fixture
def honest() -> tuple[SecAggParams, np.ndarray, int]:
    params = SecAggParams.for_cohort(5, clip=1.0, weight_cap=100)
    rng = np.random.default_rng(1)
    deltas = [0.05 * rng.normal(size=DIM) for _ in range(4)]
    return params, _codes(params, deltas, [0.1, 0.2, 0.5, 1.0]), 4


def test_an_honest_sum_decodes(honest: tuple[SecAggParams, np.ndarray, int]) -> None:
    params, total, count = honest
    mean, weight = secure.decode_mean(total, params=params, count=count, schema=SCHEMA)
    assert weight == pytest.approx(1.8, abs=1e-6) and set(mean) == {"w", "b"}


def test_a_code_beyond_the_members_range_is_refused(
    honest: tuple[SecAggParams, np.ndarray, int],
) -> None:
    """GIVEN a member that adds count*levels to one coordinate of its codes THEN the sum
    exceeds [0, count*levels] and decoding refuses it (the cohort aborts, nothing applied)."""
    params, total, count = honest
    total[3] += np.uint32(count * params.quantizer().levels)
    with pytest.raises(secure.BoundsError, match="exceed 4 members' code range"):
        secure.decode_mean(total, params=params, count=count, schema=SCHEMA)


@pytest.mark.parametrize("weight", [-0.75, -0.29])
def test_a_negative_weight_that_amplifies_the_mean_is_refused(weight: float) -> None:
    """GIVEN three honest members of weight 0.1 and one declaring ``weight`` (in range for
    its quantizer) THEN the total weight is below count/cap (or not positive), which no
    honest members produce: refused. Without the check the mean would be scaled up by
    0.3 / (0.3 + weight): x30 at -0.29. (-0.2, x3, stays within the bound: the signed
    per-member weights of issue 13 item 4 close that.)"""
    params = SecAggParams.for_cohort(5, clip=1.0, weight_cap=100)
    rng = np.random.default_rng(2)
    deltas = [0.05 * rng.normal(size=DIM) for _ in range(4)]
    total = _codes(params, deltas, [0.1, 0.1, 0.1, weight])
    with pytest.raises(secure.BoundsError, match="decoded total weight"):
        secure.decode_mean(total, params=params, count=4, schema=SCHEMA)


def test_a_weight_above_count_is_refused() -> None:
    """GIVEN clip 2 (so weight 1 is not the top code) and a member declaring weight 2
    (its codes in range) THEN the total weight 3 exceeds count * 1: refused."""
    params = SecAggParams.for_cohort(5, clip=2.0, weight_cap=100)
    total = _codes(params, [np.zeros(DIM)] * 2, [1.0, 1.0])
    total[-1] += np.uint32(round(1.0 / params.quantizer().step))  # one more unit of weight
    with pytest.raises(secure.BoundsError, match="decoded total weight"):
        secure.decode_mean(total, params=params, count=2, schema=SCHEMA)


# -- user-level DP ---------------------------------------------------------------------


def _dp(n: int = 10, m: int = 9, z: float = 0.5) -> DistributedDP:
    return DistributedDP.for_cohort(clip=1.0, noise_multiplier=z, delta=1e-5, n=n, min_survivors=m)


def _dp_sum(dp: DistributedDP, deltas: list[np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng(3)
    total = np.zeros(deltas[0].size + 1, dtype=np.uint32)
    for d in deltas:
        total += dp.privatize(d, rng)[0]
    return total


def test_an_honest_dp_sum_decodes_within_its_bounds() -> None:
    dp, rng = _dp(), np.random.default_rng(4)
    deltas = [rng.normal(size=2000) for _ in range(9)]  # norms ~45: every one clipped to 1
    mean = dp.decode_checked(_dp_sum(dp, deltas), 9)
    assert mean.shape == (2000,)


def test_dp_codes_beyond_members_and_noise_are_refused() -> None:
    """GIVEN a member that adds 10 * levels to every code (a shift of 20C per coordinate,
    beyond count members' codes, +-count*C, plus 12 std of their noise, 6C here) THEN the
    sum is refused in the code domain."""
    dp, rng = _dp(), np.random.default_rng(5)
    total = _dp_sum(dp, [rng.normal(size=500) for _ in range(9)])
    total[:-1] += np.uint32(10 * dp.levels)
    with pytest.raises(ValueError, match="beyond what 9 members' codes"):
        dp.decode_checked(total, 9)


def test_dp_mean_beyond_the_clip_plus_noise_is_refused() -> None:
    """GIVEN a member whose codes are at the top of the range on every coordinate (each
    in range: +C per coordinate, an L2 shift of C*sqrt(d)/count) THEN the mean's L2 norm
    exceeds C plus rounding plus the noise's norm bound, and the sum is refused. The same
    member within its clip (norm C) passes."""
    dp, rng = _dp(), np.random.default_rng(6)
    deltas = [0.001 * rng.normal(size=20_000) for _ in range(9)]
    total = _dp_sum(dp, deltas)
    dp.decode_checked(total, 9)
    total[:-1] += np.uint32(dp.levels // 2)  # one member's codes +C on every coordinate
    with pytest.raises(ValueError, match="exceeds the honest bound"):
        dp.decode_checked(total, 9)


def test_dp_weight_slot_other_than_the_count_is_refused() -> None:
    dp = _dp()
    total = _dp_sum(dp, [np.zeros(DIM)] * 9)
    total[-1] += np.uint32(dp.weight_code)  # one member declared weight 2
    with pytest.raises(secure.BoundsError, match="weight slot"):
        secure.decode_dp_mean(total, dp=dp, count=9, schema=SCHEMA)


class _Cache:
    def identity(self, client: str) -> bytes:
        return bytes(32)


def _config(n: int, **settings: object):  # type: ignore[no-untyped-def]
    s = ServerSettings(
        cohort_size=max(n, 3), min_cohort_size=3, dp_user_noise=1.0, dp_user_clip=1.0,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip
    formation = Formation(None, _Cache(), s, metric=lambda *a: None, clock=lambda: 0.0)  # type: ignore[arg-type]
    chosen = [Waiting(f"c{i:03d}", "n", f"k{i}", 0.0) for i in range(n)]
    return formation.new_config("c-000001", 0, chosen, 0.0)


@pytest.mark.parametrize("n", [3, 4, 5, 10, 18, 31, 50, 100])
@pytest.mark.parametrize("dropout", [0.1, 0.3])
def test_no_release_exceeds_the_configured_per_release_epsilon(n: int, dropout: float) -> None:
    """GIVEN a user-level DP cohort of n formed by the function THEN its minimum is the
    survivor count the noise is sized for, and for every survivor count that can complete
    (minimum..n) the release's epsilon is at most the config's per-release target. One
    survivor fewer than the minimum would exceed it (the minimum is needed, not loose)."""
    cfg = _config(n, secagg_max_dropout=dropout)
    dp = cfg.dp
    assert dp is not None and cfg.min_members == dp.expected_survivors
    target = dp.target_epsilon(DIM)
    for s in range(cfg.min_members, n + 1):
        assert dp.release(s, DIM)["epsilon"] <= target + 1e-9, (n, s)
    if cfg.min_members > 1:
        assert dp.release(cfg.min_members - 1, DIM)["epsilon"] > target
    assert dp.release(n, DIM)["neighbouring"] == "zero-out"


def test_dp_plain_settings_keep_the_plain_minimum() -> None:
    """Without DP the minimum stays MIN_COHORT_SIZE (no behaviour change)."""
    s = ServerSettings(cohort_size=10, min_cohort_size=3)
    formation = Formation(None, _Cache(), s, metric=lambda *a: None, clock=lambda: 0.0)  # type: ignore[arg-type]
    chosen = [Waiting(f"c{i:03d}", "n", f"k{i}", 0.0) for i in range(10)]
    assert formation.new_config("c-000001", 0, chosen, 0.0).min_members == 3


def test_the_honest_bound_is_what_the_code_guarantees() -> None:
    """The documented L2 bound without DP: sqrt(d) * count * clip / W, reached by members
    whose every coordinate sits at the clip (so the check refuses no honest sum)."""
    params = SecAggParams.for_cohort(5, clip=1.0, weight_cap=100)
    total = _codes(params, [np.full(DIM, 1.0)] * 3, [1.0] * 3)
    mean, weight = secure.decode_mean(total, params=params, count=3, schema=SCHEMA)
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in mean.values()))
    assert norm == pytest.approx(math.sqrt(DIM) * 3 * 1.0 / weight, rel=1e-6)


@pytest.mark.parametrize("clip", [1.0, 4.0])
def test_a_members_weight_is_capped_whatever_it_declares(clip: float) -> None:
    """A member that declares ten times the cap weighs what one declaring the cap does (1):
    its declared count moves the weighted mean no further than an honest full shard. The
    clip on the weight slot alone would let it weigh up to ``clip`` when clip > 1."""
    p = SecAggParams(k=3, t=3, graph_seed="00", clip=clip, bits=30, weight_cap=100)
    assert p.weight(10 * p.weight_cap) == p.weight(p.weight_cap) == 1.0
    assert p.weight_code(10 * p.weight_cap) == p.weight_code(p.weight_cap)
    assert p.weight(1) == 1 / p.weight_cap
