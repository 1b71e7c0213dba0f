"""The device protocol machine, driven with scripted observations (no storage, no torch).

Every stage and every way out of a cohort is walked here; a hypothesis test feeds
arbitrary (well-typed) answers and checks the safety rules hold whatever happens:
no masked upload before a checked U2 that counts the device, no reveal before a
checked U3 that counts it, one ``Leave`` per cohort joined, nothing after DONE.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.device import machine as m
from fedcore.device.faults import DropAt, RandomDrop
from fedcore.device.machine import DeviceState, DropPoint, FaultKind, Outcome, Settings, Stage
from fedcore.device.runner import Polling, Runner, SyntheticDevice, Update
from fedcore.layout import Phase
from fedcore.messages import CohortConfig, Manifest, Mode
from fedcore.participant import Ticket
from fedcore.secagg.protocol import SecAggParams

ME = "me"
MEMBERS = (ME, "b", "c", "d")
TICKET = Ticket("n1", "checkins/me/n1.json", None, 1.0)


def config(mode: Mode = Mode.SECAGG, cid: str = "c00000007", **over: Any) -> CohortConfig:
    members = over.pop("members", MEMBERS)
    return CohortConfig(
        cohort_id=cid, base_version=over.pop("base_version", 3),
        members={c: "n1" for c in members}, mode=mode, min_members=over.pop("min_members", 3),
        created_at=1.7e9, phase_s={"keys": 10.0, "shares": 10.0, "inputs": 10.0, "unmask": 10.0},
        secagg=SecAggParams(k=3, t=3, graph_seed="00", clip=1.0, bits=30, weight_cap=100)
        if mode is Mode.SECAGG else None, **over,
    )  # fmt: skip


def manifest(phase: Phase, members: tuple[str, ...] = MEMBERS, cid: str = "c00000007") -> Manifest:
    return Manifest(cid, phase.value, list(members), {}, "all-members", 1.7e9)


def settings_(**over: Any) -> Settings:
    return Settings(ME, over.pop("mode", Mode.SECAGG), **over)


def feed(state: DeviceState, *observations: m.Observation) -> tuple[DeviceState, list[m.Action]]:
    """Step through ``observations``; every action produced, in order."""
    seen: list[m.Action] = []
    for obs in observations:
        state, actions = m.step(state, obs)
        seen += actions
    return state, seen


def said(actions: list[m.Action]) -> list[str]:
    return [a.text for a in actions if isinstance(a, m.Say)]


def left(actions: list[m.Action]) -> list[m.Leave]:
    return [a for a in actions if isinstance(a, m.Leave)]


def joined(cfg: CohortConfig | None = None, **over: Any) -> DeviceState:
    """A device that just found ``cfg`` and passed its user-level DP check."""
    state, _ = m.join(settings_(**over), cfg or config())
    state, _ = m.step(state, m.Allowed())
    return state


def at(stage: Stage, cfg: CohortConfig | None = None, **over: Any) -> DeviceState:
    """A secure device that reached ``stage`` by the happy path."""
    script: list[m.Observation] = [
        m.Written(), m.ManifestRead(manifest(Phase.KEYS)), m.Written(), m.Trained(10),
        m.ManifestRead(manifest(Phase.SHARES)), m.Uploaded(), m.ManifestRead(manifest(Phase.INPUTS)),
        m.Written(), m.QuorumSeen(MEMBERS),
    ]  # fmt: skip
    state = joined(cfg, **over)
    for obs in script:
        if state.stage is stage:
            return state
        state, _ = m.step(state, obs)
    assert state.stage is stage
    return state


# --------------------------------------------------------------------------- happy paths
def test_secure_cohort_walks_every_stage_in_order() -> None:
    """GIVEN a secure device from its first poll WHEN every request is answered as hoped
    THEN it passes each stage once, asks for each round in order, logs the same lines as
    before, leaves as completed, counts the round and waits for a newer version."""
    state, actions = m.start(settings_())
    assert state.stage is Stage.IDLE and actions == [m.AwaitVersion(newer_than=-1, stop_at=0)]
    cfg = config()
    u1, u2, u3 = (manifest(p) for p in (Phase.KEYS, Phase.SHARES, Phase.INPUTS))
    script: list[tuple[m.Observation, Stage, type]] = [
        (m.VersionSeen(3), Stage.BUDGET, m.CheckSampleBudget),
        (m.Allowed(), Stage.CHECK_IN, m.CheckIn),
        (m.CheckedIn(TICKET), Stage.CHECKED_IN, m.AwaitCohort),
        (m.CohortFound(cfg), Stage.ADMISSION, m.CheckUserPrivacy),
        (m.Allowed(), Stage.ADVERTISE, m.Advertise),
        (m.Written(), Stage.KEYS, m.AwaitPhase),
        (m.ManifestRead(u1), Stage.SHARE, m.Share),
        (m.Written(), Stage.TRAIN, m.Train),
        (m.Trained(42), Stage.SHARES, m.AwaitPhase),
        (m.ManifestRead(u2), Stage.UPLOAD, m.UploadMasked),
        (m.Uploaded(clipped=2), Stage.INPUTS, m.AwaitPhase),
        (m.ManifestRead(u3), Stage.SIGN, m.SignInputs),
        (m.Written(), Stage.QUORUM, m.AwaitQuorum),
        (m.QuorumSeen(MEMBERS), Stage.UNMASK, m.Unmask),
        (m.Written(), Stage.IDLE, m.AwaitVersion),
    ]
    lines: list[str] = []
    for obs, stage, request in script:
        state, actions = m.step(state, obs)
        assert state.stage is stage, obs
        assert isinstance(actions[-1], request) and actions[-1] == m.request_for(state)
        lines += said(actions)
        if isinstance(obs, m.Uploaded):
            assert actions[-1] == m.AwaitPhase(cfg, Phase.INPUTS, 70.0, DropPoint.INPUTS)
        if isinstance(obs, m.ManifestRead) and obs.manifest is u3:
            assert actions[-1] == m.SignInputs(u3)
        if isinstance(obs, m.QuorumSeen):
            assert actions[-1] == m.Unmask(u2, u3)
    assert lines == [
        "checked in at version 3; waiting for a cohort",
        "joined c00000007 (4 members, base version 3, secagg)",
        "c00000007: masked update uploaded (42 samples, 2 values clipped)",
        "c00000007: unmask shares revealed for 4 survivors",
        "c00000007: completed",
    ]
    assert left(actions) == [m.Leave("c00000007", 3, Outcome.COMPLETED)]
    assert (state.rounds, state.last_base, state.outcome) == (1, 3, Outcome.COMPLETED)
    # A completed cohort: wait for a newer version, watching its result in case it aborts.
    assert actions[-1] == m.AwaitVersion(newer_than=3, stop_at=0, watch="c00000007")
    assert state.cfg is None and state.u2 is None  # nothing of the cohort is kept


def test_plaintext_cohort_trains_and_uploads_in_the_clear() -> None:
    """GIVEN a plaintext device in a plaintext cohort THEN it skips the key and share
    rounds: train, upload, completed (counted, no outcome line, as before)."""
    cfg = config(Mode.PLAINTEXT)
    state = joined(cfg, mode=Mode.PLAINTEXT)
    # The inputs phase closes 10 s after created_at; 30% of it is kept for the upload.
    box = (1.7e9 + 10.0 - 3.0, 7.0)
    assert state.stage is Stage.TRAIN and m.request_for(state) == m.Train(cfg, None, *box)
    state, actions = feed(state, m.Trained(5), m.Written())
    assert said(actions) == ["uploaded update to c00000007 (plaintext)"]
    assert left(actions) == [m.Leave("c00000007", 3, Outcome.COMPLETED)]
    assert state.rounds == 1 and state.stage is Stage.IDLE


def test_user_dp_upload_books_the_release_before_its_line() -> None:
    """GIVEN an upload that reports user-level DP THEN the release is booked first and the
    line names the delta's norm before the clip."""
    _, actions = m.step(at(Stage.UPLOAD), m.Uploaded(0, 1.23456, (0.5, 0.25)))
    assert actions[0] == m.BookRelease((0.5, 0.25))
    assert said(actions) == [
        "c00000007: masked update uploaded (10 samples, 0 values clipped, "
        "delta L2 norm 1.235 before the DP clip)"
    ]


