"""The device's side of the cohort protocol as one pure step function (no I/O, no clock).

``step(state, observation) -> (state, actions)``: the state is frozen, the
observation says what the last request found (a version, a cohort, a
manifest, a write that lost, a fault), and the actions say what to do next:
zero or more *effects* (``Say`` a line, ``BookRelease``, ``Leave`` a cohort),
then at most one *request* whose answer is the next observation. The request
for a stage is computed in one place (``request_for``), so a driver that got
no answer yet (``Pending``) simply performs the same request again.

Stages (one function each, looked up in ``HANDLERS``; plaintext skips the keys
and shares rounds and uploads its update in the clear)::

  IDLE --version--> BUDGET --allowed--> CHECK_IN --written--> CHECKED_IN
  --cohort found--> ADMISSION --allowed--> ADVERTISE --written--> KEYS
  --U1--> SHARE --written--> TRAIN --trained--> SHARES --U2--> UPLOAD
  --uploaded--> INPUTS --U3--> SIGN --written--> QUORUM --t signatures over U3-->
  UNMASK --written--> IDLE ... DONE
  (plaintext: ADMISSION --> TRAIN --> UPLOAD_PLAIN --> IDLE)

Every way out of a cohort ends in one ``Leave(outcome, reason)``: completed,
abandoned (a fault, a lost write, an unusable update, a manifest that lies or
leaves us out, the cohort ended or time ran out before a phase closed),
dropped (the fault-injection hook made the device vanish at a ``DropPoint``)
or refused (the cohort's mode or user-level DP is not what this device
accepts, or a peer's operator certificate is missing or invalid). The safety rules live here, single-sourced: a device only masks
for the members of a checked U2, only reveals shares after a checked U3 that
counts it and that at least ``t`` of U3's members signed identically
(``quorum_fault``; Bonawitz et al. 2017, section 4, ConsistencyCheck), and
never acts on a manifest of another cohort, another phase or with strangers in
it (``manifest_fault``, ``not_admitted``).

After a completed participation the device waits for a version newer than
the cohort's base (and checks in again if the cohort's result says aborted:
``CohortAborted``); after any other way out it checks in again at the same
version after an exponential back-off that the ``AwaitVersion`` request carries
(``delay_s``; the runner jitters it). Local training is time-boxed: ``Train``
carries the inputs phase's deadline less a margin for masking and the upload.

Time is the driver's business: a waiting request carries its ``timeout_s``
and the driver answers ``TimedOut`` once it has waited that long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum, StrEnum
from typing import TYPE_CHECKING

from fedcore import layout
from fedcore.layout import Phase
from fedcore.messages import CohortConfig, Manifest, Mode
from fedcore.secagg import admission
from fedcore.secagg.graph import COLLUDERS

if TYPE_CHECKING:
    from fedcore.participant import Ticket


# --------------------------------------------------------------------------- vocabulary
class Stage(Enum):
    """What the device is waiting for (each stage has exactly one request outstanding)."""

    IDLE = "idle"  # a version to train from
    BUDGET = "budget"  # whether the sample-level DP budget allows one more participation
    CHECK_IN = "check_in"  # the check-in being written
    CHECKED_IN = "checked_in"  # a cohort naming the check-in
    ADMISSION = "admission"  # whether the cohort meets this device's user-level DP terms
    ADVERTISE = "advertise"  # round 1: the public keys being written
    KEYS = "keys"  # U1
    SHARE = "share"  # round 2: the encrypted shares being written
    TRAIN = "train"  # local training
    SHARES = "shares"  # U2
    UPLOAD = "upload"  # round 3: the masked input being written
    INPUTS = "inputs"  # U3
    SIGN = "sign"  # round 3b: our signature over U3 being written
    QUORUM = "quorum"  # t members of U3 signed the identical set
    UNMASK = "unmask"  # round 4: the revealed shares being written
    UPLOAD_PLAIN = "upload_plain"  # plaintext cohorts: the update being written
    DONE = "done"  # stopped: until_version, max_rounds, a budget refusal, or asked to


class Outcome(StrEnum):
    """How one participation ended (printed as its value: ``c00000003: completed``)."""

    COMPLETED = "completed"
    ABANDONED = "abandoned"
    DROPPED = "dropped"
    REFUSED = "refused"


class DropPoint(StrEnum):
    """Where a dropout experiment may make the device vanish from a secure cohort."""

    KEYS = "keys"  # before advertising keys
    SHARES = "shares"  # after sharing them
    INPUTS = "inputs"  # after uploading the masked input


DROP_POINTS = tuple(p.value for p in DropPoint)
_DROP_LINE = {
    DropPoint.KEYS: "dropping out before advertising keys",
    DropPoint.SHARES: "dropping out after sharing keys",
    DropPoint.INPUTS: "dropping out after uploading",
}


class FaultKind(Enum):
    """Which error the driver caught while performing a request."""

    INTEGRITY = "integrity"  # something read is malformed or lies (IntegrityError)
    PROTOCOL = "protocol"  # well-formed but not allowed now (ProtocolError)
    NOT_FOUND = "not_found"  # an object the protocol needs is missing (NotFoundError)


# The device's own floors for a secure cohort's parameters (DESIGN.md section 4, step 2).
# The server writes the config; a device that took its threshold and minimum on trust
# would let a malicious server set t = 1 and read a chosen member's update alone.
DEVICE_MIN_DEGREE = 8  # neighbours per member (capped at n - 1: all pairs in a small cohort)
# A sum of two inputs is the other member's update to either of them (and to a server that
# forms a cohort of its own Sybil and one victim), so by default a device reveals for three
# or more; a deployment that wants cohorts of two says so explicitly (``--min-survivors 2``).
DEVICE_MIN_SURVIVORS = 3
DEVICE_COLLUDERS = COLLUDERS  # neighbours that may side with the server (``params_fault``)


@dataclass(frozen=True)
class Settings:
    """The device's standing terms (``edge_client``'s LoopSettings, minus polling).

    ``min_degree`` and ``min_survivors`` are the floors a secure cohort's config must
    meet (``params_fault``); they are the device's own, never read from the bucket.
    """

    client_id: str
    mode: Mode
    until_version: int = 0  # stop once the global model reaches this version (0: never)
    max_rounds: int = 0  # stop after this many counted participations (0: no limit)
    wait_for_new_version: bool = True  # never train twice from the same base
    cohort_timeout_s: float = 600.0  # how long one check-in waits for a cohort
    slack_s: float = 30.0  # beyond the cohort's summed phase limits, per phase wait
    retry_s: float = 2.0  # first back-off before checking in again after an uncounted cohort
    max_retry_s: float = 60.0  # the back-off doubles per retry up to this (the runner jitters it)
    train_margin_s: float = 5.0  # of the inputs deadline kept for masking and the upload
    min_degree: int = DEVICE_MIN_DEGREE  # a secure cohort's k at least min(this, n - 1)
    min_survivors: int = DEVICE_MIN_SURVIVORS  # a secure cohort's min_members at least this
    colluders: int = DEVICE_COLLUDERS  # t must hold against this many colluding neighbours


@dataclass(frozen=True)
class DeviceState:
    settings: Settings
    stage: Stage = Stage.IDLE
    last_base: int = -1  # base version of the last cohort joined
    rounds: int = 0  # counted participations
    version: int = -1  # the version to check in at
    ticket: Ticket | None = None
    cfg: CohortConfig | None = None
    u1: Manifest | None = None
    u2: Manifest | None = None
    u3: Manifest | None = None
    num_samples: int = 0  # of the trained update
    outcome: Outcome | None = None  # of the last participation
    # After a participation that cannot have produced a version (the device was not
    # counted, or its cohort aborted) the device checks in again at the same version;
    # after a completed one it waits for a newer version, watching that cohort's result.
    retry: bool = False  # the last participation produced no version: same base again
    retries: int = 0  # consecutive such participations (the back-off's exponent)
    backoff_s: float = 0.0  # to wait before the next look for a version (0: none)
    watch: str | None = None  # the completed cohort whose result decides (None: none)

    @property
    def secure(self) -> bool:
        return self.cfg is not None and self.cfg.mode is Mode.SECAGG

    @property
    def cid(self) -> str:
        assert self.cfg is not None  # a cohort stage always holds its config
        return self.cfg.cohort_id


# -- requests: the driver answers each with one observation -------------------------
@dataclass(frozen=True)
class AwaitVersion:
    newer_than: int  # answer with the first version above this (-1: any)
    stop_at: int = 0  # ... or at/above this one (0: none)
    delay_s: float = 0.0  # back off this long (jittered by the runner) before the first look
    watch: str | None = None  # answer CohortAborted if this cohort's result says aborted


@dataclass(frozen=True)
class CheckSampleBudget:
    pass


@dataclass(frozen=True)
class CheckIn:
    version: int


@dataclass(frozen=True)
class AwaitCohort:
    ticket: Ticket
    timeout_s: float


@dataclass(frozen=True)
class CheckUserPrivacy:
    cfg: CohortConfig


@dataclass(frozen=True)
class Advertise:
    cfg: CohortConfig
    vanish_point: DropPoint | None = DropPoint.KEYS  # the drop hook is asked first


@dataclass(frozen=True)
class AwaitPhase:
    cfg: CohortConfig
    phase: Phase
    timeout_s: float
    vanish_point: DropPoint | None = None


@dataclass(frozen=True)
class Share:
    u1: Manifest


@dataclass(frozen=True)
class Train:
    """Train from ``cfg``'s base version, stopping in time for the inputs deadline.

    ``deadline`` is the inputs phase's close on the server's clock (seconds since the
    epoch, from ``created_at`` or the last manifest's ``closed_at`` plus the phase
    limits), less the machine's margin for masking and the upload; the trainer runs
    as many steps as fit before it (at least one). None: no time box.
    """

    cfg: CohortConfig
    vanish_point: DropPoint | None = None
    deadline: float | None = None
    budget_s: float | None = None  # the most training may take from its start


@dataclass(frozen=True)
class UploadMasked:
    u2: Manifest


@dataclass(frozen=True)
class SignInputs:
    """Sign U3 (cohort id and sorted members): the one input set this device reveals for."""

    u3: Manifest


@dataclass(frozen=True)
class AwaitQuorum:
    """Read U3's members' signatures until ``t`` of them signed exactly ``u3``."""

    cfg: CohortConfig
    u3: Manifest
    timeout_s: float


@dataclass(frozen=True)
class Unmask:
    u2: Manifest
    u3: Manifest


@dataclass(frozen=True)
class UploadPlain:
    cfg: CohortConfig


Request = (
    AwaitVersion | CheckSampleBudget | CheckIn | AwaitCohort | CheckUserPrivacy | Advertise
    | AwaitPhase | Share | Train | UploadMasked | SignInputs | AwaitQuorum | Unmask | UploadPlain
)  # fmt: skip


# -- effects: performed in order, no answer -----------------------------------------
@dataclass(frozen=True)
class Say:
    """A line for the device's log (the terminal, for ``python -m edge_client run``)."""

    text: str
    level: int = logging.INFO
    reason: str = ""  # the underlying error, for structured logs


