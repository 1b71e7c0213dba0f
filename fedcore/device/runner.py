"""Performs the device machine's actions against the bucket: one action in, one observation out.

``Runner.perform(action)`` does the I/O the machine asked for, through the
device's ``Participant`` (check-ins, discovery, manifests, plaintext uploads),
its ``SecureRound`` (the four rounds' crypto, opened when the machine first
advertises) and its ``LocalDevice`` (training and privacy terms, torch lives
behind it), and turns what happened into the machine's observation: a found
object, or the domain error mapped to ``Faulted`` / ``WriteConflict`` /
``Diverged``. Errors the protocol does not handle (a store that keeps failing,
a bug) propagate: the action was not performed and may be performed again.

Waits (``AwaitVersion``, ``AwaitCohort``, ``AwaitPhase``, ``AwaitQuorum``) run to an answer when
``blocking``; otherwise each call takes one look and answers ``Pending`` until
something is there or the wait's ``timeout_s`` (on the runner's clock, counted
from the first look) has passed. ``drive`` is the blocking loop.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedcore.device.faults import NO_DROP, DropHook
from fedcore.device.machine import (
    Action,
    Advertise,
    Allowed,
    AwaitCohort,
    AwaitPhase,
    AwaitQuorum,
    AwaitVersion,
    BookRelease,
    BudgetRefused,
    CheckedIn,
    CheckIn,
    CheckInExpired,
    CheckSampleBudget,
    CheckUserPrivacy,
    CohortAborted,
    CohortEnded,
    CohortFound,
    DeviceState,
    Diverged,
    Faulted,
    FaultKind,
    Leave,
    ManifestRead,
    Observation,
    PeerUntrusted,
    Pending,
    QuorumSeen,
    Request,
    Say,
    Settings,
    Share,
    SignInputs,
    Stopped,
    TimedOut,
    Train,
    Trained,
    Unmask,
    Uploaded,
    UploadMasked,
    UploadPlain,
    Vanished,
    VersionSeen,
    WriteConflict,
    Written,
    join,
    step,
)
from fedcore.device.secure import SecureRound
from fedcore.errors import (
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    StorageError,
    UnusableUpdateError,
)
from fedcore.messages import CohortConfig, Mode
from fedcore.participant import Participant, Ticket
from fedcore.secagg.protocol import CertificateError

LINES = "fedcore.device.lines"  # the logger of the device's user-visible lines
lines = logging.getLogger(LINES)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Update:
    """A trained update: the delta from the base version, and what it was trained on."""

    delta: Mapping[str, np.ndarray]
    num_samples: int
    loss: float = math.nan


class LocalDevice(Protocol):
    """What the runner asks of the device itself (``edge_client.device.Device`` with torch)."""

    def sample_budget_refusal(self) -> str | None:
        """The line refusing one more participation under sample-level DP; None to go on."""
        ...

    def user_dp_refusal(self, cfg: CohortConfig) -> str | None:
        """The line refusing ``cfg`` under this device's user-level DP terms; None to join."""
        ...

    def train_update(self, cfg: CohortConfig, *, budget_s: float | None = None) -> Update:
        """Train from ``cfg``'s base version (UnusableUpdateError: it diverged), for at most
        ``budget_s`` seconds (None: no limit; at least one step either way); the update's
        ``num_samples`` are the samples actually processed."""
        ...

    def book_release(self, rdp: Sequence[float]) -> None:
        """Spend a release's user-level RDP (the masked, noised update is out)."""
        ...


@dataclass
class SyntheticDevice:
    """A ``LocalDevice`` without privacy terms whose update comes from ``train`` (no torch)."""

    train: Callable[[CohortConfig], Update]

    def sample_budget_refusal(self) -> str | None:
        return None

    def user_dp_refusal(self, cfg: CohortConfig) -> str | None:
        return None

    def train_update(self, cfg: CohortConfig, *, budget_s: float | None = None) -> Update:
        return self.train(cfg)

    def book_release(self, rdp: Sequence[float]) -> None:
        pass