def test_pending_changes_nothing_and_repeats_the_request() -> None:
    """GIVEN any waiting stage WHEN the driver had only a look (Pending) THEN the state is
    the same and the same request is outstanding."""
    for stage in (Stage.KEYS, Stage.SHARES, Stage.INPUTS):
        state = at(stage)
        assert m.step(state, m.Pending(0.5)) == (state, [m.request_for(state)])


# --------------------------------------------------------------------------- outside a cohort
def test_until_version_stops_the_device() -> None:
    """GIVEN until_version 5 WHEN version 5 is seen THEN the device says so and is DONE."""
    state, actions = m.start(settings_(until_version=5))
    assert actions == [m.AwaitVersion(newer_than=-1, stop_at=5)]
    state, actions = m.step(state, m.VersionSeen(5))
    assert state.stage is Stage.DONE and actions == [m.Say("global model reached version 5; done")]
    with pytest.raises(m.UnexpectedObservation):
        m.step(state, m.VersionSeen(6))


def test_stop_while_idle_or_checked_in_ends_quietly() -> None:
    state, _ = m.start(settings_())
    assert m.step(state, m.Stopped()) == (replace(state, stage=Stage.DONE), [])
    state, _ = feed(state, m.VersionSeen(0), m.Allowed(), m.CheckedIn(TICKET))
    new, actions = m.step(state, m.Stopped())
    assert new.stage is Stage.DONE and actions == []


def test_sample_budget_refusal_stops_the_device() -> None:
    state, _ = m.start(settings_())
    state, actions = feed(state, m.VersionSeen(0), m.BudgetRefused("refusing to train: spent"))
    assert state.stage is Stage.DONE and said(actions) == ["refusing to train: spent"]


def test_expired_check_in_checks_in_again_and_a_cohort_timeout_quietly_too() -> None:
    """GIVEN a pending check-in WHEN it expires THEN the device says so and waits for a
    version again (it checks in afresh); WHEN no cohort came in time THEN the same, quietly."""
    state, _ = m.start(settings_())
    state, _ = feed(state, m.VersionSeen(0), m.Allowed(), m.CheckedIn(TICKET))
    assert m.request_for(state) == m.AwaitCohort(TICKET, 600.0)
    new, actions = m.step(state, m.CheckInExpired())
    assert new.stage is Stage.IDLE and new.ticket is None
    assert said(actions) == ["check-in expired without a cohort; checking in again"]
    new, actions = m.step(state, m.TimedOut())
    assert new.stage is Stage.IDLE and actions == [m.AwaitVersion(-1, 0)]


def test_wait_for_new_version_off_accepts_the_same_base() -> None:
    state = replace(DeviceState(settings_(wait_for_new_version=False)), last_base=4)
    assert m.request_for(state) == m.AwaitVersion(newer_than=-1, stop_at=0)
    assert m.request_for(replace(state, settings=settings_())) == m.AwaitVersion(4, 0)


