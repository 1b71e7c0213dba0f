"""Devices keep going on slow devices (issue 16): the real stack on moto, a ManualClock.

Every member of the first cohort misses the inputs deadline (the test moves the
stack's clock past it while they train, nothing is slept out). Before issue 16 each
device then waited for a version newer than its cohort's base, which only an applied
cohort can produce, and the population stalled at version 0. Now a device that was
not counted (secagg: the inputs manifest leaves it out) or whose completed cohort
aborted anyway (plaintext: it uploaded, late) checks in again at the same version,
and the next cohort forms and applies. The coordinator sizes each new cohort's
inputs deadline from the training seconds recent members reported (plaintext, and
signed in the masked metadata under secure aggregation).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from fedcore import layout
from fedcore.clock import ManualClock
from fedcore.device import Polling, Runner, Settings, SyntheticDevice, Update, drive, machine
from fedcore.device.machine import Leave
from fedcore.layout import Phase
from fedcore.messages import CohortConfig, Mode
from fedcore.server.deadlines import TRAIN_P90, TRAIN_REPORTS
from fedcore.status import describe
from fedcore.storage import S3Store
from fedcore.versions import find_head, read_meta, seed
from infra.stack import LocalStack
from tests.helpers import (
    TINY,
    assert_consistent,
    delta_for,
    join_all,
    participant,
    wait_until,
)

ROUND_S = 5.0  # every phase limit, on the stack's ManualClock
CLIENTS = ("a", "b", "c")
FAST = Polling(pointer_s=0.05, max_pointer_s=0.2, cohort_s=0.05, checkin_check_s=0.5, phase_s=0.05)


@pytest.mark.parametrize("mode", [Mode.PLAINTEXT, Mode.SECAGG])
def test_next_cohort_forms_and_applies_after_every_member_missed_the_deadline(
    mode: Mode, s3_endpoint: str, store: S3Store, notifications
) -> None:  # type: ignore[no-untyped-def]
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": mode.value, "cohort_size": len(CLIENTS), "min_cohort_size": 2,
        "round_deadline_s": ROUND_S, "short_round_s": ROUND_S,
    }  # fmt: skip
    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings,
        sweep_interval_s=3600.0, notifications=notifications, clock=ManualClock(),
    ) as st:  # fmt: skip
        first: list[str] = []  # the first cohort's id, once a member trains for it
        leaves: dict[str, list[Leave]] = {c: [] for c in CLIENTS}
        errors: list[BaseException] = []

        def miss_the_deadline() -> None:
            """All members are training for the first cohort: let its inputs phase lapse."""
            cid = first[0]
            if mode is Mode.SECAGG:  # inputs is counted from the close of shares
                wait_until(
                    lambda: store.head(layout.state_key(cid, Phase.SHARES)) is not None, what="U2"
                )
            st.advance(ROUND_S + 1)
            wait_until(
                lambda: store.head(layout.state_key(cid, Phase.RESULT)) is not None, what="abort"
            )

        slow = threading.Barrier(len(CLIENTS), action=miss_the_deadline, timeout=60)

        def train(client: str, cfg: CohortConfig) -> Update:
            if not first:
                first.append(cfg.cohort_id)
            if cfg.cohort_id == first[0]:
                slow.wait()  # still training when the deadline passes
            return Update(delta_for(client, TINY, 0.05), 10, loss=0.5)

        def device(client: str) -> None:
            terms = Settings(
                client, mode, until_version=1, slack_s=30.0, retry_s=0.05, max_retry_s=0.2
            )
            runner = Runner(
                participant(store, client, mode.value),
                SyntheticDevice(lambda cfg: train(client, cfg)),
                polling=FAST,
                on_leave=leaves[client].append,
            )
            try:
                drive(runner, *machine.start(terms))
            except BaseException as exc:  # the assertion below names it
                errors.append(exc)

        threads = [threading.Thread(target=device, args=(c,), daemon=True) for c in CLIENTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=40)
        assert errors == []
        assert not any(t.is_alive() for t in threads), "a device stalled"
        assert find_head(store) == 1
        cid = first[0]
        aborted = participant(store, "a").result(cid)
        assert aborted is not None and aborted.status == "aborted"
        shown = {c.cohort_id: c for c in describe(store, versions=0).cohorts}[cid]
        assert (shown.outcome, shown.reason) == ("aborted", aborted.reason)  # the demo says why
        for c in CLIENTS:
            ways = [(leave.cohort_id, leave.outcome.value) for leave in leaves[c]]
            # plaintext: the late upload completed, then the result said aborted;
            # secagg: the inputs manifest did not count the device
            expected = "completed" if mode is Mode.PLAINTEXT else "abandoned"
            assert ways[0] == (cid, expected), ways
            assert ways[-1][1] == "completed" and ways[-1][0] != cid, ways
        st.pump.drain()
        assert st.pump.stats.dead_letters == []
        assert_consistent(store)


def test_inputs_deadline_adapts_to_reported_training_seconds(
    s3_endpoint: str, store: S3Store, notifications
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN deadline_margin 2 and members that report 40 s of training THEN version 1's
    metrics record the cohort's p90 (40) and the next cohort's inputs deadline is 80 s, not
    the fixed 20 s: advancing the clock 20 s leaves it open, past 80 s closes it."""
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": "plaintext", "cohort_size": 2, "min_cohort_size": 2, "round_deadline_s": 20.0,
        "deadline_margin": 2.0, "deadline_min_s": 10.0, "deadline_max_s": 300.0,
    }  # fmt: skip
    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings,
        sweep_interval_s=3600.0, notifications=notifications, clock=ManualClock(),
    ) as st:  # fmt: skip
        cfgs = join_all(store, ["a", "b"])
        assert cfgs["a"].phase_s["inputs"] == 20.0  # nothing reported yet: the fixed one
        for client, took in (("a", 10.0), ("b", 40.0)):
            participant(store, client).upload_plain(
                cfgs[client], delta_for(client), num_samples=10, loss=0.5, train_s=took
            )
        wait_until(lambda: find_head(store) == 1, what="version 1")
        assert read_meta(store, 1).metrics[TRAIN_P90] == 40.0
        cfgs = join_all(store, ["a", "b"], 1)
        cfg = cfgs["a"]
        assert cfg.phase_s["inputs"] == 80.0
        participant(store, "a").upload_plain(cfg, delta_for("a"), num_samples=10, loss=0.5)
        inputs = layout.state_key(cfg.cohort_id, Phase.INPUTS)
        # What the demo's waiting line reads: the open phase, who it waits for, its deadline.
        shown = {c.cohort_id: c for c in describe(store, versions=0).cohorts}[cfg.cohort_id]
        assert (shown.open_phase, shown.expected, shown.waiting_for) == ("inputs", 2, 1)
        assert shown.deadline_at == pytest.approx(cfg.created_at + 80.0)
        st.advance(20.0 + 1)
        assert store.head(inputs) is None  # the fixed deadline would have closed it
        st.advance(60.0)
        wait_until(lambda: store.head(inputs) is not None, what="the adapted deadline")
        st.pump.drain()
        assert st.pump.stats.dead_letters == []