@dataclass(frozen=True)
class BookRelease:
    """The masked, noised update is out: spend its user-level RDP (worst case)."""

    rdp: tuple[float, ...]


@dataclass(frozen=True)
class Leave:
    """The participation in ``cohort_id`` is over: forget its secrets, report ``outcome``."""

    cohort_id: str
    base_version: int
    outcome: Outcome
    reason: str = ""


Effect = Say | BookRelease | Leave
Action = Request | Effect


# -- observations ----------------------------------------------------------------------
@dataclass(frozen=True)
class Pending:
    """Nothing yet (a step-wise driver's single look); the same request stays outstanding."""

    retry_s: float = 0.0


@dataclass(frozen=True)
class Stopped:
    """The device was asked to stop while waiting."""


@dataclass(frozen=True)
class TimedOut:
    """The request's ``timeout_s`` passed without an answer."""


@dataclass(frozen=True)
class VersionSeen:
    version: int


@dataclass(frozen=True)
class Allowed:
    """A privacy check passed (sample budget, user-level DP terms)."""


@dataclass(frozen=True)
class BudgetRefused:
    """A privacy check failed; ``reason`` is the line to log."""

    reason: str


@dataclass(frozen=True)
class CheckedIn:
    ticket: Ticket


@dataclass(frozen=True)
class CohortFound:
    cfg: CohortConfig


