"""Server optimizer state in the version log (DESIGN.md section 4, Apply and Commit protocol).

``apply_cohort`` on the moto server: the state after version N+1 is a write-once object
named by N+1's metadata, read back when N+2 is built; a lost race, a crash between the
state and the commit, and a corrupted reference never put a wrong state into the chain;
plain FedAvg writes exactly what it wrote before; nothing non-finite is committed.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from fedcore import access, layout
from fedcore.codec import ModelMeta
from fedcore.errors import IntegrityError, NonFiniteModelError
from fedcore.server import apply as apply_mod
from fedcore.server.apply import apply_cohort, read_optimizer_state, write_optimizer_state
from fedcore.server.optimizers import OptimizerConfig, ServerOptimizer, init_state, step
from fedcore.storage import S3Store
from fedcore.versions import commit_version, find_head, load_model, read_header, read_meta, seed
from tests.helpers import TINY, chain, delta_for, participant
from tests.replay import replay_chain
from tests.sync_functions import SyncFunctions

FEDAVGM = OptimizerConfig(ServerOptimizer.FEDAVGM, momentum=0.9)
FEDADAM = OptimizerConfig(ServerOptimizer.FEDADAM, lr=0.05)


def seeded(store: S3Store) -> S3Store:
    seed(store, {k: np.full(s, 0.5, np.float32) for k, s in TINY.items()})
    return store


def apply(
    store: Any, cid: str, *, base: int = 0, opt: OptimizerConfig | None = None, lr: float = 1.0
) -> apply_mod.Applied:
    return apply_cohort(
        store,
        cohort_id=cid,
        base_version=base,
        mean_delta=delta_for(cid, TINY, 0.05),
        server_lr=opt.lr if opt else lr,
        rule="inverse_sqrt",
        members=["a", "b"],
        num_samples=20,
        optimizer=opt,
    )


def optimizer_objects(store: S3Store) -> list[str]:
    return sorted(
        i.key
        for i in store.list(layout.GLOBAL_PREFIX)
        if layout.parse_key(i.key).kind is layout.Kind.OPTIMIZER
    )


def mean_of(meta: ModelMeta) -> dict[str, np.ndarray]:
    (cid,) = meta.cohorts
    return delta_for(cid, TINY, 0.05)


def test_plain_fedavg_commits_no_state_and_the_same_metadata(store: S3Store) -> None:
    """GIVEN the default (FedAvg) WHEN two cohorts apply THEN no optimizer object exists, the
    metadata has no ``optimizer`` entry at all (the bytes of before), and the params are
    ``current + float32(server_lr * w(s)) * mean``."""
    seeded(store)
    apply(store, "c00000000", lr=0.7)
    apply(store, "c00000001", lr=0.7)
    assert optimizer_objects(store) == []
    for v in (1, 2):
        doc = json.loads(read_header(store, v).metadata["fedcore"])
        assert "optimizer" not in doc
    x1, _, _ = load_model(store, 1)
    x2, m2, _ = load_model(store, 2)
    d = delta_for("c00000001", TINY, 0.05)
    for k in TINY:
        assert np.array_equal(x2[k], (x1[k] + np.float32(m2.weight) * d[k]).astype(np.float32))
    assert replay_chain(store, OptimizerConfig(lr=0.7), mean_of) == 2


@pytest.mark.parametrize("opt", [FEDAVGM, FEDADAM], ids=["fedavgm", "fedadam"])
def test_each_version_names_its_state_and_the_next_reads_it(
    store: S3Store, opt: OptimizerConfig
) -> None:
    """GIVEN a stateful rule WHEN three cohorts apply (one stale) THEN every version names one
    state object under its own prefix with the sha256 of its bytes, and replaying the means
    in chain order reproduces every version and every state."""
    seeded(store)
    apply(store, "c00000000", opt=opt)
    apply(store, "c00000001", opt=opt)
    apply(store, "c00000002", opt=opt, base=1)  # staleness 1
    objects = optimizer_objects(store)
    assert len(objects) == 3
    for v in (1, 2, 3):
        ref = read_meta(store, v).optimizer
        assert ref is not None and ref["kind"] == opt.kind.value
        parsed = layout.parse_key(ref["key"])
        assert parsed.version == v and parsed.cohort_id == read_meta(store, v).cohorts[0]
        assert store.head(ref["key"]).metadata["sha256"] == ref["sha256"]
    assert read_meta(store, 3).staleness == 1
    assert replay_chain(store, opt, mean_of) == 3


def test_a_losers_state_neither_blocks_nor_misleads_the_winner(store: S3Store) -> None:
    """GIVEN cohort A that wrote its state for v1 and then lost v1 to cohort B WHEN both end
    THEN v1 names B's state, v2 is A rebuilt on v1 with B's state, A's orphan at v1 is never
    read, and the replay in chain order (B, then A) matches."""
    seeded(store)

    class RacingStore:
        """Commits B the moment A is about to commit v1."""

        def __init__(self, inner: S3Store) -> None:
            self.inner, self.raced = inner, False

        def put_new(self, key: str, *args: Any, **kwargs: Any) -> Any:
            if key == layout.model_key(1) and not self.raced:
                self.raced = True
                apply(self.inner, "c00000001", opt=FEDAVGM)
            return self.inner.put_new(key, *args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    applied = apply(RacingStore(store), "c00000000", opt=FEDAVGM)
    assert (applied.version, applied.staleness, applied.already) == (2, 1, False)
    assert [m.cohorts for m in chain(store)[1:]] == [["c00000001"], ["c00000000"]]
    objects = optimizer_objects(store)
    assert len(objects) == 3  # A's orphan at v1, B's at v1, A's at v2
    named = {read_meta(store, v).optimizer["key"] for v in (1, 2)}  # type: ignore[index]
    (orphan,) = set(objects) - named
    assert layout.parse_key(orphan).version == 1 and "c00000000" in orphan
    assert replay_chain(store, FEDAVGM, mean_of) == 2


def test_a_retry_after_a_crash_between_state_and_commit_reuses_its_state(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN an apply that died after writing its state and before the commit WHEN it is
    retried THEN it finds its own bytes at its own key, commits naming them, and writes no
    second state object."""
    seeded(store)
    apply(store, "c00000000", opt=FEDAVGM)

    class Died(BaseException):
        pass

    real = apply_mod.commit_version

    def die(*args: Any, **kwargs: Any) -> Any:
        raise Died

    monkeypatch.setattr(apply_mod, "commit_version", die)
    with pytest.raises(Died):
        apply(store, "c00000001", opt=FEDAVGM)
    before = optimizer_objects(store)
    monkeypatch.setattr(apply_mod, "commit_version", real)
    apply(store, "c00000001", opt=FEDAVGM)
    assert optimizer_objects(store) == before and len(before) == 2
    assert read_meta(store, 2).optimizer["key"] in before  # type: ignore[index]
    assert apply(store, "c00000001", opt=FEDAVGM).already  # and never twice
    assert replay_chain(store, FEDAVGM, mean_of) == 2