# --------------------------------------------------------------------------- after a cohort
def test_an_uncounted_participation_checks_in_again_at_the_same_version_with_backoff() -> None:
    """GIVEN a device that was not counted (it missed the inputs phase) THEN it waits for any
    version at or above the cohort's base (not a newer one, which its cohort cannot produce),
    after a back-off that doubles per uncounted participation in a row up to its bound; a
    check-in that then times out checks in again without a further back-off; a newer version
    resets the count."""
    state, actions = m.step(at(Stage.INPUTS, retry_s=2.0, max_retry_s=5.0), m.TimedOut())
    assert left(actions)[0].outcome is Outcome.ABANDONED
    assert actions[-1] == m.AwaitVersion(newer_than=2, stop_at=0, delay_s=2.0)
    assert (state.retry, state.retries, state.last_base) == (True, 1, 3)
    state, _ = feed(state, m.VersionSeen(3), m.Allowed(), m.CheckedIn(TICKET), m.TimedOut())
    assert m.request_for(state) == m.AwaitVersion(newer_than=2, stop_at=0)  # no stall, no delay
    state, actions = feed(
        state, m.VersionSeen(3), m.Allowed(), m.CheckedIn(TICKET), m.CohortFound(config()),
        m.Allowed(), m.Written(), m.CohortEnded(),
    )  # fmt: skip
    assert actions[-1] == m.AwaitVersion(newer_than=2, stop_at=0, delay_s=4.0)
    state, actions = feed(
        state, m.VersionSeen(3), m.Allowed(), m.CheckedIn(TICKET), m.CohortFound(config()),
        m.Allowed(), m.Vanished(DropPoint.KEYS),
    )  # fmt: skip
    assert actions[-1] == m.AwaitVersion(newer_than=2, stop_at=0, delay_s=5.0)  # bounded
    assert state.retries == 3
    state, _ = m.step(state, m.VersionSeen(4))
    assert state.retries == 0 and state.backoff_s == 0.0


def test_a_mode_refusal_retries_but_a_dp_refusal_stops() -> None:
    """GIVEN a cohort refused for its mode (the cohort's, not the device's, terms) THEN the
    device checks in again at the same version; a user-level DP refusal still stops it."""
    state, actions = m.join(settings_(), config(Mode.PLAINTEXT))
    assert actions[-1] == m.AwaitVersion(newer_than=2, stop_at=0, delay_s=2.0)
    state, _ = m.join(settings_(), config())
    state, actions = m.step(state, m.BudgetRefused("spent"))
    assert state.stage is Stage.DONE and not isinstance(actions[-1], m.AwaitVersion)


def test_a_completed_cohort_that_aborts_checks_in_again() -> None:
    """GIVEN a completed participation THEN the device waits for a newer version watching
    the cohort's result; WHEN the result says aborted THEN it says so and checks in again at
    the same version after a back-off; an applied result leaves the wait as it is."""
    state, actions = m.step(at(Stage.UNMASK), m.Written())
    assert actions[-1] == m.AwaitVersion(newer_than=3, stop_at=0, watch="c00000007")
    assert state.retries == 0 and not state.retry
    new, actions = m.step(state, m.CohortAborted("only 1 input"))
    assert said(actions) == [
        "c00000007: aborted (only 1 input); checking in again at version 3 in about 2s"
    ]
    assert actions[-1] == m.AwaitVersion(newer_than=2, stop_at=0, delay_s=2.0)
    assert new.retry and new.watch is None
    _, actions = feed(
        joined(config(Mode.PLAINTEXT), mode=Mode.PLAINTEXT), m.Trained(5), m.Written()
    )
    assert actions[-1] == m.AwaitVersion(newer_than=3, stop_at=0, watch="c00000007")
    with pytest.raises(m.UnexpectedObservation):
        m.step(at(Stage.KEYS), m.CohortAborted("x"))


def test_train_is_time_boxed_to_the_inputs_deadline() -> None:
    """GIVEN a secure cohort THEN Train carries when inputs closes at the latest (U1's close
    plus the shares and inputs limits) less the margin, and the inputs limit less the margin
    as the most training may take; the margin is at most 30% of the inputs limit."""
    cfg = replace(config(), phase_s={"keys": 10.0, "shares": 20.0, "inputs": 100.0, "unmask": 10.0})
    state = at(Stage.TRAIN, cfg)
    assert m.request_for(state) == m.Train(cfg, DropPoint.SHARES, 1.7e9 + 120.0 - 5.0, 95.0)
    short = replace(config(), phase_s={"keys": 1.0, "shares": 1.0, "inputs": 10.0, "unmask": 1.0})
    assert m.train_box(short, None, 5.0) == (1.7e9 + 12.0 - 3.0, 7.0)
    assert m.train_box(replace(config(), phase_s={}), None, 5.0) == (None, None)


# --------------------------------------------------------------------------- refusals
def test_mode_mismatch_is_refused_uncounted() -> None:
    """GIVEN a secure device found by a plaintext cohort THEN it refuses it with the old
    line, is not counted, and will not train from that base again."""
    state, actions = m.join(settings_(), config(Mode.PLAINTEXT))
    assert said(actions)[1] == (
        "refusing c00000007: it runs 'plaintext' but this device runs 'secagg'"
    )
    assert left(actions)[0].outcome is Outcome.REFUSED
    assert (state.stage, state.rounds, state.last_base) == (Stage.IDLE, 0, 3)