@dataclass(frozen=True)
class CheckInExpired:
    """The check-in is gone (swept) and no cohort names it."""


@dataclass(frozen=True)
class ManifestRead:
    manifest: Manifest


@dataclass(frozen=True)
class QuorumSeen:
    """Members of U3 whose valid signatures are over exactly the U3 this device signed."""

    signers: tuple[str, ...]


@dataclass(frozen=True)
class CohortEnded:
    """The cohort's result exists, so the awaited phase will never close."""


@dataclass(frozen=True)
class Written:
    """The request's write-once object(s) are in the bucket."""


@dataclass(frozen=True)
class Trained:
    num_samples: int


@dataclass(frozen=True)
class CohortAborted:
    """The watched cohort's result says it aborted: no version will come of it."""

    reason: str


@dataclass(frozen=True)
class Uploaded:
    """The masked input is in the bucket; what the upload reported."""

    clipped: int = 0  # coordinates the quantizer clipped
    dp_norm: float | None = None  # L2 norm before the user-level DP clip
    privacy_rdp: tuple[float, ...] | None = None  # user-level RDP this release may spend


@dataclass(frozen=True)
class Diverged:
    """This device's own update is unusable (non-finite): sit the cohort out."""

    reason: str


@dataclass(frozen=True)
class WriteConflict:
    """A write-once key of ours already holds an object (an earlier run, or a forgery)."""

    reason: str


@dataclass(frozen=True)
class Faulted:
    """Something read is malformed, lies, is missing, or is not allowed now."""

    kind: FaultKind
    reason: str


@dataclass(frozen=True)
class PeerUntrusted:
    """A member's operator certificate is missing or invalid (answers ``Advertise``, before
    anything is published): the server may have swapped an identity, so refuse the cohort."""

    reason: str


@dataclass(frozen=True)
class Vanished:
    """The drop hook made the device vanish at ``point`` (dropout experiments)."""

    point: DropPoint


Observation = (
    Pending | Stopped | TimedOut | VersionSeen | Allowed | BudgetRefused | CheckedIn | CohortFound
    | CheckInExpired | ManifestRead | QuorumSeen | CohortEnded | Written | Trained | Uploaded
    | Diverged | WriteConflict | Faulted | Vanished | CohortAborted | PeerUntrusted
)  # fmt: skip


class UnexpectedObservation(ValueError):
    """The driver fed an observation that does not answer the outstanding request (a bug)."""


# --------------------------------------------------------------------------- pure rules
def manifest_fault(m: Manifest, cfg: CohortConfig, phase: Phase) -> str | None:
    """Why manifest ``m`` cannot be trusted as ``phase`` of ``cfg``; None if it can.

    A manifest is the function's word on who counts; one that names another
    cohort or phase, or a stranger, would make the device mask with, or reveal
    shares for, the wrong set, so the device abandons the cohort instead.
    """
    key = layout.state_key(cfg.cohort_id, phase)
    if m.cohort_id != cfg.cohort_id or m.phase != phase.value:
        return (
            f"{key}: manifest names {m.cohort_id}/{m.phase}, expected {cfg.cohort_id}/{phase.value}"
        )
    if strangers := sorted(set(m.members) - set(cfg.members)):
        return f"{key}: manifest names non-members {strangers}"
    return None