def test_a_non_finite_step_commits_nothing(store: S3Store) -> None:
    """GIVEN a server lr that overflows float32 WHEN the cohort applies THEN it raises
    ``NonFiniteModelError`` and neither a version nor a state object is written."""
    seeded(store)
    for opt in (None, OptimizerConfig(ServerOptimizer.FEDAVGM, lr=1e39)):
        with pytest.raises(NonFiniteModelError, match="non-finite"):
            apply(store, "c00000000", opt=opt, lr=1e39)
    assert find_head(store) == 0
    assert optimizer_objects(store) == []


def test_a_rule_change_restarts_the_state_from_zeros(store: S3Store) -> None:
    """GIVEN v1 from FedAvgM WHEN FedAdam applies on top THEN it starts from zeros (FedAvgM's
    momentum is not Adam's first moment) and names FedAdam state."""
    seeded(store)
    apply(store, "c00000000", opt=FEDAVGM)
    apply(store, "c00000001", opt=FEDADAM)
    x1, _, _ = load_model(store, 1)
    x2, m2, _ = load_model(store, 2)
    zeros = init_state(FEDADAM.kind, x1)
    w = apply_mod.staleness_weight(m2.staleness)
    expected, state = step(FEDADAM, x1, mean_of(m2), zeros, weight=w)
    for k in TINY:
        np.testing.assert_allclose(x2[k], expected[k], rtol=1e-6)
    named = read_optimizer_state(store, m2, FEDADAM.kind, x2)
    np.testing.assert_allclose(named["v"]["w"], state["v"]["w"], rtol=1e-6)


def test_state_that_does_not_match_its_reference_is_refused(store: S3Store) -> None:
    """GIVEN a version whose metadata names state with another sha256, or a key of another
    version WHEN the next cohort applies THEN ``IntegrityError``, and nothing is committed."""
    seeded(store)
    params, _, _ = load_model(store, 0)
    state = init_state(ServerOptimizer.FEDAVGM, params)
    ref = write_optimizer_state(
        store, version=1, cohort_id="c00000000", kind=ServerOptimizer.FEDAVGM, state=state
    )
    bad = {**ref, "sha256": "0" * 64}
    assert commit_version(store, params, ModelMeta(1, 0, ["c00000000"], optimizer=bad))
    with pytest.raises(IntegrityError, match="sha256"):
        apply(store, "c00000001", base=1, opt=FEDAVGM)
    elsewhere = {**ref, "key": layout.optimizer_key(2, "c00000000", "0" * 16)}
    with pytest.raises(IntegrityError, match="not this version's"):
        read_optimizer_state(store, ModelMeta(1, 0, optimizer=elsewhere), FEDAVGM.kind, params)
    assert find_head(store) == 1


def test_devices_may_not_read_or_write_optimizer_state() -> None:
    """GIVEN the gateway's rules THEN a device can read the model but not the state a version
    names, and can never create either."""
    key = layout.optimizer_key(3, "c00000002", "0123456789abcdef")
    assert layout.parse_key(key).kind is layout.Kind.OPTIMIZER
    assert access.allowed("dev1", "get", layout.model_key(3))
    for op in ("get", "head", "put_new"):
        assert not access.allowed("dev1", op, key), op


def test_the_coordinator_aborts_a_cohort_whose_step_is_non_finite(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN a server lr that overflows WHEN a plaintext cohort completes through the real
    handlers THEN the cohort ends aborted, the reason says why, and no version is added."""
    seeded(store)
    h = SyncFunctions(
        store,
        {"mode": "plaintext", "cohort_size": 3, "min_cohort_size": 3, "server_lr": 1e39},
        monkeypatch,
    )
    parts = [participant(store, c) for c in ("a0", "a1", "a2")]
    cfg = h.join(parts)
    for p in parts:
        p.upload_plain(cfg, delta_for(p.client_id), num_samples=10, loss=0.5)
    h.deliver()
    res = h.result(cfg)
    assert res is not None and res.status == "aborted" and "non-finite" in res.reason, res
    assert find_head(store) == 0
