"""The cohort protocol through the real handlers and real S3 events.

The stacks run on a ``ManualClock``: a deadline passes when the test advances it,
never because the machine was slow. The scenarios marked ``both_backends`` run on
moto (the pump lists new objects) and on SeaweedFS (its webhook bridge pushes them).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from fedcore import layout
from fedcore.clock import ManualClock
from fedcore.layout import Kind, Phase
from fedcore.participant import Participant
from fedcore.server import formation
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store
from fedcore.versions import find_head, load_model, read_pointer, seed
from infra.stack import LocalStack
from tests.helpers import (
    TINY,
    assert_consistent,
    both_backends,
    delta_for,
    join_all,
    participant,
    wait_until,
)

ROUND_S = 60.0  # on the stack's ManualClock: only an advance() crosses it


def tiny_seed(store: S3Store) -> dict[str, np.ndarray]:
    params = {k: np.zeros(s, np.float32) for k, s in TINY.items()}
    seed(store, params)
    return params


@pytest.fixture
def stack_factory(s3_endpoint: str, store: S3Store, notifications):  # type: ignore[no-untyped-def]
    stacks: list[LocalStack] = []

    def make(**kw):  # type: ignore[no-untyped-def]
        tiny_seed(store)
        settings = {
            "cohort_size": 3,
            "min_cohort_size": 2,
            "round_deadline_s": ROUND_S,
            "mode": "plaintext",
            **kw.pop("settings", {}),
        }
        st = LocalStack(
            endpoint_url=s3_endpoint,
            bucket=store.bucket,
            settings=settings,
            notifications=notifications,
            clock=ManualClock(),
            # On a clock that stands still scheduled sweeps find nothing due; advance()
            # sweeps when the test moves it.
            **{"sweep_interval_s": 3600.0, **kw},
        ).start()
        stacks.append(st)
        return st

    yield make
    for st in stacks:
        st.stop()


def upload(store: S3Store, client: str, cfg, n: int = 10) -> None:  # type: ignore[no-untyped-def]
    participant(store, client).upload_plain(cfg, delta_for(client), num_samples=n, loss=0.5)


@both_backends
def test_cohort_applies_weighted_mean(stack_factory, store: S3Store, notifications) -> None:  # type: ignore[no-untyped-def]
    """GIVEN 3 devices with 10, 20, 30 samples WHEN all upload THEN v1 = v0 + weighted mean,
    every step triggered by an S3 event (the sweeper never runs); on SeaweedFS each of
    those events came from its webhook bridge, as the pump lists nothing there."""
    seaweed = notifications  # the SeaweedFS server on that backend, None on moto
    bridged = seaweed.bridge.stats.delivered if seaweed else 0
    st = stack_factory()
    cfgs = join_all(store, ["a", "b", "c"])
    assert len({c.cohort_id for c in cfgs.values()}) == 1
    for client, n in zip("abc", (10, 20, 30), strict=True):
        upload(store, client, cfgs[client], n)
    wait_until(lambda: read_pointer(store)[0].version == 1, what="version 1")
    params, meta, _ = load_model(store, 1)
    expected = (
        sum(
            n * delta_for(c)["w"].astype(np.float64)
            for c, n in zip("abc", (10, 20, 30), strict=True)
        )
        / 60
    )
    np.testing.assert_allclose(params["w"], expected, rtol=1e-5, atol=1e-7)
    assert meta.parent == 0 and meta.staleness == 0 and meta.num_samples == 60
    assert meta.members == ["a", "b", "c"]
    st.pump.drain()
    assert_consistent(store)
    assert st.sweeps == 0 and st.pump.stats.dead_letters == []
    # 3 check-ins, the config, 3 uploads, the inputs manifest and the result at least.
    assert st.pump.stats.events >= 9
    assert st.pump.listing is (seaweed is None)
    if seaweed is not None:
        assert seaweed.bridge.stats.delivered > bridged


@both_backends
def test_duplicated_shuffled_events_and_concurrent_cohorts(stack_factory, store: S3Store) -> None:  # type: ignore[no-untyped-def]
    """GIVEN every event delivered twice, shuffled, and 4 cohorts finishing at once, for 3 rounds
    THEN the version chain is linear and every cohort is applied exactly once, with staleness."""
    st = stack_factory(duplicate=True, shuffle=True, seed=7, workers=6)
    clients = [f"d{i:02d}" for i in range(12)]
    all_cohorts: set[str] = set()
    for rnd in range(3):
        cfgs = join_all(store, clients, last_version=rnd)
        cohorts = {c.cohort_id for c in cfgs.values()}
        assert len(cohorts) == 4
        all_cohorts |= cohorts
        threads = [threading.Thread(target=upload, args=(store, c, cfgs[c])) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        target = len(all_cohorts)
        wait_until(lambda t=target: find_head(store) == t, what=f"{target} versions")
    st.pump.drain()
    metas = assert_consistent(store, all_cohorts)
    assert len(metas) == 13
    assert max(m.staleness for m in metas) >= 1  # concurrent cohorts were applied on newer bases
    for m in metas[1:]:
        assert math.isclose(m.weight, 1 / math.sqrt(1 + m.staleness))
    assert read_pointer(store)[0].version == 12
    assert st.pump.stats.dead_letters == []
    assert st.pump.stats.invocations == 2 * st.pump.stats.events


def test_deadline_closes_with_survivors_and_small_cohort_aborts(
    stack_factory, store: S3Store
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN a cohort where one of 3 never uploads THEN the sweeper closes it at the deadline
    and applies the 2 survivors; GIVEN a cohort where only 1 uploads THEN it aborts cleanly
    and the next cohort still proceeds."""
    st = stack_factory()
    cfgs = join_all(store, ["a", "b", "c"])
    upload(store, "a", cfgs["a"])
    upload(store, "b", cfgs["b"])
    cid = cfgs["a"].cohort_id
    st.sweep_now()
    assert Participant(store, "a", mode="plaintext").result(cid) is None  # not due yet
    st.advance(ROUND_S)
    wait_until(
        lambda: Participant(store, "a", mode="plaintext").result(cid) is not None,
        what="deadline close",
    )
    res = Participant(store, "a", mode="plaintext").result(cid)
    assert res is not None and res.status == "applied" and res.included == ["a", "b"]
    upload(store, "c", cfgs["c"])  # too late: the phase closed without c
    coord = Coordinator(store, ServerSettings(cohort_size=3, mode="plaintext"))
    assert coord.on_member_object(cid, Kind.PLAIN, "c") == "late"
    cfgs = join_all(store, ["a", "b", "c"], 1)
    upload(store, "a", cfgs["a"])
    cid2 = cfgs["a"].cohort_id
    st.advance(ROUND_S)
    wait_until(
        lambda: Participant(store, "a", mode="plaintext").result(cid2) is not None, what="abort"
    )
    res2 = Participant(store, "a", mode="plaintext").result(cid2)
    assert res2 is not None and res2.status == "aborted" and "minimum" in res2.reason
    assert find_head(store) == 1
    cfgs = join_all(store, ["a", "b", "c"], 1)
    for c in "abc":
        upload(store, c, cfgs[c])
    wait_until(lambda: find_head(store) == 2, what="cohort after abort")
    st.pump.drain()
    assert st.pump.stats.dead_letters == []
    assert_consistent(store)


