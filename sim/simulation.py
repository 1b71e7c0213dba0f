"""The parent side of a simulation: start the worker processes, collect their reports.

``Simulation`` spawns the workers of ``sim.worker`` and folds what they report
(ready, each participation, their step statistics) into a ``Tally``; the rest
are the measurements a run reports beside the versions: cohorts in flight,
devices in two cohorts at once, each device's user-level privacy spend, and
when to stop. Nothing here starts a server: ``infra.simulate`` does.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedcore import layout
from fedcore.dp.ledger import ReleaseTally
from fedcore.errors import FedError
from fedcore.layout import Phase
from fedcore.operator import load_or_create_operator_key
from fedcore.status import cohort_ids
from fedcore.storage import ObjectStore
from sim.worker import SimSettings, _worker_main


@dataclass
class Tally:
    """What the parent learns from its workers' reports."""

    ready_workers: int = 0
    participations: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    devices_seen: set[str] = field(default_factory=set)
    records: list[dict[str, Any]] = field(default_factory=list)
    worker_stats: dict[int, dict[str, Any]] = field(default_factory=dict)

    def take(self, event: dict[str, Any]) -> None:
        if event["type"] == "ready":
            self.ready_workers += 1
        elif event["type"] == "participation":
            self.participations += 1
            self.outcomes[event["outcome"]] = self.outcomes.get(event["outcome"], 0) + 1
            self.devices_seen.add(event["client_id"])
            self.records.append(event)
        elif event["type"] == "stats":
            self.worker_stats[event["worker"]] = event["stats"]


class Simulation:
    """W worker processes playing ``settings.devices`` devices against one bucket."""

    def __init__(self, endpoint_url: str | None, bucket: str, settings: SimSettings) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.s = settings
        self.tally = Tally()
        self._ctx = mp.get_context("spawn")
        self._events = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._procs: list[Any] = []

    def start(self, labels: np.ndarray) -> Simulation:
        from edge_client.data import partition

        shards = partition(
            labels, self.s.devices, self.s.partition, seed=self.s.partition_seed, alpha=self.s.alpha
        )
        if self.s.max_samples:
            shards = [s[: self.s.max_samples] for s in shards]
        if self.s.mode == "secagg":
            # The run's operator key exists before any worker certifies with it (a temporary
            # folder unless the caller names one in the run folder).
            if not self.s.operator_dir:
                self.s = replace(self.s, operator_dir=tempfile.mkdtemp(prefix="sim-operator-"))
            load_or_create_operator_key(Path(self.s.operator_dir))
        w = min(self.s.num_workers, self.s.devices)
        for wid in range(w):
            mine = list(range(wid, self.s.devices, w))
            proc = self._ctx.Process(
                target=_worker_main,
                args=(wid, self.endpoint_url, self.bucket, self.s, mine, [shards[i] for i in mine],
                      self._events, self._stop),
                name=f"sim-worker-{wid}", daemon=True,
            )  # fmt: skip
            proc.start()
            self._procs.append(proc)
        return self

    def drain(self, timeout_s: float = 0.0) -> Tally:
        """Take the workers' reports so far (waiting up to ``timeout_s`` for the first)."""
        block = timeout_s > 0
        while True:
            try:
                self.tally.take(
                    self._events.get(block, timeout_s) if block else self._events.get_nowait()
                )
            except queue.Empty:
                return self.tally
            block = False

    def alive(self) -> int:
        return sum(p.is_alive() for p in self._procs)

    def stop(self, grace_s: float = 60.0) -> Tally:
        self._stop.set()
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            self.drain(0.2)
        for p in self._procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
        self.drain()
        return self.tally

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class InFlight:
    """Samples the number of open cohorts (formed, no result yet) over time."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._ended: set[str] = set()
        self.samples: list[int] = []

    def sample(self) -> int:
        open_now = 0
        for cid in cohort_ids(self.store):
            if cid in self._ended:
                continue
            try:
                if self.store.head(layout.state_key(cid, Phase.RESULT)) is not None:
                    self._ended.add(cid)
            except FedError:
                pass
            if cid not in self._ended:
                open_now += 1
        self.samples.append(open_now)
        return open_now

    @property
    def max(self) -> int:
        return max(self.samples, default=0)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else 0.0


def overlapping_participations(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(client, cohort, cohort) for every device that was in two cohorts at once."""
    by_client: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_client.setdefault(r["client_id"], []).append(r)
    bad = []
    for client, rs in by_client.items():
        rs.sort(key=lambda r: r["joined_at"])
        for a, b in itertools.pairwise(rs):
            if b["joined_at"] < a["left_at"]:
                bad.append((client, a["cohort_id"], b["cohort_id"]))
    return bad


class UserPrivacyTally:
    """Each device's user-level spend: the RDP of every release it was a member of, composed
    by the one ledger (``fedcore.dp.ledger.ReleaseTally``), as a version's report entry.

    The device code accounts the worst case (only the minimum survive) before it
    uploads; this tally composes what each release actually states (its
    survivors' noise), which is the guarantee a published version carries.
    """

    def __init__(self) -> None:
        self.releases = ReleaseTally()

    def add(
        self, privacy: Any, members: list[str], *, where: str = "release"
    ) -> dict[str, Any] | None:
        """Compose one version's release; its report entry (None without user-level DP).
        Malformed accounting raises ``IntegrityError`` naming ``where``."""
        release = self.releases.add(privacy, members, where=where)
        if release is None:
            return None
        top, median, count = self.releases.device_spread()
        user = release.stated
        return {
            "user_epsilon": user["epsilon"],
            "user_epsilon_device_max": top,
            "user_epsilon_device_median": median,
            "devices_with_spend": count,
            "noise_multiplier": user["noise_multiplier"],
            "effective_noise_multiplier": user["effective_noise_multiplier"],
            "clip": user["clip"],
            "delta": user["delta"],
        }


def progress_line(entry: dict[str, Any]) -> str:
    acc = entry["test_accuracy"]
    spent = entry.get("privacy")
    eps = (
        f"  user eps release {spent['user_epsilon']:.2f} device max "
        f"{spent['user_epsilon_device_max']:.2f}"
        if spent
        else ""
    )
    return (
        f"v{entry['version']:<4} acc {acc if acc is None else f'{acc:.4f}'}  "
        f"in flight {entry['cohorts_in_flight']:<3} staleness {entry['staleness']:<3} "
        f"members {entry['members']:<4} participations {entry['participations']:<6} "
        f"devices {entry['devices_participated']:<5} {entry['elapsed_s']:8.1f}s{eps}"
    )


@dataclass(frozen=True)
class StopRule:
    """When a run ends: the first of accuracy reached, versions made, time spent."""

    target_accuracy: float = 0.0  # 0: never on accuracy
    max_versions: int = 0  # 0: no limit
    max_s: float = 1800.0

    def reached(self, version: int, accuracy: float | None) -> bool:
        if self.target_accuracy and accuracy is not None and accuracy >= self.target_accuracy:
            return True
        return bool(self.max_versions and version >= self.max_versions)
