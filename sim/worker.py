"""Many simulated devices on one machine, through the real bucket, handlers and SecAgg+.

A device process per device stops scaling at a few dozen (each imports torch
and holds a model), so here W worker processes each *play* many devices. A
device is a small state object (client id, identity key, shard indices, where
it stands in the protocol); a worker repeatedly takes the next device that has
work, runs one protocol step for it and moves on, so the 100 members of a
cohort progress together without 100 processes:

  idle --check in--> waiting --cohort found--> keys --advertise, U1--> share
  --shares posted--> train --train (heavy)--> inputs --U2, masked upload-->
  unmask --U3, reveal--> idle

Every step is the product's own code: ``Participant`` (enroll, check in),
``SecureRound`` (advertise, share, upload, unmask, the same checks as
``run_secure_cohort``), ``Device._train`` (torch training, divergence check)
against the real S3 API, with the real event pump and aggregation handler on
the other side. What a worker shares among its devices is only what is
public and immutable, read once instead of once per device: the pointer, the
cohort configs (each device still matches its own check-in nonce), the phase
manifests and results, and the decoded base model of a version. Protocol
steps run before training steps, so the cheap rounds of every cohort keep
moving while training (the bulk of the CPU time) queues.

This module is the worker process; ``sim.simulation`` is the parent that
spawns the workers and collects their reports.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np

from fedcore import layout
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    NotModifiedError,
    ProtocolError,
    StorageError,
    UnusableUpdateError,
)
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
from fedcore.participant import Participant, Ticket
from fedcore.secagg import crypto
from fedcore.secure_round import DROP_POINTS, SecureRound, not_admitted
from fedcore.storage import ObjectStore, S3Store, StoredObject
from fedcore.versions import load_model

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


class Stage(Enum):
    IDLE = "idle"  # waiting for a version newer than the last one trained on
    WAITING = "waiting"  # checked in, waiting for a cohort to name the check-in
    KEYS = "keys"  # advertised keys, waiting for U1
    TRAIN = "train"  # shares posted; training is next
    SHARES = "shares"  # trained, waiting for U2 to upload the masked input
    INPUTS = "inputs"  # uploaded, waiting for U3 to reveal shares
    DONE = "done"  # stopped joining (until_version or max_rounds)


WAIT_PHASE = {Stage.KEYS: Phase.KEYS, Stage.SHARES: Phase.SHARES, Stage.INPUTS: Phase.INPUTS}


class _SharedReads:
    """The store a worker's devices use: each write-once, public cohort message
    (a member's signed keys or encrypted shares) is downloaded once per worker
    instead of once per neighbour; every device still parses and verifies it."""

    CACHED = (Kind.KEYS, Kind.SHARES)

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

    def __init__(self, store: ObjectStore, mine: set[str]) -> None:
        self.store = store
        self.mine = mine
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
        now = time.monotonic()
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

    def forget(self, cid: str) -> None:
        for phase in Phase:
            self.manifests.pop((cid, phase), None)
        self.results.pop(cid, None)
        for phase in Phase:
            self._next.pop((cid, phase), None)


@dataclass
class SimDevice:
    """One simulated device: identity, shard, and where it stands in the protocol."""

    index: int
    client_id: str
    shard: np.ndarray
    device: Any  # edge_client.device.Device (torch), built in the worker
    stage: Stage = Stage.IDLE
    last_base: int = -1
    rounds: int = 0
    ticket: Ticket | None = None
    checked_at: float = 0.0
    cfg: CohortConfig | None = None
    rnd: SecureRound | None = None
    update: tuple[Any, int] | None = None
    u2: Manifest | None = None
    drop_at: str | None = None
    joined_at: float = 0.0
    deadline: float = 0.0


@dataclass
class WorkerStats:
    steps: int = 0
    participations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    step_s: dict[str, float] = field(default_factory=dict)  # device-side time per step kind
    step_n: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    shared_hits: int = 0  # member messages served from the worker's copy

    def add(self, kind: str, seconds: float) -> None:
        self.step_s[kind] = self.step_s.get(kind, 0.0) + seconds
        self.step_n[kind] = self.step_n.get(kind, 0) + 1


class Worker:
    """Plays its devices in turn: all ready protocol steps, then one training step."""

    def __init__(
        self,
        store: ObjectStore,
        settings: SimSettings,
        devices: list[SimDevice],
        *,
        models: _ModelCache,
        report: Callable[[dict[str, Any]], None] = lambda event: None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.s = settings
        self.devices = devices
        self.models = models
        self.view = _BucketView(store, {d.client_id for d in devices})
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

    # -- the loop -------------------------------------------------------------
    def run(self, should_stop: Callable[[], bool]) -> WorkerStats:
        next_poll = 0.0
        while not should_stop():
            now = time.monotonic()
            if now >= next_poll:
                self._refresh()
                next_poll = now + self.s.poll_s
            progressed = 0
            for d in list(self.devices):  # _finish reorders the list
                if should_stop():
                    break
                progressed += self._step(d)
            if self._train_queue and not should_stop():
                *_, idx = heapq.heappop(self._train_queue)
                self._train(self._by_index[idx])
                progressed += 1
            if all(d.stage is Stage.DONE for d in self.devices):
                break
            if not progressed:
                time.sleep(min(0.05, self.s.poll_s))
        self.stats.reads = self.view.reads
        return self.stats

    def _refresh(self) -> None:
        try:
            self.view.refresh_pointer()
            if any(d.stage is Stage.WAITING for d in self.devices):
                self.view.discover()
            for cid, phase in {
                (d.cfg.cohort_id, WAIT_PHASE[d.stage])
                for d in self.devices
                if d.stage in WAIT_PHASE and d.cfg is not None
            }:
                self.view.watch(cid, phase, poll_s=self.s.poll_s, max_poll_s=self.s.max_poll_s)
        except StorageError as exc:
            log.warning("bucket read failed; retrying", extra={"reason": str(exc)})

    def _step(self, d: SimDevice) -> int:
        """One protocol step for ``d`` if it has one; 1 if it did something."""
        t0 = time.perf_counter()
        try:
            kind = self._advance(d)
        except StorageError as exc:  # transient: the same step runs again next time
            log.warning(
                "storage error in a device step",
                extra={"client_id": d.client_id, "stage": d.stage.value, "reason": str(exc)},
            )
            return 0
        except (AlreadyExistsError, IntegrityError, ProtocolError, NotFoundError) as exc:
            # The same reasons run_secure_cohort abandons a cohort for.
            log.warning(
                "device abandons the cohort",
                extra={"client_id": d.client_id, "stage": d.stage.value, "reason": str(exc)},
            )
            self._finish(d, "abandoned")
            return 1
        if kind is None:
            return 0
        self.stats.steps += 1
        self.stats.add(kind, time.perf_counter() - t0)
        return 1

    def _advance(self, d: SimDevice) -> str | None:
        pointer = self.view.pointer
        if d.stage is Stage.IDLE:
            if pointer is None or self._active >= self._cap:
                return None
            if self.s.until_version and pointer.version >= self.s.until_version:
                d.stage = Stage.DONE
                return "stop"
            if pointer.version <= d.last_base:
                return None
            d.ticket = d.device.p.check_in(pointer.version)
            d.checked_at = time.monotonic()
            d.stage = Stage.WAITING
            self._active += 1
            return "check_in"
        if d.stage is Stage.WAITING:
            assert d.ticket is not None
            cfg = self.view.taken.pop((d.client_id, d.ticket.nonce), None)
            if cfg is None:
                if time.monotonic() - d.checked_at < self.s.checkin_check_s:
                    return None
                d.checked_at = time.monotonic()
                if d.device.p.checkin_pending(d.ticket):
                    return "check_pending"
                self.view.discover()  # taken: its cohort's config is already written
                cfg = self.view.taken.pop((d.client_id, d.ticket.nonce), None)
                if cfg is None:
                    d.stage = Stage.IDLE  # expired without a cohort: check in again
                    self._active -= 1
                    return "check_pending"
            return self._join(d, cfg)
        if d.stage in WAIT_PHASE:
            assert d.cfg is not None and d.rnd is not None
            cid, phase = d.cfg.cohort_id, WAIT_PHASE[d.stage]
            m = self.view.manifests.get((cid, phase))
            if m is None:
                if cid in self.view.results:
                    self._finish(d, "abandoned", f"ended before {phase.value} closed")
                    return "ended"
                if time.monotonic() > d.deadline:
                    self._finish(d, "abandoned", f"gave up waiting for {phase.value}")
                    return "timeout"
                return None
            m = d.rnd._checked_manifest(m, phase, layout.state_key(cid, phase))
            if (why := not_admitted(m, d.cfg, d.client_id)) is not None:
                self._finish(d, "abandoned", why)
                return "not_admitted"
            return self._after_phase(d, phase, m)
        return None

    def _join(self, d: SimDevice, cfg: CohortConfig) -> str:
        d.cfg, d.joined_at = cfg, time.time()
        d.deadline = time.monotonic() + sum(cfg.phase_s.values()) + self.s.slack_s
        if cfg.mode != d.device.p.mode:
            self._finish(d, "refused", f"cohort runs {cfg.mode.value!r}")
            return "join"
        if (refusal := d.device._user_dp_refusal(cfg)) is not None:
            self._finish(d, "refused", refusal)
            return "join"
        d.drop_at = self.s.drop_at if self.rng.random() < self.s.drop_prob else None
        if cfg.mode is Mode.PLAINTEXT:
            d.stage = Stage.TRAIN
            self._queue_training(d)
            return "join"
        if d.drop_at == "keys":
            self._finish(d, "dropped")
            return "join"
        d.rnd = SecureRound(d.device.p, cfg)
        d.rnd.advertise()
        d.stage = Stage.KEYS
        return "keys"

    def _after_phase(self, d: SimDevice, phase: Phase, m: Manifest) -> str:
        assert d.rnd is not None
        if phase is Phase.KEYS:
            d.rnd.share(m)
            if d.drop_at == "shares":
                self._finish(d, "dropped")
                return "share"
            d.stage = Stage.TRAIN
            self._queue_training(d)
            return "share"
        if phase is Phase.SHARES:
            assert d.update is not None
            delta, n = d.update
            d.u2 = m
            d.rnd.upload(m, delta, num_samples=n)
            d.update = None
            d.device._book_release(d.rnd)
            if d.drop_at == "inputs":
                self._finish(d, "dropped")
                return "upload"
            d.stage = Stage.INPUTS
            return "upload"
        assert d.u2 is not None
        d.rnd.unmask(d.u2, m)
        self._finish(d, "completed")
        return "unmask"

    def _queue_training(self, d: SimDevice) -> None:
        assert d.cfg is not None
        heapq.heappush(self._train_queue, (d.cfg.created_at, time.monotonic(), d.index))

    def _train(self, d: SimDevice) -> None:
        if d.stage is not Stage.TRAIN or d.cfg is None:
            return  # left the cohort while queued
        t0 = time.perf_counter()
        dev = d.device
        dev.train = replace(dev.train, seed=self.s.seed * 1_000_003 + d.index * 1009 + d.rounds)
        try:
            delta, n = dev._train(d.cfg)
        except (UnusableUpdateError, NotFoundError, IntegrityError, StorageError) as exc:
            self._finish(d, "abandoned", str(exc))
            return
        finally:
            self.stats.add("train", time.perf_counter() - t0)
        if d.cfg.mode is Mode.PLAINTEXT:
            try:
                dev.p.upload_plain(d.cfg, delta, num_samples=n, loss=dev._loss)
            except (AlreadyExistsError, StorageError) as exc:
                self._finish(d, "abandoned", str(exc))
                return
            self._finish(d, "completed")
            return
        d.update = (delta, n)
        d.stage = Stage.SHARES

    def _finish(self, d: SimDevice, outcome: str, why: str = "") -> None:
        """End ``d``'s participation: forget its secrets, report, go back to idle."""
        cfg = d.cfg
        if d.rnd is not None:
            d.rnd.erase()
        if cfg is not None:
            d.last_base = cfg.base_version
            d.rounds += 1
            self.stats.participations += 1
            self.stats.outcomes[outcome] = self.stats.outcomes.get(outcome, 0) + 1
            self.report(
                {
                    "type": "participation",
                    "client_id": d.client_id,
                    "cohort_id": cfg.cohort_id,
                    "base_version": cfg.base_version,
                    "outcome": outcome,
                    "joined_at": d.joined_at,
                    "left_at": time.time(),
                }
            )
            if why:
                log.info(
                    "participation ended",
                    extra={"client_id": d.client_id, "cohort_id": cfg.cohort_id, "outcome": outcome, "reason": why},
                )  # fmt: skip
            if not any(
                o.cfg is not None and o.cfg.cohort_id == cfg.cohort_id
                for o in self.devices
                if o is not d
            ):
                self.view.forget(cfg.cohort_id)
                if isinstance(d.device.p.store, _SharedReads):
                    d.device.p.store.forget(cfg.cohort_id)
        d.cfg = d.rnd = d.u2 = d.ticket = None
        d.update = d.drop_at = None
        done = self.s.max_rounds and d.rounds >= self.s.max_rounds
        if d.stage not in (Stage.IDLE, Stage.DONE):
            self._active -= 1
        d.stage = Stage.DONE if done else Stage.IDLE
        self.devices.remove(d)  # to the back of the line: others come online first
        self.devices.append(d)


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
    from edge_client.train import TrainSettings

    mnist = load_mnist(progress=None)
    train = TrainSettings(
        settings.epochs, settings.batch_size, settings.lr, settings.momentum,
        settings.seed, settings.max_grad_norm,
    )  # fmt: skip
    out = []
    for i, idx in zip(indices, shards, strict=True):
        cid = settings.client_id(i)
        key = crypto.ed25519_keypair()[0] if settings.mode == "secagg" else None
        p = _Cached(store, cid, mode=settings.mode, signing_key=key, models=models)
        if key is not None:
            p.enroll()
        dev = Device(
            p, mnist.train_x[idx], mnist.train_y[idx], train, LoopSettings(),
            log=lambda m, cid=cid: log.debug(m, extra={"client_id": cid}),
        )  # fmt: skip
        out.append(SimDevice(i, cid, idx, dev))
    return out


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
