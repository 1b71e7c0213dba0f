"""The aggregation and sweeper functions, invoked synchronously with real S3 event JSON.

A listing-based event source like ``infra.pump`` without its threads, so that a test
decides exactly when, how often, in which order and how concurrently each object's
event is delivered. The functions run through their real handlers on a real S3 API;
the coordinator's clock is advanced instead of waiting out deadlines, and its store can
be wrapped (``tests.crashpoints.CrashingStore``) to kill invocations. An invocation that
dies is redelivered, as Lambda retries a failed asynchronous invocation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import functions.aggregator.app as aggregator_app
import functions.sweeper.app as sweeper_app
from fedcore import layout
from fedcore.events import build_event, build_record
from fedcore.layout import Phase
from fedcore.messages import CohortConfig, Manifest, Result, parse_manifest
from fedcore.participant import Participant
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import ObjectInfo, S3Store
from fedcore.versions import find_head
from infra.pump import LocalContext
from tests.crashpoints import Killed
from tests.helpers import participant


class SyncFunctions:
    def __init__(
        self,
        store: S3Store,
        settings: dict[str, Any],
        mp: pytest.MonkeyPatch,
        *,
        function_store: Any = None,
    ) -> None:
        self.store = store  # the devices' and the event source's view
        self.crashing = function_store if function_store is not None else store
        self.settings = ServerSettings(**settings)
        self.pending: list[ObjectInfo] = []  # objects whose event is not delivered yet
        self.invocations = 0
        self.offset = 0.0
        self.kills = 0
        self._seen: set[tuple[str, str]] = set()
        self._seq = 0

        def coordinator(metric: Any = None) -> Coordinator:
            return Coordinator(self.crashing, self.settings, clock=self.now)

        mp.setattr(aggregator_app, "coordinator", coordinator)
        mp.setattr(sweeper_app, "coordinator", coordinator)
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.time() + self.offset

    def _invoke(self, handler: Callable[..., Any], event: dict[str, Any], name: str) -> None:
        for _ in range(100):
            with self._lock:
                self.invocations += 1
            try:
                handler(event, LocalContext(name))
                return
            except Killed:
                self.kills += 1  # Lambda retries the event in a fresh invocation
        raise AssertionError("an event kept failing after 100 redeliveries")

    def collect(self) -> int:
        """Queue an event for every object not seen before (S3 emits one per write)."""
        new = [
            info
            for prefix in (layout.CHECKINS_PREFIX, layout.COHORTS_PREFIX)
            for info in self.store.list(prefix)
            if (info.key, info.etag) not in self._seen
        ]
        for info in new:
            self._seen.add((info.key, info.etag))
        self.pending.extend(new)
        return len(new)

    def deliver_one(self, info: ObjectInfo) -> None:
        with self._lock:
            self._seq += 1
            seq = self._seq
        record = build_record(
            bucket=self.store.bucket, key=info.key, size=info.size, etag=info.etag, sequencer=seq
        )
        self._invoke(aggregator_app.handler, build_event([record]), "aggregator")

    def deliver(self) -> None:
        """Deliver every queued and new object's event, in order, until none is left."""
        while self.collect() or self.pending:
            batch, self.pending = self.pending, []
            for info in batch:
                self.deliver_one(info)

    def sweep(self, advance_s: float = 0.0) -> None:
        self.offset += advance_s
        self._invoke(sweeper_app.handler, {"source": "aws.events"}, "sweeper")
        self.deliver()

    # -- devices ----------------------------------------------------------------
    def join(self, parts: list[Participant]) -> CohortConfig:
        head = find_head(self.store)
        tickets = {p.client_id: p.check_in(head) for p in parts}
        self.deliver()
        cfgs = [p.find_cohort(tickets[p.client_id])[0] for p in parts]
        ids = {c.cohort_id if c else None for c in cfgs}
        assert len(ids) == 1 and None not in ids, f"members landed in {ids}"
        return cfgs[0]  # type: ignore[return-value]

    def manifest(self, cfg: CohortConfig, phase: Phase) -> Manifest:
        key = layout.state_key(cfg.cohort_id, phase)
        return parse_manifest(self.store.get(key).body, where=key)

    def result(self, cfg: CohortConfig) -> Result | None:
        return participant(self.store, "reader").result(cfg.cohort_id)