def test_user_dp_refusal_leaves_refused_and_stops() -> None:
    state, _ = m.join(settings_(), config())
    state, actions = m.step(state, m.BudgetRefused("refusing c00000007: no user-level DP"))
    assert said(actions) == ["refusing c00000007: no user-level DP"]
    assert left(actions)[0].outcome is Outcome.REFUSED
    assert state.stage is Stage.DONE and state.rounds == 0


def test_a_config_that_does_not_name_me_is_abandoned() -> None:
    state, _ = m.join(settings_(), config(members=("b", "c", "d")))
    state, actions = m.step(state, m.Allowed())
    assert said(actions) == [
        "c00000007: abandoning the cohort: cohorts/c00000007/config.json: me is not a member",
        "c00000007: abandoned",
    ]
    assert actions[0].level == logging.WARNING  # type: ignore[union-attr]
    assert state.rounds == 1 and left(actions)[0].outcome is Outcome.ABANDONED


# --------------------------------------------------------------------------- abort paths
WAITS = [(Stage.KEYS, Phase.KEYS), (Stage.SHARES, Phase.SHARES), (Stage.INPUTS, Phase.INPUTS)]


@pytest.mark.parametrize(("stage", "phase"), WAITS)
@pytest.mark.parametrize("why", [m.CohortEnded(), m.TimedOut(), m.Stopped()])
def test_a_phase_that_never_closes_abandons(stage: Stage, phase: Phase, why: Any) -> None:
    """GIVEN a member waiting for a phase WHEN the cohort ends, time runs out or the device
    is stopped THEN it says the cohort ended before the phase closed, and abandons."""
    state, actions = m.step(at(stage), why)
    assert said(actions) == [
        f"c00000007: ended before {phase.value} closed",
        "c00000007: abandoned",
    ]
    assert left(actions)[0].outcome is Outcome.ABANDONED and state.stage is Stage.IDLE


@pytest.mark.parametrize(("stage", "phase"), WAITS)
def test_a_manifest_that_lies_is_abandoned(stage: Stage, phase: Phase) -> None:
    """GIVEN a manifest of another cohort, of another phase, or naming a stranger THEN the
    member abandons with the reason (and never acts on it)."""
    other = Phase.UNMASK
    cases = [
        (manifest(phase, cid="c00000077"), f"manifest names c00000077/{phase.value}, expected"),
        (manifest(other), f"manifest names c00000007/{other.value}, expected"),
        (manifest(phase, (*MEMBERS, "ghost")), "manifest names non-members ['ghost']"),
    ]
    for bad, reason in cases:
        state, actions = m.step(at(stage), m.ManifestRead(bad))
        line = said(actions)[0]
        assert line.startswith("c00000007: abandoning the cohort: cohorts/c00000007/state/")
        assert reason in line, line
        assert not any(isinstance(a, m.Share | m.UploadMasked | m.Unmask) for a in actions)
        assert state.stage is Stage.IDLE


@pytest.mark.parametrize(("stage", "phase"), WAITS)
def test_not_admitted_past_a_phase_leaves(stage: Stage, phase: Phase) -> None:
    """GIVEN a closed phase that leaves the member out, or keeps fewer than the minimum
    THEN the member leaves with the reason (not_admitted)."""
    _, actions = m.step(at(stage), m.ManifestRead(manifest(phase, ("b", "c", "d"))))
    assert said(actions)[0] == f"c00000007: not counted in {phase.value} (late or rejected)"
    _, actions = m.step(at(stage), m.ManifestRead(manifest(phase, (ME, "b"))))
    assert said(actions)[0] == f"c00000007: only 2 members in {phase.value}; the cohort aborts"
    assert left(actions)[0].outcome is Outcome.ABANDONED


IN_COHORT = [Stage.ADVERTISE, Stage.KEYS, Stage.SHARE, Stage.TRAIN, Stage.SHARES,
             Stage.UPLOAD, Stage.INPUTS, Stage.SIGN, Stage.QUORUM, Stage.UNMASK]  # fmt: skip
WRITES = [Stage.ADVERTISE, Stage.SHARE, Stage.UPLOAD, Stage.SIGN, Stage.UNMASK]


@pytest.mark.parametrize("stage", IN_COHORT)
@pytest.mark.parametrize("kind", [FaultKind.INTEGRITY, FaultKind.NOT_FOUND])
def test_a_fault_anywhere_in_a_secure_cohort_abandons(stage: Stage, kind: FaultKind) -> None:
    """GIVEN an IntegrityError or NotFoundError while performing any request of a secure
    cohort THEN the member abandons with the old line, at WARNING, and counts the round."""
    state, actions = m.step(at(stage), m.Faulted(kind, "x.json: bad"))
    assert said(actions) == [
        "c00000007: abandoning the cohort: x.json: bad",
        "c00000007: abandoned",
    ]
    assert actions[0] == m.Say(
        "c00000007: abandoning the cohort: x.json: bad", logging.WARNING, "x.json: bad"
    )
    assert state.rounds == 1 and left(actions)[0].outcome is Outcome.ABANDONED


@pytest.mark.parametrize("stage", WRITES)
def test_a_lost_write_leaves_the_cohort(stage: Stage) -> None:
    _, actions = m.step(at(stage), m.WriteConflict("k exists"))
    assert said(actions)[0] == "c00000007: cannot write (k exists); leaving the cohort"
    assert left(actions)[0].outcome is Outcome.ABANDONED


def test_unmask_refusing_to_reveal_says_only_why() -> None:
    """GIVEN round 4 refusing to reveal (ProtocolError: too few inputs, cohort ended) THEN
    the line is the reason alone (as before); an IntegrityError abandons as usual."""
    _, actions = m.step(at(Stage.UNMASK), m.Faulted(FaultKind.PROTOCOL, "c: only 2 inputs"))
    assert said(actions) == ["c: only 2 inputs", "c00000007: abandoned"]
    _, actions = m.step(at(Stage.UNMASK), m.Faulted(FaultKind.INTEGRITY, "U3 not in U2"))
    assert said(actions)[0] == "c00000007: abandoning the cohort: U3 not in U2"