def not_admitted(m: Manifest, cfg: CohortConfig, me: str) -> str | None:
    """Why member ``me`` cannot go on past the closed phase ``m``; None if it can."""
    if me not in m.members:
        return f"{cfg.cohort_id}: not counted in {m.phase} (late or rejected)"
    if len(m.members) < cfg.min_members:
        return f"{cfg.cohort_id}: only {len(m.members)} members in {m.phase}; the cohort aborts"
    return None


def quorum_fault(cfg: CohortConfig, u3: Manifest, signers: tuple[str, ...]) -> str | None:
    """Why ``signers`` are not enough to reveal for ``u3``; None if they are.

    The runner checked each signature (``fedcore.secagg.admission.signed_quorum``); this
    is the machine's own gate before round 4: at least ``admission.quorum_size`` (``t``,
    a strict majority of a member's k + 1 holders, ``params_fault``) distinct members of U3.
    """
    t = cfg.secagg.t if cfg.secagg is not None else 1
    need = max(1, admission.quorum_size(len(cfg.members), t))
    counted = set(signers) & set(u3.members)
    if len(counted) < need:
        return (
            f"{cfg.cohort_id}: only {len(counted)} members of the input set signed it "
            f"(need {need}, t={t}); revealing nothing"
        )
    return None


def params_fault(cfg: CohortConfig, settings: Settings) -> str | None:
    """Why this device refuses a secure cohort's server-written parameters; None if it accepts.

    Security first: every number here comes from an object the server wrote, so each is
    checked against what the protocol needs and the device's own floors, not trusted.

    - ``t`` must exceed ``(k + 1 + settings.colluders) / 2``, a strict majority of a
      member's ``k + 1`` share holders (its neighbours and itself) after that many of
      them side with the server: honest holders reveal one kind of share per member,
      and only then is "never both" binding against a server that shows different
      holders different input sets (``graph.default_threshold``); ``t = 1`` would let
      the server alone rebuild a chosen member's self-mask.
    - ``k`` at least ``min(settings.min_degree, n - 1)``: too few neighbours and a
      handful of colluders surround a member (Bell et al. 2020, section 3).
    - the least number of inputs a member reveals for, ``max(min_members, t)``, at
      least ``settings.min_survivors``.
    - the neighbour graph is the one this device derives from the public ``graph_seed``
      (``SecAggParams.graph``); the config carries no graph the server could swap, and
      the derivation must give this device at least ``k`` neighbours (cap ``n - 1``).
    """
    p = cfg.secagg
    if p is None:
        return None
    n = len(cfg.members)
    holders = p.k + 1
    if not (2 * p.t > holders + settings.colluders and p.t <= holders):
        return (
            f"threshold t={p.t} is not a strict majority of the k+1={holders} share holders "
            f"once {settings.colluders} of them collude with the server"
        )
    floor_k = min(settings.min_degree, max(1, n - 1))
    if p.k < floor_k:
        return f"degree k={p.k} is below this device's floor {floor_k} for {n} members"
    # A member never reveals for fewer than max(min_members, t) inputs (SecureRound.unmask).
    if (least := max(cfg.min_members, p.t)) < settings.min_survivors:
        return (
            f"minimum survivors {least} (min_members {cfg.min_members}, t={p.t}) is below "
            f"this device's floor {settings.min_survivors}"
        )
    me = settings.client_id
    if me in cfg.members:
        try:
            mine = p.graph(sorted(cfg.members))[me]
        except ValueError as exc:
            return f"cannot derive the neighbour graph from graph_seed: {exc}"
        if len(mine) < min(p.k, n - 1):
            return f"the graph derived from graph_seed gives {len(mine)} neighbours < k={p.k}"
    return None


def not_a_member(cfg: CohortConfig, me: str) -> str | None:
    """A config that does not name this device is not ours to play (IntegrityError text)."""
    if me not in cfg.members:
        return f"{layout.config_key(cfg.cohort_id)}: {me} is not a member"
    return None


def phase_wait_s(cfg: CohortConfig, slack_s: float) -> float:
    """How long a member waits for one phase to close: every phase's limit plus slack."""
    return sum(cfg.phase_s.values()) + slack_s


def retry_backoff_s(settings: Settings, retries: int) -> float:
    """The back-off before checking in again after ``retries`` uncounted participations in a
    row: exponential from ``retry_s``, bounded by ``max_retry_s`` (the runner jitters it, so
    the devices of an aborted cohort do not all check in at the same instant)."""
    if retries < 1:
        return 0.0
    return min(settings.retry_s * 2.0 ** min(retries - 1, 30), settings.max_retry_s)