def test_secure_inputs_deadline_adapts_to_the_signed_training_seconds(
    s3_endpoint: str, store: S3Store, notifications
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN secure aggregation, deadline_margin 2 and three devices whose training takes
    10, 20 and 40 s on their own clocks (moved by the training itself, nothing slept) THEN
    each reports it in its signed masked metadata, version 1's metrics record the cohort's
    p90 (40 s) and the next cohort's inputs deadline is twice that, not the fixed 20 s."""
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": "secagg", "cohort_size": len(CLIENTS), "min_cohort_size": 2,
        "round_deadline_s": 20.0, "short_round_s": 20.0,
        "deadline_margin": 2.0, "deadline_min_s": 10.0, "deadline_max_s": 300.0,
    }  # fmt: skip
    took = dict(zip(CLIENTS, (10.0, 20.0, 40.0), strict=True))
    skew = dict.fromkeys(CLIENTS, 0.0)  # how far each device's clock moved while training
    errors: list[BaseException] = []

    def train(client: str) -> Update:
        skew[client] += took[client]
        return Update(delta_for(client, TINY, 0.05), 10, loss=0.5)

    def device(client: str) -> None:
        terms = Settings(
            client, Mode.SECAGG, until_version=1, slack_s=30.0, retry_s=0.05, max_retry_s=0.2
        )
        runner = Runner(
            participant(store, client, "secagg"),
            SyntheticDevice(lambda cfg: train(client)),
            polling=FAST,
            clock=lambda: time.monotonic() + skew[client],
        )
        try:
            drive(runner, *machine.start(terms))
        except BaseException as exc:  # the assertion below names it
            errors.append(exc)

    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings,
        sweep_interval_s=3600.0, notifications=notifications, clock=ManualClock(),
    ) as st:  # fmt: skip
        threads = [threading.Thread(target=device, args=(c,), daemon=True) for c in CLIENTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert find_head(store) == 1
        metrics = read_meta(store, 1).metrics
        assert 40.0 <= metrics[TRAIN_P90] < 45.0, metrics
        assert metrics[TRAIN_REPORTS] == len(CLIENTS)
        cfgs = join_all(store, list(CLIENTS), 1, mode="secagg")
        assert cfgs["a"].phase_s["inputs"] == pytest.approx(2 * metrics[TRAIN_P90])
        assert cfgs["a"].phase_s["keys"] == 20.0  # the short rounds keep their fixed limit
        cid = cfgs["a"].cohort_id
        shown = {c.cohort_id: c for c in describe(store, versions=0).cohorts}[cid]
        assert (shown.open_phase, shown.waiting_for) == ("keys", len(CLIENTS))
        assert shown.deadline_at == pytest.approx(cfgs["a"].created_at + 20.0)
        st.pump.drain()
        assert st.pump.stats.dead_letters == []
