"""Server optimizers (fedcore/server/optimizers.py): the algebra, on random inputs.

The references below are written the plain way (per element, float64, straight from
Reddi et al. 2021 Algorithm 2 and Hsu et al. 2019), so that a vectorization or dtype
slip in the module shows up as a mismatch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.server.apply import staleness_weight
from fedcore.server.optimizers import (
    OptimizerConfig,
    ServerOptimizer,
    all_finite,
    check_state,
    init_state,
    step,
)

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}
ADAPTIVE = [ServerOptimizer.FEDADAM, ServerOptimizer.FEDYOGI, ServerOptimizer.FEDADAGRAD]

seeds = st.integers(0, 2**32 - 1)
lrs = st.floats(1e-3, 3.0)
decays = st.floats(0.0, 0.999)
staleness = st.integers(0, 20)


def random_tensors(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def reference_adaptive(
    kind: ServerOptimizer,
    cfg: OptimizerConfig,
    x0: dict[str, np.ndarray],
    grads: list[tuple[float, dict[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """Algorithm 2 of Reddi et al., one scalar at a time, with float32 rounding of x, m
    and v between steps (as the state lives in float32 objects between versions)."""
    out = {}
    for k, a in x0.items():
        flat_x = [float(v) for v in a.ravel()]
        m = [0.0] * len(flat_x)
        v = [0.0] * len(flat_x)
        for w, g_all in grads:
            for i, d in enumerate(g_all[k].ravel()):
                g = w * float(d)
                mi = cfg.beta1 * m[i] + (1 - cfg.beta1) * g
                if kind is ServerOptimizer.FEDADAGRAD:
                    vi = v[i] + g * g
                elif kind is ServerOptimizer.FEDADAM:
                    vi = cfg.beta2 * v[i] + (1 - cfg.beta2) * g * g
                else:
                    sign = (v[i] - g * g > 0) - (v[i] - g * g < 0)
                    vi = v[i] - (1 - cfg.beta2) * g * g * sign
                xi = flat_x[i] + cfg.lr * mi / (math.sqrt(vi) + cfg.tau)
                flat_x[i] = float(np.float32(xi))
                m[i], v[i] = float(np.float32(mi)), float(np.float32(vi))
        out[k] = np.array(flat_x, np.float32).reshape(a.shape)
    return out


@settings(max_examples=60, deadline=None)
@given(seed=seeds, lr=lrs, s=staleness, rule=st.sampled_from(["inverse_sqrt", "inverse"]))
def test_fedavg_is_todays_apply_bit_for_bit(seed: int, lr: float, s: int, rule: str) -> None:
    """GIVEN params, a mean delta, a server lr and a staleness WHEN FedAvg steps THEN the
    result is exactly ``current + float32(server_lr * w(s)) * mean_delta`` (the plain
    apply's formula), and FedAvg keeps no state."""
    rng = np.random.default_rng(seed)
    params, delta = random_tensors(rng), random_tensors(rng, 0.1)
    sw = staleness_weight(s, rule)
    cfg = OptimizerConfig(ServerOptimizer.FEDAVG, lr=lr)
    new, state = step(cfg, params, delta, init_state(cfg.kind, params), weight=sw)
    today = {k: (params[k] + np.float32(lr * sw) * delta[k]).astype(np.float32) for k in params}
    assert state == {}
    for k in params:
        assert new[k].dtype == np.float32
        assert np.array_equal(new[k], today[k]), k


@settings(max_examples=60, deadline=None)
@given(seed=seeds, lr=lrs, s=staleness, steps=st.integers(1, 4))
def test_fedavgm_without_momentum_is_fedavg(seed: int, lr: float, s: int, steps: int) -> None:
    """GIVEN momentum 0 WHEN FedAvgM and FedAvg step through the same deltas THEN they agree:
    bit for bit at lr 1, to float32 rounding at any other lr."""
    rng = np.random.default_rng(seed)
    sw = staleness_weight(s)
    for rate in (1.0, lr):
        avg = OptimizerConfig(ServerOptimizer.FEDAVG, lr=rate)
        avgm = OptimizerConfig(ServerOptimizer.FEDAVGM, lr=rate, momentum=0.0)
        x = y = random_tensors(rng)
        state = init_state(avgm.kind, y)
        for _ in range(steps):
            delta = random_tensors(rng, 0.1)
            x, _ = step(avg, x, delta, {}, weight=sw)
            y, state = step(avgm, y, delta, state, weight=sw)
        for k in x:
            if rate == 1.0:
                assert np.array_equal(x[k], y[k]), k
            else:
                np.testing.assert_allclose(y[k], x[k], rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, lr=lrs, momentum=decays, steps=st.integers(1, 5))
def test_fedavgm_matches_heavy_ball(seed: int, lr: float, momentum: float, steps: int) -> None:
    """GIVEN a sequence of staleness-weighted deltas WHEN FedAvgM steps THEN its params follow
    ``m <- beta m + w g; x <- x + lr m`` (Hsu et al. 2019) from m = 0, and its state is m."""
    rng = np.random.default_rng(seed)
    cfg = OptimizerConfig(ServerOptimizer.FEDAVGM, lr=lr, momentum=momentum)
    x = random_tensors(rng)
    ref_x = {k: a.astype(np.float64) for k, a in x.items()}
    ref_m = {k: np.zeros(a.shape) for k, a in x.items()}
    state = init_state(cfg.kind, x)
    for t in range(steps):
        delta, w = random_tensors(rng, 0.1), staleness_weight(t % 3)
        x, state = step(cfg, x, delta, state, weight=w)
        for k in x:
            ref_m[k] = momentum * ref_m[k] + w * delta[k].astype(np.float64)
            ref_x[k] = ref_x[k] + lr * ref_m[k]
    for k in x:
        np.testing.assert_allclose(x[k], ref_x[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state["m"][k], ref_m[k], rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    kind=st.sampled_from(ADAPTIVE),
    lr=st.floats(1e-3, 0.5),
    beta1=decays,
    beta2=st.floats(0.5, 0.999),
    tau=st.floats(1e-4, 1e-1),
    steps=st.integers(1, 4),
)
def test_adaptive_rules_match_algorithm_2(
    seed: int,
    kind: ServerOptimizer,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    steps: int,
) -> None:
    """GIVEN random params and deltas WHEN FedAdam, FedYogi or FedAdagrad step a few times
    THEN the params equal a per-element reference of Reddi et al. 2021, Algorithm 2."""
    rng = np.random.default_rng(seed)
    cfg = OptimizerConfig(kind, lr=lr, beta1=beta1, beta2=beta2, tau=tau)
    x0 = random_tensors(rng)
    grads = [(staleness_weight(t), random_tensors(rng, 0.1)) for t in range(steps)]
    x, state = x0, init_state(kind, x0)
    for w, g in grads:
        x, state = step(cfg, x, g, state, weight=w)
    ref = reference_adaptive(kind, cfg, x0, grads)
    for k in x:
        np.testing.assert_allclose(x[k], ref[k], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, kind=st.sampled_from(list(ServerOptimizer)))
def test_state_has_the_rules_slots_shaped_like_params(seed: int, kind: ServerOptimizer) -> None:
    """GIVEN any rule WHEN it steps THEN its state has exactly its slots, each a float32
    tensor per parameter with the parameter's shape, and the inputs are left unchanged."""
    rng = np.random.default_rng(seed)
    params, delta = random_tensors(rng), random_tensors(rng, 0.1)
    before = {k: a.copy() for k, a in params.items()}
    state0 = init_state(kind, params)
    assert all(not a.any() for slot in state0.values() for a in slot.values())
    _, state = step(OptimizerConfig(kind, lr=0.1), params, delta, state0)
    check_state(kind, params, state)
    assert set(state) == set(kind.slots)
    for slot in state.values():
        for k, a in slot.items():
            assert a.shape == params[k].shape and a.dtype == np.float32
    assert all(np.array_equal(params[k], before[k]) for k in params)
    assert all(not a.any() for slot in state0.values() for a in slot.values())


def test_state_of_another_rule_or_shape_is_refused() -> None:
    params = {"w": np.zeros((2, 2), np.float32)}
    delta = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match="keeps slots"):
        step(OptimizerConfig(ServerOptimizer.FEDADAM), params, delta, {"m": params})
    with pytest.raises(ValueError, match="shape"):
        step(
            OptimizerConfig(ServerOptimizer.FEDAVGM),
            params,
            delta,
            {"m": {"w": np.zeros(4, np.float32)}},
        )
    with pytest.raises(ValueError, match="delta names"):
        step(OptimizerConfig(), params, {"x": delta["w"]}, {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be finite and positive"),
        ({"lr": math.inf}, "lr must be finite and positive"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"beta1": -0.1}, "beta1 must be in"),
        ({"beta2": 1.0}, "beta2 must be in"),
        ({"tau": 0.0}, "tau must be finite and positive"),
        ({"kind": "sgd"}, "not a valid ServerOptimizer"),
    ],
)
def test_config_refuses_out_of_range_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


def test_an_overflowing_step_is_reported_non_finite() -> None:
    """GIVEN a step that overflows float32 THEN ``all_finite`` says so (the apply refuses it)."""
    params = {"w": np.full(3, 3e38, np.float32)}
    new, _ = step(OptimizerConfig(lr=10.0), params, {"w": np.full(3, 1e38, np.float32)}, {})
    assert not all_finite(new)
    assert all_finite(params)