def train_box(
    cfg: CohortConfig, u1: Manifest | None, margin_s: float
) -> tuple[float | None, float | None]:
    """(deadline, budget_s) for local training: when the inputs phase closes at the latest
    (server clock: ``created_at``, or U1's ``closed_at``, plus the limits of the phases up
    to inputs) less the margin, and the inputs phase's own limit less the margin (the most
    training may take counted from its start, since the phase before may close early).

    The margin keeps time for masking and the upload: ``margin_s``, but at most 30% of the
    inputs limit so a short round still leaves time to train. (None, None): the config
    sets no inputs limit.
    """
    inputs_s = cfg.phase_s.get(Phase.INPUTS.value)
    if inputs_s is None:
        return None, None
    # The sweeper's order (fedcore.server.vocabulary.PHASES): plaintext has inputs only.
    before = (Phase.KEYS, Phase.SHARES) if cfg.mode is Mode.SECAGG else ()
    start = cfg.created_at
    if u1 is not None and before:
        start, before = u1.closed_at, (Phase.SHARES,)
    limits = inputs_s + sum(cfg.phase_s.get(p.value, 0.0) for p in before)
    margin = min(margin_s, 0.3 * inputs_s)
    return start + limits - margin, inputs_s - margin


# --------------------------------------------------------------------------- the machine
Transition = tuple[DeviceState, list[Effect]]


def start(settings: Settings) -> tuple[DeviceState, list[Action]]:
    """The first state and request: wait for a version to train from."""
    state = DeviceState(settings)
    return state, _with_request(state, [])


def join(settings: Settings, cfg: CohortConfig) -> tuple[DeviceState, list[Action]]:
    """Enter as if ``cfg`` had just been found (one cohort, for tests and benchmarks)."""
    return step(replace(DeviceState(settings), stage=Stage.CHECKED_IN), CohortFound(cfg))


def request_for(state: DeviceState) -> Request | None:
    """The one request outstanding in ``state`` (None once DONE)."""
    s, cfg = state.settings, state.cfg
    match state.stage:
        case Stage.IDLE:
            if not s.wait_for_new_version:
                newer = -1
            elif state.retry:  # nothing came of the last cohort: its base version again
                newer = state.last_base - 1
            else:
                newer = state.last_base
            return AwaitVersion(
                newer_than=newer, stop_at=s.until_version, delay_s=state.backoff_s,
                watch=state.watch,
            )  # fmt: skip
        case Stage.BUDGET:
            return CheckSampleBudget()
        case Stage.CHECK_IN:
            return CheckIn(state.version)
        case Stage.CHECKED_IN:
            assert state.ticket is not None
            return AwaitCohort(state.ticket, s.cohort_timeout_s)
        case Stage.DONE:
            return None
    assert cfg is not None
    wait_s = phase_wait_s(cfg, s.slack_s)
    match state.stage:
        case Stage.ADMISSION:
            return CheckUserPrivacy(cfg)
        case Stage.ADVERTISE:
            return Advertise(cfg)
        case Stage.KEYS:
            return AwaitPhase(cfg, Phase.KEYS, wait_s)
        case Stage.SHARE:
            assert state.u1 is not None
            return Share(state.u1)
        case Stage.TRAIN:
            deadline, budget_s = train_box(cfg, state.u1, s.train_margin_s)
            point = DropPoint.SHARES if state.secure else None
            return Train(cfg, point, deadline, budget_s)
        case Stage.SHARES:
            return AwaitPhase(cfg, Phase.SHARES, wait_s)
        case Stage.UPLOAD:
            assert state.u2 is not None
            return UploadMasked(state.u2)
        case Stage.INPUTS:
            return AwaitPhase(cfg, Phase.INPUTS, wait_s, DropPoint.INPUTS)
        case Stage.SIGN:
            assert state.u3 is not None
            return SignInputs(state.u3)
        case Stage.QUORUM:
            assert state.u3 is not None
            return AwaitQuorum(cfg, state.u3, wait_s)
        case Stage.UNMASK:
            assert state.u2 is not None and state.u3 is not None
            return Unmask(state.u2, state.u3)
        case Stage.UPLOAD_PLAIN:
            return UploadPlain(cfg)
    raise AssertionError(f"no request for {state.stage}")  # pragma: no cover


def step(state: DeviceState, obs: Observation) -> tuple[DeviceState, list[Action]]:
    """Advance ``state`` by the answer ``obs`` to its outstanding request.

    Returns the new state and the actions to perform in order: effects, then
    the next request (none once DONE). ``Pending`` changes nothing.
    """
    if isinstance(obs, Pending):
        return state, _with_request(state, [])
    handler = _HANDLERS.get((state.stage, type(obs)))
    if handler is None and state.stage not in _OUTSIDE_COHORT:
        handler = _COHORT_HANDLERS.get(type(obs))
    if handler is None:
        raise UnexpectedObservation(f"{type(obs).__name__} does not answer {state.stage}")
    if isinstance(obs, Vanished) and obs.point is not _vanish_point(state):
        raise UnexpectedObservation(f"cannot vanish at {obs.point} in {state.stage}")
    new, effects = handler(state, obs)
    return new, _with_request(new, effects)