def test_hostile_and_late_uploads_are_rejected_and_cohort_completes(
    stack_factory, store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN a member whose update lies about its base version, a non-member upload and a
    truncated upload THEN each is logged with the object and reason, the liar is a dropout,
    and the cohort applies the honest members only."""
    stack_factory()
    cfgs = join_all(store, ["a", "b", "c"])
    cfg = cfgs["a"]
    upload(store, "a", cfg)
    upload(store, "b", cfg)
    from dataclasses import replace

    liar = replace(cfg, base_version=cfg.base_version + 5)
    participant(store, "c").upload_plain(liar, delta_for("c"), num_samples=10, loss=0.1)
    store.put_new(layout.member_key(cfg.cohort_id, layout.Kind.PLAIN, "zz"), b"\x00" * 12)
    wait_until(
        lambda: Participant(store, "a", mode="plaintext").result(cfg.cohort_id) is not None,
        what="result",
    )
    res = Participant(store, "a", mode="plaintext").result(cfg.cohort_id)
    assert res is not None and res.included == ["a", "b"]
    assert "base version" in res.rejected["c"]
    # A late upload after the phase closed changes nothing.
    store.put_new(layout.member_key(cfg.cohort_id, layout.Kind.PLAIN, "late"), b"x")
    coord = Coordinator(store, ServerSettings(cohort_size=3, mode="plaintext"))
    assert coord.on_member_object(cfg.cohort_id, Kind.PLAIN, "a") == "noop"  # re-delivered
    assert coord.on_member_object(cfg.cohort_id, Kind.PLAIN, "zz") == "rejected"
    assert find_head(store) == 1


def test_crash_between_commit_and_pointer_is_recovered(store: S3Store) -> None:
    """GIVEN a finalizer that committed v1 and died before moving the pointer or writing
    the result WHEN the event is redelivered THEN nothing is applied twice and the pointer
    and result catch up."""
    tiny_seed(store)
    coord = Coordinator(store, ServerSettings(cohort_size=2, min_cohort_size=2, mode="plaintext"))
    cfgs = join_all_direct(store, coord, ["a", "b"])
    for c in "ab":
        upload(store, c, cfgs[c])
    cid = cfgs["a"].cohort_id
    for c in "ab":
        coord.on_member_object(cid, Kind.PLAIN, c)
    import fedcore.server.apply as apply_mod

    real = apply_mod.advance_pointer

    def crash(*a, **k):  # type: ignore[no-untyped-def]
        raise RuntimeError("power cut")

    apply_mod.advance_pointer = crash
    try:
        with pytest.raises(RuntimeError):
            coord.finalize(cid)
    finally:
        apply_mod.advance_pointer = real
    assert read_pointer(store)[0].version == 0 and find_head(store) == 1
    assert store.head(layout.state_key(cid, Phase.RESULT)) is None
    fresh = Coordinator(store, ServerSettings(cohort_size=2, min_cohort_size=2, mode="plaintext"))
    assert fresh.on_object_created(layout.state_key(cid, Phase.INPUTS)) == "noop"
    assert read_pointer(store)[0].version == 1 and find_head(store) == 1
    assert fresh.result(cid) is not None
    assert_consistent(store)


def join_all_direct(store: S3Store, coord: Coordinator, clients: list[str]):  # type: ignore[no-untyped-def]
    parts = {c: participant(store, c) for c in clients}
    tickets = {c: p.check_in(0) for c, p in parts.items()}
    coord.form_cohorts()
    return {c: parts[c].find_cohort(tickets[c])[0] for c in clients}


def test_formation_from_a_stale_view_never_reuses_a_taken_checkin(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN invocation B that listed the check-ins and cohorts just before invocation A
    formed two cohorts from them (and A died before deleting the check-ins) WHEN B goes on
    THEN B's config write loses, B re-lists and forms nothing: no check-in is in two cohorts.

    The demo once formed such a ghost cohort, whose members were all busy elsewhere."""
    tiny_seed(store)
    settings = ServerSettings(cohort_size=2, min_cohort_size=2, mode="plaintext")
    a, b = Coordinator(store, settings), Coordinator(store, settings)
    # A dies before deleting the check-ins it took (B, holding a stale view, forms nothing).
    monkeypatch.setattr(formation, "delete_checkins", lambda store, cfg: None)
    for c in "wxyz":
        participant(store, c).check_in(0)
    stale = b.formation.waiting
    calls = {"n": 0}

    def waiting_then_a_forms(now: float):  # type: ignore[no-untyped-def]
        view = stale(now)
        calls["n"] += 1
        if calls["n"] == 1:
            assert len(a.form_cohorts()) == 2  # A wins while B holds its stale view
        return view

    b.formation.waiting = waiting_then_a_forms  # type: ignore[method-assign]
    assert b.form_cohorts() == []
    ids = b.cohort_ids()
    assert len(ids) == 2
    members = [(c, n) for cid in ids for c, n in b.config(cid).members.items()]
    assert len(members) == len(set(members)) == 4
