"""Many simulated devices on one machine, through the real bucket, handlers and SecAgg+.

A device process per device stops scaling at a few dozen (each imports torch
and holds a model), so here W worker processes each *play* many devices. A
device is a small object (client id, identity key, shard indices) holding the
state of ``fedcore.device``'s protocol machine, the very machine the blocking
device loop (``edge_client.device``) drives; a worker repeatedly takes the next
device that has work, performs its outstanding request and steps its machine
with the answer, so the 100 members of a cohort progress together without 100
processes. There is no second copy of the stages here: the worker only decides
*how* a request is answered.

Every write and every check is the product's own code: the non-blocking
``fedcore.device.Runner`` performs check-ins, the four SecAgg+ rounds and
plaintext uploads through ``Participant`` and ``SecureRound``, and asks the
device (``edge_client.device.Device``: torch training, divergence check, DP
terms) what only it knows, against the real S3 API, with the real event pump
and aggregation handler on the other side. The waits the worker answers
itself, from what it reads once for all its devices because it is public and
immutable: the pointer (``AwaitVersion``), the cohort configs (``AwaitCohort``;
each device still matches its own check-in nonce), the phase manifests and
results (``AwaitPhase``; the machine checks each manifest per device), and the
decoded base model of a version. Training requests queue (oldest cohort first)
and run one per pass, after every ready protocol step, so the cheap rounds of
every cohort keep moving while training (the bulk of the CPU time) waits.
Dropout experiments go through the machine's drop hook (``RandomDrop``, drawn
from the worker's seeded generator).

An uneven population (``sim.population``) is the scheduler's business too: a
device with slowdown factor f gets 1/f of the machine's training budget and its
result is held until f times the training's measured time has passed (the
worker trains others meanwhile), and reports that stretched time as its
training seconds; a device offline by its availability schedule is skipped
(no check-in, no step, no training) until it is back. A uniform population
(the default) holds nothing and skips nothing.

This module is the worker process; ``sim.simulation`` is the parent that
spawns the workers and collects their reports.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fedcore import layout
from fedcore.device import (
    DROP_POINTS,
    DeviceState,
    DropPoint,
    LocalDevice,
    RandomDrop,
    Runner,
    Settings,
    Stage,
    Update,
    machine,
    step,
)
from fedcore.device.machine import (
    Action,
    Advertise,
    AwaitCohort,
    AwaitPhase,
    AwaitQuorum,
    AwaitVersion,
    BookRelease,
    CheckedIn,
    CheckIn,
    CheckInExpired,
    CheckSampleBudget,
    CheckUserPrivacy,
    CohortAborted,
    CohortEnded,
    CohortFound,
    Leave,
    ManifestRead,
    Observation,
    Pending,
    Request,
    Say,
    Share,
    SignInputs,
    TimedOut,
    Train,
    Unmask,
    UploadMasked,
    UploadPlain,
    Vanished,
    VersionSeen,
)
from fedcore.errors import FedError, IntegrityError, NotFoundError, NotModifiedError, StorageError
from fedcore.layout import Kind, Phase
from fedcore.messages import (
    CohortConfig,
    Manifest,
    Mode,
    Pointer,
    Result,
    parse_config,
    parse_manifest,
    parse_pointer,
    parse_result,
)
from fedcore.operator import certify, load_or_create_operator_key
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.storage import ObjectStore, S3Store, StoredObject
from fedcore.versions import load_model
from sim.population import ALWAYS_ONLINE, Availability, Population

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimSettings:
    """How the simulated devices behave (the server's settings live in the stack)."""

    devices: int = 1000
    workers: int = 0  # 0: os.cpu_count()
    partition: str = "iid"
    alpha: float = 0.5
    partition_seed: int = 0
    max_samples: int = 0  # cap each device's shard (0: all of it)
    # Small shards (60 examples for 1,000 devices): several short epochs, plain SGD
    # (momentum 0.9 over 30 steps of batch 10 overshoots and the average oscillates).
    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.1
    momentum: float = 0.0
    max_grad_norm: float = 0.0
    mode: str = "secagg"
    poll_s: float = 1.0  # how often a worker re-reads the pointer, configs and manifests
    max_poll_s: float = 5.0  # longest wait between two reads of one open phase's manifest
    checkin_check_s: float = 15.0  # how often a waiting device checks its check-in still stands
    until_version: int = 0  # devices stop joining once the model reaches this version (0: never)
    max_rounds: int = 0  # participations per device (0: no limit)
    # Availability: at most this many devices online (checked in or in a cohort) at once,
    # split evenly over the workers; the ones idle longest come online first (0: all).
    # Cross-device FL sees a small fraction of its population at a time, and with all
    # 1,000 online, 10 cohorts of 100 train from the same version (staleness up to 9).
    max_active: int = 0
    drop_prob: float = 0.0  # chance per cohort that a device vanishes at ``drop_at``
    drop_at: str = "inputs"
    slack_s: float = 30.0  # beyond the cohort's summed phase limits before a device gives up
    client_prefix: str = "sim"
    seed: int = 0
    # Secure mode: the folder of this run's operator key (``fedcore.operator``), created by
    # ``Simulation.start`` before the workers; each worker certifies its devices' identity
    # keys with it, as the operator would at enrollment, and the devices get its public key.
    operator_dir: str = ""
    # Per-device slowdown factors and online/offline periods (default: uniform, always online).
    population: Population = field(default_factory=Population)

    def __post_init__(self) -> None:
        if self.devices < 1 or self.workers < 0:
            raise ValueError("need devices >= 1 and workers >= 0")
        if self.drop_at not in DROP_POINTS:
            raise ValueError(f"drop_at must be one of {DROP_POINTS}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError("drop_prob must be in [0, 1)")

    @property
    def num_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def client_id(self, i: int) -> str:
        width = max(4, len(str(self.devices - 1)))
        return f"{self.client_prefix}-{i:0{width}d}"


class _SharedReads:
    """The store a worker's devices use: each write-once, public cohort message
    (a member's signed keys, encrypted shares or consistency signature) is downloaded
    once per worker instead of once per reader, and each operator certificate once per
    worker; every device still parses and verifies it."""

    CACHED = (Kind.KEYS, Kind.SHARES, Kind.CONSISTENCY, Kind.CERTIFICATE)

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._cache: dict[str, StoredObject] = {}
        self.hits = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get(self, key: str, *, if_none_match: str | None = None) -> StoredObject:
        if if_none_match is None and key in self._cache:
            self.hits += 1
            return self._cache[key]
        obj = self._store.get(key, if_none_match=if_none_match)
        with contextlib.suppress(FedError):
            if layout.parse_key(key).kind in self.CACHED:
                self._cache[key] = obj
        return obj

    def forget(self, cid: str) -> None:
        prefix = layout.cohort_prefix(cid)
        for key in [k for k in self._cache if k.startswith(prefix)]:
            del self._cache[key]


class _Cached(Participant):
    """A participant whose base-model downloads go through its worker's shared cache."""

    def __init__(self, *args: Any, models: _ModelCache, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._models = models

    def fetch_model(self, version: int) -> dict[str, np.ndarray]:
        return self._models.get(version)


class _ModelCache:
    """Decoded global versions (immutable once written), the few most recent kept."""

    def __init__(self, store: ObjectStore, keep: int = 4) -> None:
        self.store = store
        self.keep = keep
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def get(self, version: int) -> dict[str, np.ndarray]:
        if version not in self._cache:
            self._cache[version], _, _ = load_model(self.store, version)
            for old in sorted(self._cache)[: -self.keep]:
                del self._cache[old]
        return self._cache[version]


class _BucketView:
    """What a worker reads once for all its devices: pointer, configs, manifests, results."""

    def __init__(
        self, store: ObjectStore, mine: set[str], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.mine = mine
        self.clock = clock
        self.pointer: Pointer | None = None
        self._etag: str | None = None
        prefixes = store.list_prefixes(layout.COHORTS_PREFIX)
        self._cursor = prefixes[-1] + "~" if prefixes else None  # before any check-in
        self.taken: dict[tuple[str, str], CohortConfig] = {}  # (client, nonce) -> its cohort
        self.manifests: dict[tuple[str, Phase], Manifest] = {}
        self.results: dict[str, Result] = {}
        self.reads = 0
        # Per (cohort, phase): when to look next and the current delay. Like a device's
        # own polling, the delay grows while the phase stays open (input rounds are long).
        self._next: dict[tuple[str, Phase], tuple[float, float]] = {}

    def refresh_pointer(self) -> Pointer | None:
        try:
            obj = self.store.get(layout.LATEST_KEY, if_none_match=self._etag)
            self.pointer = parse_pointer(obj.body, where=layout.LATEST_KEY)
            self._etag = obj.etag
        except (NotModifiedError, NotFoundError):
            pass
        self.reads += 1
        return self.pointer

    def discover(self) -> None:
        """Read the configs of cohorts formed since the last call (Participant.find_cohort's
        cursor rule: never step past a cohort whose config was not readable yet)."""
        settled = True
        for prefix in self.store.list_prefixes(layout.COHORTS_PREFIX, start_after=self._cursor):
            key = prefix + "config.json"
            try:
                cfg = parse_config(self.store.get(key).body, where=key)
                self.reads += 1
            except NotFoundError:
                settled = False
                continue
            except IntegrityError as exc:
                log.warning(
                    "unreadable cohort config skipped", extra={"key": key, "reason": str(exc)}
                )
            else:
                for client, nonce in cfg.members.items():
                    if client in self.mine:
                        self.taken[(client, nonce)] = cfg
            if settled:
                self._cursor = prefix + "~"

    def watch(self, cid: str, phase: Phase, *, poll_s: float, max_poll_s: float) -> None:
        """Read ``phase``'s manifest of ``cid`` (or its result, once ended) if not known yet."""
        if (cid, phase) in self.manifests or cid in self.results:
            return
        now = self.clock()
        due, delay = self._next.get((cid, phase), (now, poll_s))
        if now < due:
            return
        self._next[(cid, phase)] = (now + delay, min(delay * 1.5, max_poll_s))
        key = layout.state_key(cid, phase)
        try:
            self.manifests[(cid, phase)] = parse_manifest(self.store.get(key).body, where=key)
            return
        except NotFoundError:
            pass
        finally:
            self.reads += 1
        try:
            rkey = layout.state_key(cid, Phase.RESULT)
            self.results[cid] = parse_result(self.store.get(rkey).body, where=rkey)
        except NotFoundError:
            pass

    def ended(self, cid: str) -> Result | None:
        """``cid``'s result, read at most once per poll interval per worker (a device
        that completed a cohort watches it: an aborted one means no version is coming)."""
        if cid in self.results:
            return self.results[cid]
        now = self.clock()
        due, delay = self._next.get((cid, Phase.RESULT), (now, 1.0))
        if now < due:
            return None
        self._next[(cid, Phase.RESULT)] = (now + delay, min(delay * 1.5, 10.0))
        rkey = layout.state_key(cid, Phase.RESULT)
        try:
            self.results[cid] = parse_result(self.store.get(rkey).body, where=rkey)
        except NotFoundError:
            return None
        except IntegrityError as exc:
            log.warning("unreadable cohort result", extra={"key": rkey, "reason": str(exc)})
            return None
        finally:
            self.reads += 1
        return self.results[cid]

    def forget(self, cid: str) -> None:
        for phase in Phase:
            self.manifests.pop((cid, phase), None)
        self.results.pop(cid, None)
        for phase in Phase:
            self._next.pop((cid, phase), None)


@dataclass
class SimDevice:
    """One simulated device: identity, shard, and its protocol machine's state.

    ``local`` answers the machine's questions to the device itself (torch training,
    DP terms: ``edge_client.device.Device``, or ``fedcore.device.SyntheticDevice``);
    the worker gives each device a non-blocking ``Runner`` and its first state.
    """

    index: int
    client_id: str
    shard: np.ndarray
    participant: Participant
    local: LocalDevice
    reseed: Callable[[int], None] = lambda seed: None  # the training seed of the next update
    runner: Runner | None = None
    state: DeviceState | None = None
    request: Request | None = None  # what the machine waits for (None: DONE)
    # The wait the worker answers, since when (for AwaitQuorum: when to look next).
    waiting: tuple[Request, float] | None = None
    checked_at: float = 0.0  # when the check-in was last confirmed to stand
    joined_at: float = 0.0
    speed: float = 1.0  # slowdown factor of its training (>= 1; set by the worker)
    schedule: Availability = ALWAYS_ONLINE  # when it is reachable (set by the worker)

    @property
    def stage(self) -> Stage:
        assert self.state is not None  # set by the worker
        return self.state.stage


@dataclass
class WorkerStats:
    steps: int = 0
    participations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    step_s: dict[str, float] = field(default_factory=dict)  # device-side time per step kind
    step_n: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    shared_hits: int = 0  # member messages served from the worker's copy
    held_s: float = 0.0  # seconds slow devices' training results were held, summed
    offline_skips: int = 0  # queued trainings passed over because the device was offline

    def add(self, kind: str, seconds: float) -> None:
        self.step_s[kind] = self.step_s.get(kind, 0.0) + seconds
        self.step_n[kind] = self.step_n.get(kind, 0) + 1


# The step kinds a run reports (``device_steps``), by the request a step answered.
_KIND: dict[type, str] = {
    AwaitVersion: "version", CheckSampleBudget: "budget", CheckIn: "check_in",
    AwaitCohort: "join", CheckUserPrivacy: "admission", Advertise: "keys", AwaitPhase: "phase",
    Share: "share", Train: "train", UploadMasked: "upload", SignInputs: "sign",
    AwaitQuorum: "quorum", Unmask: "unmask", UploadPlain: "upload",
}  # fmt: skip
_EFFECTS = (Say, BookRelease, Leave)
# Stages in which a device counts as online (checked in or in a cohort) for ``max_active``.
_OFFLINE = frozenset({Stage.IDLE, Stage.BUDGET, Stage.CHECK_IN, Stage.DONE})


class Worker:
    """Plays its devices in turn: all ready protocol steps, then one training step.

    Each device is ``fedcore.device``'s machine. The worker performs a device's
    request through its non-blocking runner, except the waits, which it answers
    from its ``_BucketView`` (one read of the pointer, a config, a manifest for
    all its devices), and training, which it queues (oldest cohort first).

    ``settings.population`` gives each device its slowdown factor and availability
    schedule (counted from the worker's start on ``clock``): a slow device's trained
    update is held until its stretched training time has passed, an offline device
    is not stepped or trained. ``clock`` (seconds, monotonic) times every wait and
    hold, so a test can drive the worker with a ``ManualClock``.
    """

    def __init__(
        self,
        store: ObjectStore,
        settings: SimSettings,
        devices: list[SimDevice],
        *,
        models: _ModelCache,
        report: Callable[[dict[str, Any]], None] = lambda event: None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.s = settings
        self.devices = devices
        self.models = models
        self.clock = clock
        self.started = clock()  # time 0 of the devices' availability schedules
        self.view = _BucketView(store, {d.client_id for d in devices}, clock)
        self.report = report
        self.rng = rng or random.Random(settings.seed)
        self.stats = WorkerStats()
        # Oldest cohort first, then first come: finishing cohorts one after another
        # (rather than interleaving all open ones) keeps versions coming and staleness low.
        self._train_queue: list[tuple[float, float, int]] = []  # (formed, ready, device index)
        self._by_index = {d.index: d for d in devices}
        workers = settings.num_workers
        self._cap = -(-settings.max_active // workers) if settings.max_active else len(devices)
        self._active = 0
        # Trained updates of slow devices, by device index: (when the device is done, what
        # it observed).
        self._held: dict[int, tuple[float, Observation]] = {}
        # Devices whose participation ended in this pass: they check in again at the next
        # pass at the earliest, so the slot they free under ``max_active`` goes to a device
        # idle longer (else one that sees the new version in the step that ended its cohort
        # takes its slot straight back, and a small population rotates through a few).
        self._left_now: set[int] = set()
        terms = Settings(
            "", Mode(settings.mode), until_version=settings.until_version,
            max_rounds=settings.max_rounds, cohort_timeout_s=math.inf, slack_s=settings.slack_s,
        )  # fmt: skip
        drop_at = DropPoint(settings.drop_at)
        # The population's draws have generators of their own: ``self.rng`` (dropouts,
        # back-off jitter) draws exactly what it drew before populations existed.
        pop = settings.population
        for d in devices:
            d.speed, d.schedule = pop.speed(d.index), pop.availability(d.index)
            d.runner = Runner(
                d.participant, d.local if d.speed == 1.0 else _Slowed(d.local, d.speed),
                blocking=False, clock=clock,
                drop=RandomDrop(drop_at, settings.drop_prob, self.rng.random),
                on_leave=lambda leave, d=d: self._left(d, leave),
            )  # fmt: skip
            state, actions = machine.start(replace(terms, client_id=d.client_id))
            d.state = state
            self._act(d, actions)

    # -- the loop -------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> WorkerStats:
        next_poll = 0.0
        try:
            while not should_stop():
                now = self.clock()
                if now >= next_poll:
                    self._refresh()
                    next_poll = now + self.s.poll_s
                progressed = self.tick(should_stop)
                if all(d.stage is Stage.DONE for d in self.devices):
                    break
                if not progressed:
                    time.sleep(min(0.05, self.s.poll_s))
        finally:
            for d in self.devices:
                if d.runner is not None:
                    d.runner.close()  # erase any open cohort's secrets
        self.stats.reads = self.view.reads
        return self.stats

    def tick(self, should_stop: Callable[[], bool] = lambda: False) -> int:
        """One pass: the held updates now due, every device's ready steps, one training;
        how many of those made progress (0: nothing to do until the clock moves)."""
        self._left_now.clear()
        progressed = self._release_held()
        for d in list(self.devices):  # _left reorders the list
            if should_stop():
                break
            progressed += self._step(d)
        if self._train_queue and not should_stop():
            progressed += self._train_next()
        return progressed

    def online(self, d: SimDevice) -> bool:
        """Whether ``d`` is reachable now, by its availability schedule."""
        return d.schedule.always or d.schedule.online(self.clock() - self.started)

    def _refresh(self) -> None:
        try:
            self.view.refresh_pointer()
            if any(d.stage is Stage.CHECKED_IN for d in self.devices):
                self.view.discover()
            for cid, phase in {
                (d.request.cfg.cohort_id, d.request.phase)
                for d in self.devices
                if isinstance(d.request, AwaitPhase)
            }:
                self.view.watch(cid, phase, poll_s=self.s.poll_s, max_poll_s=self.s.max_poll_s)
        except StorageError as exc:
            log.warning("bucket read failed; retrying", extra={"reason": str(exc)})

    def _step(self, d: SimDevice) -> int:
        """Perform ``d``'s requests until one has no answer yet (or is training, which
        queues); 1 if anything happened. An offline device does nothing."""
        if not self.online(d):
            return 0
        progressed = 0
        while (req := d.request) is not None and not isinstance(req, Train):
            if d.index in self._left_now:
                break  # its next check-in waits for the next pass
            t0 = time.perf_counter()
            try:
                obs = self._answer(d, req)
            except StorageError as exc:  # transient: the same request runs again next time
                log.warning(
                    "storage error in a device step",
                    extra={"client_id": d.client_id, "cohort_id": getattr(d.state.cfg, "cohort_id", None),  # type: ignore[union-attr]
                           "phase": d.stage.value, "reason": str(exc)},
                )  # fmt: skip
                break
            if obs is None or isinstance(obs, Pending):
                break
            self._feed(d, obs)
            self.stats.steps += 1
            self.stats.add(_KIND[type(req)], time.perf_counter() - t0)
            progressed = 1
        return progressed

    def _answer(self, d: SimDevice, req: Request) -> Observation | None:
        """The observation for ``req``; None while it has none yet."""
        match req:
            case AwaitVersion():
                now = self.clock()
                if d.waiting is None or d.waiting[0] != req:  # back off before a retry
                    d.waiting = (req, now + req.delay_s * self.rng.uniform(0.5, 1.5))
                pointer = self.view.pointer
                if now < d.waiting[1] or pointer is None or self._active >= self._cap:
                    return None
                if (req.stop_at and pointer.version >= req.stop_at) or (
                    pointer.version > req.newer_than
                ):
                    return VersionSeen(pointer.version)
                res = None if req.watch is None else self.view.ended(req.watch)
                if res is not None and res.status == "aborted":
                    return CohortAborted(res.reason)
                return None
            case AwaitCohort():
                return self._cohort_for(d, req)
            case AwaitPhase():
                return self._phase_for(d, req)
            case AwaitQuorum():
                # The runner reads the signatures still missing on each look: once per
                # poll_s per device, not on every pass of the loop (404s add up at scale).
                now = self.clock()
                if d.waiting is not None and d.waiting[0] == req and now < d.waiting[1]:
                    return None
                d.waiting = (req, now + self.s.poll_s)
        assert d.runner is not None
        return d.runner.perform(req)

    def _cohort_for(self, d: SimDevice, req: AwaitCohort) -> Observation | None:
        """The cohort that took ``d``'s check-in, from the worker's one listing of configs."""
        cfg = self.view.taken.pop((d.client_id, req.ticket.nonce), None)
        if cfg is None:
            now = self.clock()
            if now - d.checked_at < self.s.checkin_check_s:
                return self._timed_out(d, req)
            d.checked_at = now
            if d.participant.checkin_pending(req.ticket):
                return self._timed_out(d, req)
            self.view.discover()  # taken: its cohort's config is already written
            cfg = self.view.taken.pop((d.client_id, req.ticket.nonce), None)
            if cfg is None:
                return CheckInExpired()
        d.joined_at = time.time()
        return CohortFound(cfg)

    def _phase_for(self, d: SimDevice, req: AwaitPhase) -> Observation | None:
        """The awaited phase's manifest, or the cohort's end, from the worker's one read."""
        cid = req.cfg.cohort_id
        assert d.runner is not None
        if req.vanish_point is not None and d.runner.drop.vanishes(cid, req.vanish_point):
            return Vanished(req.vanish_point)
        if (m := self.view.manifests.get((cid, req.phase))) is not None:
            return ManifestRead(m)  # the machine checks it and whether it counts d
        if cid in self.view.results:
            return CohortEnded()
        return self._timed_out(d, req)

    def _timed_out(self, d: SimDevice, req: AwaitCohort | AwaitPhase) -> TimedOut | None:
        """``TimedOut`` once ``d`` has waited ``req.timeout_s`` since its first look."""
        now = self.clock()
        if d.waiting is None or d.waiting[0] != req:
            d.waiting = (req, now)
        return TimedOut() if now - d.waiting[1] >= req.timeout_s else None

    def _feed(self, d: SimDevice, obs: Observation) -> None:
        """Step ``d``'s machine by ``obs`` and perform what it says."""
        assert d.state is not None
        if isinstance(obs, CheckedIn):
            d.checked_at = self.clock()
        online = d.stage not in _OFFLINE
        d.state, actions = step(d.state, obs)
        self._active += (d.stage not in _OFFLINE) - online
        d.waiting = None
        self._act(d, actions)

    def _act(self, d: SimDevice, actions: list[Action]) -> None:
        """Perform the effects (a ``Leave`` reports the participation), keep the request;
        a training request is queued unless the drop hook makes ``d`` vanish first."""
        assert d.runner is not None
        d.request = None
        for a in actions:
            if isinstance(a, _EFFECTS):
                d.runner.perform(a)
            else:
                d.request = a
        req = d.request
        if isinstance(req, Train):
            point = req.vanish_point
            if point is not None and d.runner.drop.vanishes(req.cfg.cohort_id, point):
                self._feed(d, Vanished(point))  # no training for a device that is gone
            else:
                heapq.heappush(self._train_queue, (req.cfg.created_at, self.clock(), d.index))

    def _train_next(self) -> int:
        """Train the queued device of the oldest cohort that is online, then go on with its
        protocol (a slow device's update is held first); 0 if every queued device is offline.
        """
        skipped: list[tuple[float, float, int]] = []
        try:
            while self._train_queue:
                entry = heapq.heappop(self._train_queue)
                d = self._by_index[entry[2]]
                if not isinstance(d.request, Train):
                    return 1  # left the cohort while queued
                if self.online(d):
                    break
                skipped.append(entry)
                self.stats.offline_skips += 1
            else:
                return 0
        finally:
            for entry in skipped:
                heapq.heappush(self._train_queue, entry)
        req = d.request
        assert d.runner is not None and d.state is not None
        d.reseed(self.s.seed * 1_000_003 + d.index * 1009 + d.state.rounds)
        t0, started = time.perf_counter(), self.clock()
        try:
            obs = d.runner.perform(req)
        except StorageError as exc:  # transient (the base model's read): train again later
            log.warning(
                "storage error while training",
                extra={"client_id": d.client_id, "cohort_id": req.cfg.cohort_id,
                       "phase": d.stage.value, "reason": str(exc)},
            )  # fmt: skip
            heapq.heappush(self._train_queue, (req.cfg.created_at, self.clock(), d.index))
            return 1
        finally:
            self.stats.add("train", time.perf_counter() - t0)
        assert obs is not None
        if d.speed > 1.0:
            # The device took ``speed`` times what the machine did; it reports that time.
            took = self.clock() - started
            if d.runner.train_s is not None:
                d.runner.train_s *= d.speed
            done = started + took * d.speed
            if done > self.clock():
                self._held[d.index] = (done, obs)
                self.stats.held_s += done - self.clock()
                return 1
        self._feed(d, obs)
        self._step(d)  # a plaintext update uploads at once
        return 1

    def _release_held(self) -> int:
        """Go on with the slow devices whose training time is over (and that are online)."""
        if not self._held:
            return 0
        now, released = self.clock(), 0
        for idx, (done, obs) in sorted(self._held.items(), key=lambda kv: kv[1][0]):
            d = self._by_index[idx]
            if done > now or not self.online(d):
                continue
            del self._held[idx]
            self._feed(d, obs)
            self._step(d)
            released += 1
        return released

    def _left(self, d: SimDevice, leave: Leave) -> None:
        """``d``'s participation is over (its runner forgot the secrets): report it, drop
        the cohort's shared reads once no device of this worker is in it, and send ``d``
        to the back of the line (others come online first)."""
        cid, outcome = leave.cohort_id, leave.outcome.value
        self.stats.participations += 1
        self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
        self.report(
            {
                "type": "participation",
                "client_id": d.client_id,
                "cohort_id": cid,
                "base_version": leave.base_version,
                "outcome": outcome,
                "joined_at": d.joined_at,
                "left_at": time.time(),
            }
        )
        if not any(
            o.state is not None and o.state.cfg is not None and o.state.cfg.cohort_id == cid
            for o in self.devices
            if o is not d
        ):
            self.view.forget(cid)
            if isinstance(d.participant.store, _SharedReads):
                d.participant.store.forget(cid)
        self.devices.remove(d)
        self.devices.append(d)
        self._left_now.add(d.index)


class _Slowed:
    """A device ``speed`` times slower than the machine that plays it: its local training
    gets ``1/speed`` of the time box (so the stretched training still fits the deadline)."""

    def __init__(self, local: LocalDevice, speed: float) -> None:
        self._local = local
        self.speed = speed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._local, name)

    def train_update(self, cfg: CohortConfig, *, budget_s: float | None = None) -> Update:
        return self._local.train_update(
            cfg, budget_s=None if budget_s is None else budget_s / self.speed
        )


def build_devices(
    store: ObjectStore,
    settings: SimSettings,
    indices: list[int],
    shards: list[np.ndarray],
    *,
    models: _ModelCache,
) -> list[SimDevice]:
    """Make and enroll this worker's devices (fresh identity keys, held in memory)."""
    from edge_client.data import load_mnist
    from edge_client.device import Device, LoopSettings
    from edge_client.train import TrainSettings, warm_up

    mnist = load_mnist(progress=None)
    train = TrainSettings(
        settings.epochs, settings.batch_size, settings.lr, settings.momentum,
        settings.seed, settings.max_grad_norm,
    )  # fmt: skip
    operator_sk = operator_pk = None
    if settings.mode == "secagg":
        if not settings.operator_dir:
            raise ValueError("a secure simulation needs its run's operator key (operator_dir)")
        operator_sk = load_or_create_operator_key(Path(settings.operator_dir))
        operator_pk = crypto.ed25519_public(operator_sk)
    out = []
    warm_up()  # once per worker process, before any cohort's time box runs
    for i, idx in zip(indices, shards, strict=True):
        cid = settings.client_id(i)
        key = crypto.ed25519_keypair()[0]  # plaintext updates are signed too
        p = _Cached(
            store, cid, mode=settings.mode, signing_key=key, models=models, operator_key=operator_pk
        )
        p.enroll()
        if operator_sk is not None:
            certify(store, operator_sk, cid, crypto.ed25519_public(key))
        dev = Device(
            p, mnist.train_x[idx], mnist.train_y[idx], train, LoopSettings(),
            log=lambda m, cid=cid: log.debug(m, extra={"client_id": cid}),
        )  # fmt: skip
        out.append(SimDevice(i, cid, idx, p, dev, reseed=partial(_reseed, dev)))
    return out


def _reseed(dev: Any, seed: int) -> None:
    """Train ``dev``'s next update with ``seed`` (a device's updates differ by round)."""
    dev.train = replace(dev.train, seed=seed)


def _worker_main(
    wid: int,
    endpoint_url: str | None,
    bucket: str,
    settings: SimSettings,
    indices: list[int],
    shards: list[np.ndarray],
    events: Any,
    stop: Any,
) -> None:
    """Entry point of a worker process (spawned: the parent runs server threads)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s worker-{wid} %(name)s %(levelname)s %(message)s"
    )
    store = S3Store.connect(bucket, endpoint_url)
    models = _ModelCache(store)
    torch.manual_seed(settings.seed + wid)
    shared = _SharedReads(store)
    devices = build_devices(shared, settings, indices, shards, models=models)  # type: ignore[arg-type]
    events.put({"type": "ready", "worker": wid, "devices": len(devices)})
    worker = Worker(
        store, settings, devices, models=models, report=events.put,
        rng=random.Random(settings.seed * 7919 + wid),
    )  # fmt: skip
    stats = worker.run(stop.is_set)
    stats.shared_hits = shared.hits
    events.put({"type": "stats", "worker": wid, "stats": stats.__dict__})