def expects(stage: Stage) -> tuple[type, ...]:
    """The observation types that answer ``stage``'s request (Pending, and ``Vanished``
    where the request names a ``vanish_point``, aside)."""
    own = tuple(t for (st, t) in _HANDLERS if st is stage)
    if stage in _OUTSIDE_COHORT:
        return own
    return own + tuple(t for t in _COHORT_HANDLERS if t is not Vanished)


def _vanish_point(state: DeviceState) -> DropPoint | None:
    """Where the drop hook may answer instead of the outstanding request, if anywhere."""
    return getattr(request_for(state), "vanish_point", None)


def _with_request(state: DeviceState, effects: list[Effect]) -> list[Action]:
    req = request_for(state)
    return [*effects] if req is None else [*effects, req]


# -- outside a cohort ------------------------------------------------------------------
def _idle(state: DeviceState, obs: VersionSeen) -> Transition:
    stop_at = state.settings.until_version
    if stop_at and obs.version >= stop_at:
        return replace(state, stage=Stage.DONE), [
            Say(f"global model reached version {obs.version}; done")
        ]
    # The wait is over: no back-off for a check-in that merely times out from here, and a
    # newer version than the last cohort's base means the population moved on.
    retries = 0 if obs.version > state.last_base else state.retries
    return replace(
        state, stage=Stage.BUDGET, version=obs.version, backoff_s=0.0, watch=None, retries=retries
    ), []


def _cohort_aborted(state: DeviceState, obs: CohortAborted) -> Transition:
    """The cohort this device completed aborted after all: check in again at its base."""
    new = _retrying(replace(state, watch=None))
    line = (
        f"{state.watch}: aborted ({obs.reason}); checking in again at version "
        f"{state.last_base} in about {new.backoff_s:.0f}s"
    )
    return new, [Say(line)]


def _retrying(state: DeviceState) -> DeviceState:
    """One more participation that produced no version: same base, longer back-off."""
    retries = state.retries + 1
    return replace(
        state, retry=True, retries=retries, backoff_s=retry_backoff_s(state.settings, retries)
    )


def _stop(state: DeviceState, obs: Stopped) -> Transition:
    return replace(state, stage=Stage.DONE), []


def _budget_allows(state: DeviceState, obs: Allowed) -> Transition:
    return replace(state, stage=Stage.CHECK_IN), []


def _budget_refused(state: DeviceState, obs: BudgetRefused) -> Transition:
    return replace(state, stage=Stage.DONE), [Say(obs.reason)]


def _checked_in(state: DeviceState, obs: CheckedIn) -> Transition:
    return replace(state, stage=Stage.CHECKED_IN, ticket=obs.ticket), [
        Say(f"checked in at version {state.version}; waiting for a cohort")
    ]


def _expired(state: DeviceState, obs: CheckInExpired) -> Transition:
    return replace(state, stage=Stage.IDLE, ticket=None), [
        Say("check-in expired without a cohort; checking in again")
    ]


def _no_cohort(state: DeviceState, obs: TimedOut) -> Transition:
    return replace(state, stage=Stage.IDLE, ticket=None), []  # check in again


def _found(state: DeviceState, obs: CohortFound) -> Transition:
    cfg = obs.cfg
    joined = replace(state, cfg=cfg, ticket=None, u1=None, u2=None, u3=None, num_samples=0)
    said = [
        Say(
            f"joined {cfg.cohort_id} ({len(cfg.members)} members, base version "
            f"{cfg.base_version}, {cfg.mode.value})"
        )
    ]
    if cfg.mode != state.settings.mode:
        said.append(
            Say(
                f"refusing {cfg.cohort_id}: it runs {cfg.mode.value!r} but this device runs "
                f"{state.settings.mode.value!r}"
            )
        )
        return _leave(joined, Outcome.REFUSED, said, reason=f"cohort runs {cfg.mode.value!r}")
    if (why := params_fault(cfg, state.settings)) is not None:
        # Logged with its reason (Say carries it to the structured log), never counted.
        said.append(Say(f"refusing {cfg.cohort_id}: {why}", logging.WARNING, why))
        return _leave(joined, Outcome.REFUSED, said, reason=why)
    return replace(joined, stage=Stage.ADMISSION), said


def _admitted(state: DeviceState, obs: Allowed) -> Transition:
    # A config that does not name this device is not its to play, plaintext included
    # (test_no_answer_sequence_breaks_the_safety_rules found a plaintext device training for a stranger cohort).
    if (fault := not_a_member(state.cfg, state.settings.client_id)) is not None:  # type: ignore[arg-type]
        return _abandon(state, fault)
    if not state.secure:
        return replace(state, stage=Stage.TRAIN), []
    return replace(state, stage=Stage.ADVERTISE), []


def _dp_refused(state: DeviceState, obs: BudgetRefused) -> Transition:
    """The cohort's user-level DP is weaker than this device's terms, or the budget is spent:
    a device stops joining (the server's DP settings do not change between cohorts)."""
    new, effects = _leave(state, Outcome.REFUSED, [Say(obs.reason)], reason=obs.reason)
    return replace(new, stage=Stage.DONE), effects


# -- in a cohort -----------------------------------------------------------------------
def _advertised(state: DeviceState, obs: Written) -> Transition:
    return replace(state, stage=Stage.KEYS), []