def test_diverged_training() -> None:
    """GIVEN training that diverged THEN a secure member abandons (counted); a plaintext one
    sits out uncounted, also on a corrupt base model, with the reason as its line."""
    _, actions = m.step(at(Stage.TRAIN), m.Diverged("diverged (loss nan)"))
    assert said(actions) == ["c00000007: diverged (loss nan)", "c00000007: abandoned"]
    plain = joined(config(Mode.PLAINTEXT), mode=Mode.PLAINTEXT)
    for obs in (m.Diverged("diverged"), m.Faulted(FaultKind.INTEGRITY, "model: bad")):
        state, actions = m.step(plain, obs)
        assert said(actions) == [f"c00000007: {obs.reason}"]
        assert state.rounds == 0 and state.last_base == 3 and state.stage is Stage.IDLE


@pytest.mark.parametrize(
    ("stage", "point", "line"),
    [
        (Stage.ADVERTISE, DropPoint.KEYS, "dropping out before advertising keys"),
        (Stage.TRAIN, DropPoint.SHARES, "dropping out after sharing keys"),
        (Stage.INPUTS, DropPoint.INPUTS, "dropping out after uploading"),
    ],
)
def test_vanishing_at_each_drop_point(stage: Stage, point: DropPoint, line: str) -> None:
    """GIVEN the drop hook answering at a request's vanish point THEN the member leaves as
    dropped with the old line; anywhere else a Vanished answer is a driver bug."""
    state = at(stage)
    assert m.request_for(state).vanish_point is point  # type: ignore[union-attr]
    new, actions = m.step(state, m.Vanished(point))
    assert said(actions) == [f"c00000007: {line}", "c00000007: dropped"]
    assert left(actions)[0].outcome is Outcome.DROPPED and new.rounds == 1
    others = [p for p in DropPoint if p is not point]
    with pytest.raises(m.UnexpectedObservation):
        m.step(state, m.Vanished(others[0]))
    with pytest.raises(m.UnexpectedObservation):
        m.step(at(Stage.KEYS), m.Vanished(point))


def test_plaintext_training_is_no_drop_point() -> None:
    plain = joined(config(Mode.PLAINTEXT), mode=Mode.PLAINTEXT)
    with pytest.raises(m.UnexpectedObservation):
        m.step(plain, m.Vanished(DropPoint.SHARES))


def test_a_peer_without_a_valid_certificate_refuses_the_cohort_before_advertising() -> None:
    """GIVEN a secure cohort about to advertise WHEN the runner finds a member's operator
    certificate missing or forged THEN the device refuses it (uncounted, logged with the
    reason) and checks in again, having published nothing."""
    state = at(Stage.ADVERTISE)
    state, actions = m.step(state, m.PeerUntrusted("clients/b/certificate.json: bad signature"))
    leave = next(a for a in actions if isinstance(a, m.Leave))
    assert leave.outcome is m.Outcome.REFUSED and "bad signature" in leave.reason
    assert any(isinstance(a, m.Say) and a.level == logging.WARNING for a in actions)
    assert state.stage is Stage.IDLE and state.rounds == 0 and state.retry


def test_max_rounds_ends_after_the_last_counted_participation() -> None:
    state = at(Stage.UNMASK, max_rounds=1)
    state, actions = m.step(state, m.Written())
    assert state.stage is Stage.DONE and isinstance(actions[-1], m.Leave)


def test_observations_that_answer_nothing_are_refused() -> None:
    state, _ = m.start(settings_())
    for obs in (m.Written(), m.Faulted(FaultKind.INTEGRITY, "x"), m.Trained(1), m.CohortEnded()):
        with pytest.raises(m.UnexpectedObservation):
            m.step(state, obs)


