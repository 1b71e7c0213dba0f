"""Server optimizers applied to a cohort's mean delta: pure numpy, no I/O, no torch.

The pseudo-gradient of a cohort is its staleness-weighted mean delta,
``g = w(s) * mean_delta`` (FedBuff, Nguyen et al. 2022, section 3), so the optimizers
see only what secure aggregation and user-level DP already release: they work
unchanged under both (DP's guarantee survives post-processing). Each rule follows
Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2, with
``Delta_t = g`` and ``eta = lr`` (no bias correction, as there):

- FedAvg:     ``x <- x + lr * g``  (today's apply; stateless)
- FedAvgM:    ``m <- momentum * m + g``; ``x <- x + lr * m``  (Hsu et al. 2019)
- FedAdagrad: ``m <- b1 m + (1 - b1) g``; ``v <- v + g^2``
- FedAdam:    ``m <- b1 m + (1 - b1) g``; ``v <- b2 v + (1 - b2) g^2``
- FedYogi:    ``m <- b1 m + (1 - b1) g``; ``v <- v - (1 - b2) g^2 sign(v - g^2)``

and for the last three ``x <- x + lr * m / (sqrt(v) + tau)``. The state starts at
zeros (``init_state``), as in Flower; the caller owns where it lives (the version log,
``fedcore.server.apply``).

Arithmetic: FedAvg and FedAvgM run in float32, FedAvg exactly as the plain apply did
(``x + float32(lr * w) * mean``, so the default changes no committed byte); the
adaptive rules run in float64 and round the new parameters and state to float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

Params = Mapping[str, np.ndarray]
# slot ("m", "v") -> parameter name -> float32 array of that parameter's shape
OptimizerState = Mapping[str, Mapping[str, np.ndarray]]


class ServerOptimizer(StrEnum):
    """The server update rule (the value is the SERVER_OPTIMIZER setting)."""

    FEDAVG = "fedavg"
    FEDAVGM = "fedavgm"
    FEDADAGRAD = "fedadagrad"
    FEDADAM = "fedadam"
    FEDYOGI = "fedyogi"

    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the state tensors the rule keeps per parameter (none for FedAvg)."""
        if self is ServerOptimizer.FEDAVG:
            return ()
        if self is ServerOptimizer.FEDAVGM:
            return ("m",)
        return ("m", "v")


@dataclass(frozen=True)
class OptimizerConfig:
    """One server rule and its hyperparameters, validated at construction.

    ``lr`` is eta (Reddi et al.: about 1 for FedAvg/FedAvgM, 1e-2..1e-1 for the adaptive
    rules); ``momentum`` is FedAvgM's beta; ``beta1``/``beta2`` the adaptive rules' moment
    decays (``beta2`` unused by FedAdagrad); ``tau`` > 0 bounds the adaptive step at
    ``lr * |m| / tau`` where ``v`` is tiny.
    """

    kind: ServerOptimizer = ServerOptimizer.FEDAVG
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ServerOptimizer(self.kind))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server lr must be finite and positive, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"server {name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server tau must be finite and positive, got {self.tau}")

    @property
    def stateful(self) -> bool:
        return bool(self.kind.slots)


def init_state(kind: ServerOptimizer, params: Params) -> dict[str, dict[str, np.ndarray]]:
    """Zeros for every slot of ``kind``, shaped like ``params`` (empty for FedAvg)."""
    return {
        slot: {k: np.zeros(np.shape(a), np.float32) for k, a in params.items()}
        for slot in kind.slots
    }


def check_state(kind: ServerOptimizer, params: Params, state: OptimizerState) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly ``kind``'s slots shaped like params."""
    if set(state) != set(kind.slots):
        raise ValueError(f"{kind.value} keeps slots {kind.slots}, state has {sorted(state)}")
    for slot, tensors in state.items():
        if set(tensors) != set(params):
            raise ValueError(
                f"state slot {slot!r} names {sorted(tensors)}, params {sorted(params)}"
            )
        for k, a in tensors.items():
            if np.shape(a) != np.shape(params[k]):
                raise ValueError(
                    f"state {slot}/{k} has shape {np.shape(a)}, param {np.shape(params[k])}"
                )


def step(
    config: OptimizerConfig,
    params: Params,
    mean_delta: Params,
    state: OptimizerState,
    *,
    weight: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """One server step with pseudo-gradient ``weight * mean_delta``; returns new params and
    new state (float32, fresh arrays; the inputs are not modified).

    ``weight`` is the staleness weight w(s) in (0, 1]. ``state`` must come from
    ``init_state`` or an earlier ``step`` with the same ``config.kind``
    (``check_state``). Non-finite results are returned as they are: the caller refuses
    to commit them.
    """
    check_state(config.kind, params, state)
    if set(mean_delta) != set(params):
        raise ValueError(f"delta names {sorted(mean_delta)}, params {sorted(params)}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is the caller's to refuse
        return _step(config, params, mean_delta, state, weight)


def _step(
    config: OptimizerConfig,
    params: Params,
    mean_delta: Params,
    state: OptimizerState,
    weight: float,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    kind, lr = config.kind, config.lr
    if kind is ServerOptimizer.FEDAVG:
        w32 = np.float32(lr * weight)
        return {k: (params[k] + w32 * mean_delta[k]).astype(np.float32) for k in params}, {}
    if kind is ServerOptimizer.FEDAVGM:
        beta, w32, lr32 = np.float32(config.momentum), np.float32(weight), np.float32(lr)
        m = {k: (beta * state["m"][k] + w32 * mean_delta[k]).astype(np.float32) for k in params}
        return {k: (params[k] + lr32 * m[k]).astype(np.float32) for k in params}, {"m": m}
    b1, b2, tau = config.beta1, config.beta2, config.tau
    new: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, np.ndarray]] = {"m": {}, "v": {}}
    for k in params:
        g = weight * np.asarray(mean_delta[k], np.float64)
        g2 = g * g
        m = b1 * np.asarray(state["m"][k], np.float64) + (1.0 - b1) * g
        v = np.asarray(state["v"][k], np.float64)
        if kind is ServerOptimizer.FEDADAGRAD:
            v = v + g2
        elif kind is ServerOptimizer.FEDADAM:
            v = b2 * v + (1.0 - b2) * g2
        else:  # FedYogi
            v = v - (1.0 - b2) * g2 * np.sign(v - g2)
        x = np.asarray(params[k], np.float64) + lr * m / (np.sqrt(v) + tau)
        new[k] = x.astype(np.float32)
        out["m"][k] = m.astype(np.float32)
        out["v"][k] = v.astype(np.float32)
    return new, out


def all_finite(*groups: Params) -> bool:
    """Whether every array in every mapping is free of NaN and infinities."""
    return all(bool(np.isfinite(a).all()) for g in groups for a in g.values())


__all__ = [
    "OptimizerConfig",
    "OptimizerState",
    "ServerOptimizer",
    "all_finite",
    "check_state",
    "init_state",
    "step",
]