def _untrusted(state: DeviceState, obs: PeerUntrusted) -> Transition:
    """Refuse (uncounted, nothing published) a cohort with a peer the operator did not certify."""
    line = Say(f"refusing {state.cid}: {obs.reason}", logging.WARNING, obs.reason)
    return _leave(state, Outcome.REFUSED, [line], reason=obs.reason)


def _phase_closed(state: DeviceState, obs: ManifestRead) -> Transition:
    assert state.cfg is not None
    phase = _WAITS[state.stage]
    m, me = obs.manifest, state.settings.client_id
    if (fault := manifest_fault(m, state.cfg, phase)) is not None:
        return _abandon(state, fault)
    if (why := not_admitted(m, state.cfg, me)) is not None:
        return _leave(state, Outcome.ABANDONED, [Say(why)], reason=why)
    match phase:
        case Phase.KEYS:
            return replace(state, stage=Stage.SHARE, u1=m), []
        case Phase.SHARES:
            return replace(state, stage=Stage.UPLOAD, u2=m), []
    return replace(state, stage=Stage.SIGN, u3=m), []


def _signed(state: DeviceState, obs: Written) -> Transition:
    return replace(state, stage=Stage.QUORUM), []


def _quorum(state: DeviceState, obs: QuorumSeen) -> Transition:
    """Enough members of U3 signed exactly our U3: no honest one was shown another set that
    could collect the other kind of share, so revealing is safe."""
    assert state.cfg is not None and state.u3 is not None
    if (why := quorum_fault(state.cfg, state.u3, obs.signers)) is not None:
        return _abandon(state, why)
    return replace(state, stage=Stage.UNMASK), []


def _no_quorum(state: DeviceState, obs: CohortEnded | TimedOut | Stopped) -> Transition:
    """No quorum over our U3 before the cohort ended or time ran out: reveal nothing."""
    line = f"{state.cid}: fewer than t members signed the input set in time; revealing nothing"
    return _leave(state, Outcome.ABANDONED, [Say(line, logging.WARNING, line)], reason=line)


def _phase_ended(state: DeviceState, obs: CohortEnded | TimedOut | Stopped) -> Transition:
    line = f"{state.cid}: ended before {_WAITS[state.stage].value} closed"
    return _leave(state, Outcome.ABANDONED, [Say(line)], reason=line)


def _shared(state: DeviceState, obs: Written) -> Transition:
    return replace(state, stage=Stage.TRAIN), []


def _trained(state: DeviceState, obs: Trained) -> Transition:
    nxt = Stage.SHARES if state.secure else Stage.UPLOAD_PLAIN
    return replace(state, stage=nxt, num_samples=obs.num_samples), []


def _uploaded(state: DeviceState, obs: Uploaded) -> Transition:
    effects: list[Effect] = []
    if obs.privacy_rdp is not None:
        effects.append(BookRelease(obs.privacy_rdp))
    detail = f"{state.num_samples} samples, {obs.clipped} values clipped"
    if obs.dp_norm is not None:
        detail += f", delta L2 norm {obs.dp_norm:.3f} before the DP clip"
    effects.append(Say(f"{state.cid}: masked update uploaded ({detail})"))
    return replace(state, stage=Stage.INPUTS), effects


def _unmasked(state: DeviceState, obs: Written) -> Transition:
    assert state.u3 is not None
    line = f"{state.cid}: unmask shares revealed for {len(state.u3.members)} survivors"
    return _leave(state, Outcome.COMPLETED, [Say(line)])


def _unmask_refused(state: DeviceState, obs: Faulted) -> Transition:
    """Round 4 refuses to reveal (too few inputs, the cohort already ended): say why, leave."""
    if obs.kind is not FaultKind.PROTOCOL:
        return _faulted(state, obs)
    return _leave(state, Outcome.ABANDONED, [Say(obs.reason)], reason=obs.reason)


def _plain_uploaded(state: DeviceState, obs: Written) -> Transition:
    return _leave(state, Outcome.COMPLETED, [Say(f"uploaded update to {state.cid} (plaintext)")])


def _plain_untrained(state: DeviceState, obs: Diverged | Faulted) -> Transition:
    """Plaintext training diverged, or its base model is corrupt: sit out, uncounted."""
    if state.secure:
        return _diverged(state, obs) if isinstance(obs, Diverged) else _faulted(state, obs)
    line = f"{state.cid}: {obs.reason}"
    return _leave(state, Outcome.ABANDONED, [Say(line)], reason=obs.reason, counted=False)


def _diverged(state: DeviceState, obs: Diverged) -> Transition:
    line = f"{state.cid}: {obs.reason}"
    return _leave(state, Outcome.ABANDONED, [Say(line)], reason=obs.reason)


def _write_lost(state: DeviceState, obs: WriteConflict) -> Transition:
    # Write-once keys mean we cannot replace what is there; the function judges it.
    line = f"{state.cid}: cannot write ({obs.reason}); leaving the cohort"
    return _leave(state, Outcome.ABANDONED, [Say(line)], reason=obs.reason)


def _faulted(state: DeviceState, obs: Faulted) -> Transition:
    # Something this device read is malformed or lies: leave (the function counts us as a
    # dropout) rather than mask with, or reveal shares for, a set we cannot trust.
    return _abandon(state, obs.reason)