# --------------------------------------------------------------------------- properties
def _answers(state: DeviceState) -> st.SearchStrategy[m.Observation]:
    """Any well-typed answer to ``state``'s request, with hostile contents."""
    ids = st.sampled_from([ME, "b", "c", "d", "ghost"])
    members = st.lists(ids, unique=True, max_size=5).map(tuple)
    cids = st.sampled_from(["c00000007", "c00000008"])
    manifests = st.builds(manifest, st.sampled_from(list(Phase)), members, cids)
    if state.cfg is not None and state.stage in (Stage.KEYS, Stage.SHARES, Stage.INPUTS):
        honest = manifest(Phase(state.stage.value), tuple(state.cfg.members), state.cfg.cohort_id)
        manifests = st.one_of(st.just(honest), manifests)  # reach the later rounds often
    cfgs = st.builds(
        config, st.sampled_from(list(Mode)), cids,
        members=st.lists(ids, min_size=1, unique=True, max_size=5).map(lambda c: (ME, *c)).map(
            lambda c: tuple(dict.fromkeys(c))
        ) | st.lists(ids, min_size=1, unique=True, max_size=5).map(tuple),
        min_members=st.integers(1, 4),
    )  # fmt: skip
    kinds = st.sampled_from(list(FaultKind))
    make: dict[type, st.SearchStrategy[Any]] = {
        m.VersionSeen: st.builds(m.VersionSeen, st.integers(0, 9)),
        m.BudgetRefused: st.just(m.BudgetRefused("no")),
        m.CheckedIn: st.just(m.CheckedIn(TICKET)),
        m.CohortFound: st.builds(m.CohortFound, cfgs),
        m.ManifestRead: st.builds(m.ManifestRead, manifests),
        m.Trained: st.builds(m.Trained, st.integers(0, 99)),
        m.Uploaded: st.just(m.Uploaded(0, None, (1.0,))),
        m.Diverged: st.just(m.Diverged("nan")),
        m.WriteConflict: st.just(m.WriteConflict("exists")),
        m.Faulted: st.builds(m.Faulted, kinds, st.just("bad")),
        m.CohortAborted: st.just(m.CohortAborted("too few")),
        m.QuorumSeen: st.builds(m.QuorumSeen, members),
        m.PeerUntrusted: st.just(m.PeerUntrusted("no operator certificate")),
    }
    options = [make[t] if t in make else st.just(t()) for t in m.expects(state.stage)]
    options = [options[0]] * 3 + options  # the table lists the hoped-for answer first
    point = getattr(m.request_for(state), "vanish_point", None)
    if point is not None:
        options.append(st.just(m.Vanished(point)))
    options.append(st.just(m.Pending()))
    return st.one_of(options)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(), mode=st.sampled_from(list(Mode)), max_rounds=st.integers(0, 3),
    until=st.sampled_from([0, 5]),
)  # fmt: skip
def test_no_answer_sequence_breaks_the_safety_rules(
    data: Any, mode: Mode, max_rounds: int, until: int
) -> None:
    """GIVEN any sequence of well-typed answers (lying manifests, faults, drops, strangers)
    THEN: each step ends in exactly the request for its new state (none once DONE); a
    device shares only after a checked U1 that counts it, uploads only after training and
    a checked U2 that counts it, reveals only after its upload and a checked U3 that
    counts it (U2 and U3 of its own cohort) and after at least t of U3's members signed
    the U3 it signed itself; every cohort joined is left exactly once."""
    state, actions = m.start(settings_(mode=mode, max_rounds=max_rounds, until_version=until))
    cohort: CohortConfig | None = None
    trained = uploaded = False
    seen: dict[Phase, Manifest] = {}
    signed: Manifest | None = None  # the U3 this device asked to sign
    quorum: tuple[str, ...] = ()  # who signed it, as the last QuorumSeen said

    def checked(x: Manifest, phase: Phase) -> None:
        assert cohort is not None and seen.get(phase) is x
        assert m.manifest_fault(x, cohort, phase) is None
        assert m.not_admitted(x, cohort, ME) is None

    for _ in range(60):
        if state.stage is Stage.DONE:
            assert actions == [] or not isinstance(actions[-1], m.Request)  # type: ignore[arg-type]
            break
        assert actions[-1] == m.request_for(state)
        obs = data.draw(_answers(state))
        if isinstance(obs, m.CohortFound):
            assert cohort is None
            cohort, trained, uploaded, seen = obs.cfg, False, False, {}
            signed, quorum = None, ()
        if isinstance(obs, m.ManifestRead):
            seen[Phase(obs.manifest.phase)] = obs.manifest
        state, actions = m.step(state, obs)
        for a in actions:
            match a:
                case m.Share():
                    checked(a.u1, Phase.KEYS)
                case m.UploadMasked():
                    assert trained
                    checked(a.u2, Phase.SHARES)
                case m.SignInputs():
                    # One input set per cohort: a request repeated after Pending names the
                    # same set again (the signature is deterministic, its key write-once).
                    assert uploaded and (signed is None or a.u3 == signed)
                    checked(a.u3, Phase.INPUTS)
                    signed = signed or a.u3
                case m.Unmask():
                    assert uploaded
                    checked(a.u2, Phase.SHARES)
                    checked(a.u3, Phase.INPUTS)
                    assert cohort is not None and cohort.secagg is not None
                    assert a.u3 == signed  # reveals only for the set it signed ...
                    assert (
                        len(set(quorum) & set(a.u3.members)) >= cohort.secagg.t
                    )  # ... once t agreed
                case m.Leave():
                    assert cohort is not None and a.cohort_id == cohort.cohort_id
                    cohort = None
                case m.Advertise() | m.Train() | m.UploadPlain():
                    assert cohort is not None and cohort.members.get(ME)
                    assert cohort.mode is Mode.SECAGG or not isinstance(a, m.Advertise)
        if isinstance(obs, m.QuorumSeen):
            quorum = obs.signers
        trained = trained or isinstance(obs, m.Trained)
        uploaded = uploaded or isinstance(obs, m.Uploaded)
        assert not max_rounds or state.rounds <= max_rounds
        assert (state.cfg is None) == (cohort is None)


# --------------------------------------------------------------------------- the runner
class FakeParticipant:
    """Just enough of a Participant for the runner's waits (no store)."""

    client_id = ME
    mode = "secagg"

    def __init__(self) -> None:
        self.manifests: dict[Phase, Manifest] = {}
        self.ended = False

    def manifest(self, cohort_id: str, phase: Phase) -> Manifest | None:
        return self.manifests.get(phase)

    def result(self, cohort_id: str) -> object | None:
        return object() if self.ended else None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _runner(p: FakeParticipant, clock: Clock, **kw: Any) -> Runner:
    never = SyntheticDevice(lambda cfg: Update({}, 0))
    return Runner(p, never, polling=Polling(phase_s=0.25), clock=clock, **kw)  # type: ignore[arg-type]


