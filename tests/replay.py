"""Replay a version chain through the server optimizer and compare with what was committed.

The check behind "optimizer state is exactly-once": starting from zeros at version 0,
each version's cohort mean (computed by the test from what its members sent, never read
back from the server's state) is stepped through the rule in chain order, carrying the
replay's own state. A state applied twice, skipped, or taken from a lost attempt makes
some version's parameters or named state differ from the replay.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedcore.codec import ModelMeta
from fedcore.server.apply import read_optimizer_state, staleness_weight
from fedcore.server.optimizers import OptimizerConfig, init_state, step
from fedcore.storage import ObjectStore
from fedcore.versions import load_model
from tests.helpers import chain


def replay_chain(
    store: ObjectStore,
    config: OptimizerConfig,
    mean_of: Callable[[ModelMeta], dict[str, np.ndarray]],
    *,
    rule: str = "inverse_sqrt",
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> int:
    """Assert every committed version and its state equal the replay; returns the versions
    checked. ``mean_of(meta)`` is the mean delta of the cohort ``meta`` applied."""
    metas = chain(store)
    prev, _, _ = load_model(store, 0)
    state = init_state(config.kind, prev)
    for meta in metas[1:]:
        assert meta.optimizer is None or meta.optimizer["kind"] == config.kind.value, meta
        if config.stateful:
            assert meta.optimizer is not None, f"v{meta.version} names no optimizer state"
        weight = staleness_weight(meta.staleness, rule)
        assert np.isclose(meta.weight, config.lr * weight), meta
        expected, state = step(config, prev, mean_of(meta), state, weight=weight)
        got, _, _ = load_model(store, meta.version)
        for k in got:
            np.testing.assert_allclose(
                got[k], expected[k], atol=atol, rtol=rtol, err_msg=f"v{meta.version} {k}"
            )
        named = read_optimizer_state(store, meta, config.kind, got)
        for slot, tensors in state.items():
            for k, a in tensors.items():
                np.testing.assert_allclose(
                    named[slot][k], a, atol=atol, rtol=rtol, err_msg=f"v{meta.version} {slot}/{k}"
                )
        prev = got
    return len(metas) - 1