def _vanished(state: DeviceState, obs: Vanished) -> Transition:
    line = f"{state.cid}: {_DROP_LINE[obs.point]}"
    return _leave(state, Outcome.DROPPED, [Say(line)], reason=f"drop hook at {obs.point}")


def _abandon(state: DeviceState, reason: str, said: list[Effect] | None = None) -> Transition:
    line = Say(f"{state.cid}: abandoning the cohort: {reason}", logging.WARNING, reason)
    return _leave(state, Outcome.ABANDONED, [*(said or []), line], reason=reason)


def _leave(
    state: DeviceState,
    outcome: Outcome,
    effects: list[Effect],
    *,
    reason: str = "",
    counted: bool | None = None,
) -> Transition:
    """End the participation: report it, then wait for the next version (or stop).

    Secure cohorts count every way out (the device was a member, whatever
    happened); plaintext counts only a completed upload; a refused cohort never
    counts. A counted participation prints its outcome.

    Only a completed participation can have helped produce a version: after one
    the device waits for a newer version, watching the cohort's result in case it
    aborts (``CohortAborted``). After any other way out it checks in again at the
    same version after a back-off (``retry_backoff_s``): waiting for a version
    that its cohort will never produce would stall the device, and with it the
    population, when every cohort aborts.
    """
    assert state.cfg is not None
    cfg = state.cfg
    if counted is None:
        counted = outcome is not Outcome.REFUSED and (state.secure or outcome is Outcome.COMPLETED)
    out = list(effects)
    if counted and state.secure:
        out.append(Say(f"{cfg.cohort_id}: {outcome}"))
    out.append(Leave(cfg.cohort_id, cfg.base_version, outcome, reason))
    rounds = state.rounds + counted
    limit = state.settings.max_rounds
    stage = Stage.DONE if counted and limit and rounds >= limit else Stage.IDLE
    new = replace(
        state, stage=stage, rounds=rounds, last_base=cfg.base_version, outcome=outcome, cfg=None,
        u1=None, u2=None, u3=None, num_samples=0, retry=False, backoff_s=0.0, watch=None,
    )  # fmt: skip
    if outcome is Outcome.COMPLETED:
        return replace(new, watch=cfg.cohort_id), out
    return _retrying(new), out


# --------------------------------------------------------------------------- the table
_WAITS = {Stage.KEYS: Phase.KEYS, Stage.SHARES: Phase.SHARES, Stage.INPUTS: Phase.INPUTS}
_OUTSIDE_COHORT = frozenset(
    {Stage.IDLE, Stage.BUDGET, Stage.CHECK_IN, Stage.CHECKED_IN, Stage.ADMISSION, Stage.DONE}
)
Handler = Callable[[DeviceState, object], Transition]
_HANDLERS: dict[tuple[Stage, type], Handler] = {  # type: ignore[dict-item]
    (Stage.IDLE, VersionSeen): _idle,
    (Stage.IDLE, Stopped): _stop,
    (Stage.IDLE, CohortAborted): _cohort_aborted,
    (Stage.BUDGET, Allowed): _budget_allows,
    (Stage.BUDGET, BudgetRefused): _budget_refused,
    (Stage.CHECK_IN, CheckedIn): _checked_in,
    (Stage.CHECKED_IN, CohortFound): _found,
    (Stage.CHECKED_IN, CheckInExpired): _expired,
    (Stage.CHECKED_IN, TimedOut): _no_cohort,
    (Stage.CHECKED_IN, Stopped): _stop,
    (Stage.ADMISSION, Allowed): _admitted,
    (Stage.ADMISSION, BudgetRefused): _dp_refused,
    (Stage.ADVERTISE, Written): _advertised,
    (Stage.ADVERTISE, PeerUntrusted): _untrusted,
    (Stage.SHARE, Written): _shared,
    (Stage.TRAIN, Trained): _trained,
    (Stage.TRAIN, Diverged): _plain_untrained,
    (Stage.TRAIN, Faulted): _plain_untrained,
    (Stage.UPLOAD, Uploaded): _uploaded,
    (Stage.SIGN, Written): _signed,
    (Stage.QUORUM, QuorumSeen): _quorum,
    (Stage.QUORUM, CohortEnded): _no_quorum,
    (Stage.QUORUM, TimedOut): _no_quorum,
    (Stage.QUORUM, Stopped): _no_quorum,
    (Stage.UNMASK, Written): _unmasked,
    (Stage.UNMASK, Faulted): _unmask_refused,
    (Stage.UPLOAD_PLAIN, Written): _plain_uploaded,
    **{
        (stage, t): h
        for stage in _WAITS
        for t, h in (
            (ManifestRead, _phase_closed),
            (CohortEnded, _phase_ended),
            (TimedOut, _phase_ended),
            (Stopped, _phase_ended),
        )
    },
}
# Any request inside a cohort may fail these ways (the stage table above overrides).
_COHORT_HANDLERS: dict[type, Handler] = {  # type: ignore[dict-item]
    Faulted: _faulted,
    WriteConflict: _write_lost,
    Diverged: _diverged,
    Vanished: _vanished,
}