def test_step_wise_runner_looks_once_and_times_out_on_its_clock() -> None:
    """GIVEN a non-blocking runner WHEN a phase stays open THEN each perform is one look
    (Pending with the retry delay) until the wait's timeout on the runner's clock passes;
    once the manifest is there it is read; an ended cohort answers CohortEnded."""
    p, clock = FakeParticipant(), Clock()
    runner = _runner(p, clock, blocking=False)
    wait = m.AwaitPhase(config(), Phase.KEYS, 10.0)
    assert runner.perform(wait) == m.Pending(0.25)
    clock.now = 9.9
    assert runner.perform(wait) == m.Pending(0.25)
    clock.now = 10.0
    assert runner.perform(wait) == m.TimedOut()
    p.manifests[Phase.KEYS] = u1 = manifest(Phase.KEYS)
    assert runner.perform(wait) == m.ManifestRead(u1)  # a new wait: its own clock
    p.ended = True
    assert runner.perform(m.AwaitPhase(config(), Phase.SHARES, 10.0)) == m.CohortEnded()


def test_blocking_runner_sleeps_between_looks_and_stops_when_asked() -> None:
    p, clock = FakeParticipant(), Clock()
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock.now += s

    runner = _runner(p, clock, sleep=sleep)
    assert runner.perform(m.AwaitPhase(config(), Phase.KEYS, 1.0)) == m.TimedOut()
    assert slept == [0.25] * 4
    stopping = _runner(p, clock, sleep=sleep, should_stop=lambda: True)
    assert stopping.perform(m.AwaitPhase(config(), Phase.SHARES, 1.0)) == m.Stopped()


def test_runner_backs_off_jittered_before_the_first_look_and_watches_the_result() -> None:
    """GIVEN a retried check-in's AwaitVersion THEN the runner waits its jittered delay (from
    the injected rng) before looking; GIVEN a watched cohort whose result says aborted THEN
    it answers CohortAborted; an applied one is not read again."""

    class Rng:
        def uniform(self, a: float, b: float) -> float:
            return b  # the longest jitter

    class Pointer:
        version = 3

    class Result:
        def __init__(self, status: str) -> None:
            self.status, self.reason = status, "too few"

    p, clock = FakeParticipant(), Clock()
    reads: list[str] = []
    p.poll_latest = lambda: (Pointer(), False)  # type: ignore[attr-defined]
    outcome = {"status": ""}

    def result(cid: str) -> object | None:
        reads.append(cid)
        return Result(outcome["status"]) if outcome["status"] else None

    p.result = result  # type: ignore[method-assign]
    runner = _runner(p, clock, blocking=False, rng=Rng())
    retry = m.AwaitVersion(newer_than=2, delay_s=2.0)
    assert runner.perform(retry) == m.Pending(3.0)
    clock.now = 2.9
    assert runner.perform(retry) == m.Pending(pytest.approx(0.1))
    clock.now = 3.0
    assert runner.perform(retry) == m.VersionSeen(3)
    watch = m.AwaitVersion(newer_than=3, watch="c1")
    assert isinstance(runner.perform(watch), m.Pending) and reads == ["c1"]
    outcome["status"] = "applied"
    assert isinstance(runner.perform(watch), m.Pending)
    assert isinstance(runner.perform(watch), m.Pending) and reads == ["c1", "c1"]  # settled
    outcome["status"] = "aborted"
    assert runner.perform(m.AwaitVersion(newer_than=3, watch="c2")) == m.CohortAborted("too few")


def test_drop_hook_answers_before_the_request_is_performed() -> None:
    """GIVEN a drop hook for a point WHEN the request naming that point comes THEN the
    runner answers Vanished without performing it (nothing is read or written)."""
    p, clock = FakeParticipant(), Clock()
    runner = _runner(p, clock, drop=DropAt(DropPoint.INPUTS), blocking=False)
    assert runner.perform(m.AwaitPhase(config(), Phase.INPUTS, 1.0, DropPoint.INPUTS)) == (
        m.Vanished(DropPoint.INPUTS)
    )
    assert runner.perform(m.AwaitPhase(config(), Phase.KEYS, 1.0)) == m.Pending(0.25)


def test_random_drop_draws_once_per_cohort() -> None:
    draws = iter([0.1, 0.9])
    hook = RandomDrop(DropPoint.SHARES, 0.5, uniform=lambda: next(draws))
    assert not hook.vanishes("c1", DropPoint.KEYS)  # the draw: 0.1 < 0.5, at shares
    assert hook.vanishes("c1", DropPoint.SHARES)
    assert not hook.vanishes("c2", DropPoint.KEYS) and not hook.vanishes("c2", DropPoint.SHARES)


# --------------------------------------------------------------------------- parameter floors
@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"t": 1}, "threshold t=1 is not a strict majority"),
        ({"t": 2}, "threshold t=2 is not a strict majority"),  # 2 of 4 holders: a tie
        ({"t": 5}, "threshold t=5 is not a strict majority"),  # more than k + 1 holders
        ({"k": 2, "t": 3}, "degree k=2 is below this device's floor 3"),
    ],
)
def test_server_written_parameters_below_the_device_floors_are_refused(
    over: dict[str, Any], why: str
) -> None:
    """GIVEN a config whose threshold or degree a malicious server chose (t = 1 lets it
    rebuild a member's self-mask alone) WHEN the device finds it THEN it refuses the cohort,
    uncounted, and logs the reason (a warning whose reason names the parameter)."""
    base = config()
    assert base.secagg is not None
    cfg = replace(base, secagg=replace(base.secagg, **over))
    state, actions = m.join(settings_(), cfg)
    assert state.stage is Stage.IDLE and state.rounds == 0
    [leave] = left(actions)
    assert leave.outcome is Outcome.REFUSED and why in leave.reason
    assert any(
        a.level == logging.WARNING and why in a.reason for a in actions if isinstance(a, m.Say)
    )
    assert not any(isinstance(a, m.Advertise | m.CheckUserPrivacy) for a in actions)