@dataclass(frozen=True)
class Polling:
    """How often the waits look again, in seconds."""

    pointer_s: float = 1.0  # first delay between pointer polls (doubles on errors)
    max_pointer_s: float = 10.0
    cohort_s: float = 0.5  # between looks for the cohort that took our check-in
    checkin_check_s: float = 5.0  # between checks that the check-in still stands
    phase_s: float = 0.5  # between reads of an open phase's manifest


class Runner:
    """Performs one device's actions (see the module docstring)."""

    def __init__(
        self,
        participant: Participant,
        local: LocalDevice,
        *,
        drop: DropHook = NO_DROP,
        polling: Polling | None = None,
        blocking: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        should_stop: Callable[[], bool] = lambda: False,
        on_leave: Callable[[Leave], None] = lambda leave: None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """``clock`` times the waits; ``wall`` is the device's clock of the epoch, compared
        with the server's deadlines (``Train.deadline``); ``rng`` jitters the back-off of
        a retried check-in (``AwaitVersion.delay_s``) by a factor in [0.5, 1.5]."""
        self.p = participant
        self.local = local
        self.drop = drop
        self.polling = polling or Polling()
        self.blocking = blocking
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.should_stop = should_stop
        self.on_leave = on_leave
        self.round: SecureRound | None = None  # the open secure cohort's secrets
        self.update: Update | None = None  # trained, not yet uploaded
        self.train_s: float | None = None  # how long training it took (reported on upload)
        self.cohort_id: str | None = None  # for the log lines' context
        self._wait: tuple[Request, float] | None = None  # the wait in progress, since when
        self._not_before = 0.0  # the wait's first look, after its jittered back-off
        self._settled: str | None = None  # a watched cohort whose result said applied
        self._delay = self.polling.pointer_s
        self._said_waiting = False
        self._ticket: Ticket | None = None
        self._checked_at = 0.0

    # -- the one entry point -------------------------------------------------------
    def perform(self, action: Action) -> Observation | None:
        """Do ``action``; its observation for a request, None for an effect."""
        match action:
            case Say():
                self._say(action.text, action.level, action.reason)
                return None
            case BookRelease():
                self.local.book_release(action.rdp)
                return None
            case Leave():
                self._leave(action)
                return None
        point = getattr(action, "vanish_point", None)
        if point is not None and self.drop.vanishes(action.cfg.cohort_id, point):  # type: ignore[union-attr]
            return Vanished(point)
        if isinstance(
            action, AwaitVersion | CheckSampleBudget | CheckIn | AwaitCohort | CheckUserPrivacy
        ):
            return self._outside(action)  # errors here are the device loop's, not a cohort's
        try:
            return self._in_cohort(action)
        except UnusableUpdateError as exc:
            return Diverged(str(exc))
        except AlreadyExistsError as exc:
            return WriteConflict(str(exc))
        except IntegrityError as exc:
            return Faulted(FaultKind.INTEGRITY, str(exc))
        except ProtocolError as exc:
            return Faulted(FaultKind.PROTOCOL, str(exc))
        except NotFoundError as exc:
            return Faulted(FaultKind.NOT_FOUND, str(exc))

    def close(self) -> None:
        """Forget the open cohort's secrets and update (the device stops or crashed)."""
        if self.round is not None:
            self.round.erase()
        self.round = self.update = None

    # -- outside a cohort ----------------------------------------------------------
    def _outside(self, action: Request) -> Observation:
        match action:
            case AwaitVersion():
                return self._await(action, self._look_for_version)
            case CheckSampleBudget():
                refusal = self.local.sample_budget_refusal()
                return Allowed() if refusal is None else BudgetRefused(refusal)
            case CheckIn():
                return CheckedIn(self.p.check_in(action.version))
            case AwaitCohort():
                return self._await(action, self._look_for_cohort)
            case CheckUserPrivacy():
                self.cohort_id = action.cfg.cohort_id
                refusal = self.local.user_dp_refusal(action.cfg)
                return Allowed() if refusal is None else BudgetRefused(refusal)
        raise TypeError(f"not a request: {action!r}")  # pragma: no cover

    def _look_for_version(self, req: AwaitVersion) -> Observation:
        try:
            pointer, changed = self.p.poll_latest()
        except NotFoundError:
            self._say("no global model yet (bucket not seeded); waiting")
            return self._back_off()
        except (StorageError, IntegrityError) as exc:
            # A malformed pointer is someone else's fault; the next write may fix it.
            self._say(f"cannot read the pointer ({exc}); backing off")
            return self._back_off()
        if (req.stop_at and pointer.version >= req.stop_at) or pointer.version > req.newer_than:
            return VersionSeen(pointer.version)
        if (aborted := self._watched_abort(req.watch)) is not None:
            return aborted
        if not self._said_waiting:
            self._say(f"waiting for a version newer than {req.newer_than}")
            self._said_waiting = True
        p = self.polling
        self._delay = p.pointer_s if changed else min(self._delay * 1.5, p.max_pointer_s)
        return Pending(self._delay)

    def _watched_abort(self, cid: str | None) -> Observation | None:
        """``CohortAborted`` if the completed cohort ``cid`` aborted; None while it has no
        result or applied (then it is not read again: its version is what we wait for)."""
        if cid is None or cid == self._settled:
            return None
        try:
            res = self.p.result(cid)
        except (StorageError, IntegrityError):
            return None  # the next poll looks again
        if res is None:
            return None
        if res.status == "aborted":
            return CohortAborted(res.reason)
        self._settled = cid
        return None

    def _back_off(self) -> Pending:
        retry, self._delay = self._delay, min(self._delay * 2, self.polling.max_pointer_s)
        return Pending(retry)

    def _look_for_cohort(self, req: AwaitCohort) -> Observation:
        assert self._ticket is not None  # set when the wait began
        cfg, self._ticket = self.p.find_cohort(self._ticket)
        if cfg is not None:
            return CohortFound(cfg)
        if self.clock() - self._checked_at >= self.polling.checkin_check_s:
            self._checked_at = self.clock()
            if not self.p.checkin_pending(self._ticket):
                # Taken (its cohort's config is written by now) or swept: one last look.
                cfg, self._ticket = self.p.find_cohort(self._ticket)
                return CheckInExpired() if cfg is None else CohortFound(cfg)
        return Pending(self.polling.cohort_s)

    def _look_for_phase(self, req: AwaitPhase) -> Observation:
        cid = req.cfg.cohort_id
        if (m := self.p.manifest(cid, req.phase)) is not None:
            return ManifestRead(m)
        if self.p.result(cid) is not None:
            return CohortEnded()
        return Pending(self.polling.phase_s)

    def _look_for_quorum(self, req: AwaitQuorum) -> Observation:
        if (signers := self._open_round().quorum(req.u3)) is not None:
            return QuorumSeen(tuple(signers))
        if self.p.result(req.cfg.cohort_id) is not None:
            return CohortEnded()
        return Pending(self.polling.phase_s)

    def _await(self, req: Request, look: Callable[[Request], Observation]) -> Observation:  # type: ignore[type-arg]
        now = self.clock()
        if self._wait is None or self._wait[0] != req:
            self._wait = (req, now)
            self._delay, self._said_waiting = self.polling.pointer_s, False
            self._ticket = getattr(req, "ticket", None)
            self._checked_at = now
            self._not_before = now + getattr(req, "delay_s", 0.0) * self.rng.uniform(0.5, 1.5)
        started = self._wait[1]
        timeout = getattr(req, "timeout_s", math.inf)
        while True:
            if self.should_stop():
                obs: Observation = Stopped()
            elif (left := self._not_before - self.clock()) > 0:
                obs = Pending(left)  # backing off before checking in again
            elif self.clock() - started >= timeout:
                obs = TimedOut()
            else:
                obs = look(req)
            if not isinstance(obs, Pending):
                self._wait = None
                return obs
            if not self.blocking:
                return obs
            self.sleep(obs.retry_s)

    # -- in a cohort ---------------------------------------------------------------
    def _in_cohort(self, action: Request) -> Observation:
        match action:
            case Advertise():
                self.cohort_id = action.cfg.cohort_id
                self.round = SecureRound(self.p, action.cfg)
                try:  # before anything is published: whose keys are whose
                    self.round.check_certificates()
                except CertificateError as exc:
                    return PeerUntrusted(str(exc))
                self.round.advertise()
                return Written()
            case AwaitPhase():
                return self._await(action, self._look_for_phase)
            case Share():
                self._open_round().share(action.u1)
                return Written()
            case Train():
                self.cohort_id = action.cfg.cohort_id
                t0 = self.clock()
                self.update = self.local.train_update(
                    action.cfg, budget_s=self._train_budget(action)
                )
                self.train_s = max(0.0, self.clock() - t0)
                return Trained(self.update.num_samples)
            case UploadMasked():
                rnd, update = self._open_round(), self._trained()
                rnd.upload(
                    action.u2, update.delta, num_samples=update.num_samples, train_s=self.train_s
                )
                self.update = None
                rdp = None if rnd.privacy_rdp is None else tuple(rnd.privacy_rdp)
                return Uploaded(rnd.clipped, rnd.dp_norm, rdp)
            case SignInputs():
                self._open_round().sign_inputs(action.u3)
                return Written()
            case AwaitQuorum():
                return self._await(action, self._look_for_quorum)
            case Unmask():
                self._open_round().unmask(action.u2, action.u3)
                return Written()
            case UploadPlain():
                update = self._trained()
                self.p.upload_plain(
                    action.cfg, dict(update.delta), num_samples=update.num_samples,
                    loss=update.loss, train_s=self.train_s,
                )  # fmt: skip
                self.update = None
                return Written()
        raise TypeError(f"not a request: {action!r}")  # pragma: no cover

    def _train_budget(self, req: Train) -> float | None:
        """Seconds training may take: the inputs limit less the margin, and no later than the
        inputs deadline less the margin (on this device's clock of the epoch)."""
        budgets = [] if req.budget_s is None else [req.budget_s]
        if req.deadline is not None:
            budgets.append(req.deadline - self.wall())
        return max(0.0, min(budgets)) if budgets else None

    def _open_round(self) -> SecureRound:
        if self.round is None:
            raise ProtocolError("no secure round is open (the machine never advertised)")
        return self.round

    def _trained(self) -> Update:
        if self.update is None:
            raise ProtocolError("nothing trained to upload")
        return self.update

    # -- effects -------------------------------------------------------------------
    def _say(self, text: str, level: int = logging.INFO, reason: str = "") -> None:
        extra = {"client_id": self.p.client_id, "cohort_id": self.cohort_id}
        if reason:
            extra["reason"] = reason
        lines.log(level, text, extra=extra)

    def _leave(self, leave: Leave) -> None:
        self.close()
        self.cohort_id = None
        log.info(
            "participation ended",
            extra={"client_id": self.p.client_id, "cohort_id": leave.cohort_id,
                   "outcome": leave.outcome.value, "reason": leave.reason},
        )  # fmt: skip
        self.on_leave(leave)


def drive(
    runner: Runner, state: DeviceState, actions: list[Action], *, one_cohort: bool = False
) -> DeviceState:
    """The blocking loop: perform each step's actions, feed the answer back, until DONE
    (or, with ``one_cohort``, until the first ``Leave``). The runner's cohort secrets are
    erased on the way out, however it ends."""
    try:
        while actions:
            obs = None
            for action in actions:
                obs = runner.perform(action)
                if one_cohort and isinstance(action, Leave):
                    return state
            if obs is None:
                break  # the machine is DONE: its last actions were effects
            state, actions = step(state, obs)
        return state
    finally:
        runner.close()


def run_cohort(
    participant: Participant,
    cfg: CohortConfig,
    train: Callable[[CohortConfig], Update],
    *,
    drop: DropHook = NO_DROP,
    polling: Polling | None = None,
    slack_s: float = 30.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> DeviceState:
    """Play one cohort whose config is already known (tests and benchmarks); the returned
    state's ``outcome`` says how it ended."""
    settings = Settings(participant.client_id, Mode(participant.mode), slack_s=slack_s)
    state, actions = join(settings, cfg)
    runner = Runner(
        participant, SyntheticDevice(train), drop=drop, polling=polling, should_stop=should_stop
    )
    runner.cohort_id = cfg.cohort_id
    return drive(runner, state, actions, one_cohort=True)