def test_minimum_survivors_below_the_device_floor_is_refused() -> None:
    """GIVEN a config whose least reveal set, max(min_members, t), is below the device's own
    floor THEN the device refuses it; at or above the floor it goes on to admission."""
    state, actions = m.join(settings_(min_survivors=4), config(min_members=3))
    [leave] = left(actions)
    assert leave.outcome is Outcome.REFUSED and "minimum survivors 3" in leave.reason
    state, _ = m.join(settings_(min_survivors=3), config(min_members=1))  # t = 3 holds it
    assert state.stage is Stage.ADMISSION


def test_a_two_member_secure_cohort_is_refused_unless_the_device_accepts_it() -> None:
    """GIVEN a secure cohort of two (a server's Sybil and one victim, say; t = 2 of 2 holds
    the strict-majority floor) THEN a device on its default floor refuses it: the sum is
    the other member's update. A device started with ``--min-survivors 2`` takes part."""
    pair = dataclasses.replace(
        config(members=(ME, "peer"), min_members=2),
        secagg=SecAggParams(k=1, t=2, graph_seed="00", clip=1.0, bits=30, weight_cap=100),
    )
    assert m.DEVICE_MIN_SURVIVORS == settings_().min_survivors == 3
    _, actions = m.join(settings_(), pair)
    [leave] = left(actions)
    assert leave.outcome is Outcome.REFUSED and "minimum survivors 2" in leave.reason
    state, _ = m.join(settings_(min_survivors=2), pair)
    assert state.stage is Stage.ADMISSION


def test_the_graph_is_derived_by_the_device_not_read_from_the_config() -> None:
    """GIVEN a config carrying a server-written graph THEN parsing refuses it (unknown
    params), and the device's graph comes from graph_seed alone."""
    from fedcore.errors import IntegrityError
    from fedcore.messages import encode_config, parse_config

    cfg = config()
    doc = cfg.to_doc()
    doc["params"]["graph"] = {ME: ["b"]}
    import json

    with pytest.raises(IntegrityError, match="unknown params"):
        parse_config(json.dumps(doc).encode(), where="cfg")
    with pytest.raises(IntegrityError, match="unknown secagg parameters"):
        doc = cfg.to_doc()
        doc["params"]["secagg"]["neighbours"] = {ME: ["b"]}
        parse_config(json.dumps(doc).encode(), where="cfg")
    assert m.params_fault(parse_config(encode_config(cfg), where="cfg"), settings_()) is None


# --------------------------------------------------------------------------- round 3b
def test_the_device_signs_the_u3_it_read_and_waits_for_a_quorum_over_it() -> None:
    """GIVEN a device that read a valid U3 THEN it asks to sign exactly that U3, then to
    wait (as long as a phase wait) for t signatures over it, and reveals for it."""
    state, actions = m.step(at(Stage.INPUTS), m.ManifestRead(u3 := manifest(Phase.INPUTS)))
    assert actions == [m.SignInputs(u3)]
    state, actions = m.step(state, m.Written())
    assert actions == [m.AwaitQuorum(config(), u3, 70.0)]
    state, actions = m.step(state, m.QuorumSeen(("me", "b", "c")))
    assert state.stage is Stage.UNMASK and actions == [m.Unmask(manifest(Phase.SHARES), u3)]


@pytest.mark.parametrize(
    "signers",
    [(), ("me", "b"), ("me", "b", "ghost", "x"), ("me", "me", "b")],
    ids=["none", "below-t", "strangers", "duplicates"],
)
def test_a_quorum_below_t_of_u3_members_reveals_nothing(signers: tuple[str, ...]) -> None:
    """GIVEN a driver that reports fewer than t (= 3) distinct members of U3 as signers (a
    bug, or a forged quorum) THEN the machine's own gate abandons instead of revealing."""
    _, actions = m.step(at(Stage.QUORUM), m.QuorumSeen(signers))
    assert not any(isinstance(a, m.Unmask) for a in actions)
    [leave] = left(actions)
    assert leave.outcome is Outcome.ABANDONED and "(need 3, t=3)" in leave.reason


@pytest.mark.parametrize("why", [m.CohortEnded(), m.TimedOut(), m.Stopped()])
def test_no_quorum_over_u3_in_time_reveals_nothing(why: m.Observation) -> None:
    """GIVEN a device that signed its U3 WHEN the cohort ends, time runs out or it is
    stopped before t members signed the identical set THEN it leaves without revealing."""
    state, actions = m.step(at(Stage.QUORUM), why)
    assert state.stage is Stage.IDLE
    assert not any(isinstance(a, m.Unmask) for a in actions)
    [leave] = left(actions)
    assert leave.outcome is Outcome.ABANDONED and "revealing nothing" in leave.reason


@given(
    members=st.lists(st.sampled_from([ME, "b", "c", "d", "e", "ghost"]), max_size=8),
    t=st.integers(1, 5),
)
def test_quorum_fault_counts_distinct_members_of_u3_only(members: list[str], t: int) -> None:
    """GIVEN any reported signers and threshold THEN the gate passes iff at least t distinct
    members of U3 are among them (strangers and repeats never count)."""
    cfg = config()
    cfg = replace(cfg, secagg=replace(cfg.secagg, t=t))  # type: ignore[type-var]
    u3 = manifest(Phase.INPUTS, (ME, "b", "c", "d"))
    ok = m.quorum_fault(cfg, u3, tuple(members)) is None
    assert ok == (len(set(members) & {ME, "b", "c", "d"}) >= t)
