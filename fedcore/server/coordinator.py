"""The aggregation function's logic: form cohorts, close phases, finalize.

Stateless by design: every decision is re-derived from the bucket, and every
step ends in one write-once object, so a duplicated, reordered or retried
event repeats a step harmlessly:

    check-ins --(K waiting)--> config.json                (formation)
    member objects of a phase --(all in, or deadline)--> state/{phase}.json
        secagg phases: keys (U1) -> shares (U2) -> inputs (U3, + masked sum) -> unmask (U4)
        plaintext:     inputs
    last phase closed --> global/v{N+1} + latest.json     (apply; the version is the commit)
                          state/result.json               (record; written after the commit)

The sweeper calls ``sweep`` on a timer to close phases past their time limit,
form partial cohorts and redo finalizations a crash interrupted. Caches hold
only immutable facts (write-once configs, identities, messages by ETag,
closed cohorts), so a warm Lambda container never acts on stale state.

This class is the facade the handlers call; each concern is its own module:
``cache`` (immutable read-through caches), ``formation``, ``phases`` (with the
SecAgg+ admission rules in ``fedcore.secagg.admission``), ``finalize`` and
``sweep``. A cohort that must abort raises ``CohortAborted`` wherever that is
found; ``_recording_aborts`` is the one place that records it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedcore import layout
from fedcore.errors import IntegrityError, NotFoundError, UnknownKeyError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, Result
from fedcore.metrics import MetricSink
from fedcore.server.cache import PREFETCH_CONCURRENCY, Cache
from fedcore.server.finalize import CohortMean, Finalizer
from fedcore.server.formation import Formation, Waiting
from fedcore.server.phases import Phases
from fedcore.server.settings import ServerSettings
from fedcore.server.sweep import Sweeper
from fedcore.server.vocabulary import (
    PHASES,
    CohortAborted,
    Outcome,
    kind_phase,
    no_metrics,
    phase_kind,
)
from fedcore.storage import ObjectStore

__all__ = [
    "PHASES",
    "PREFETCH_CONCURRENCY",
    "CohortAborted",
    "CohortMean",
    "Coordinator",
    "MetricSink",
    "Outcome",
    "Waiting",
    "kind_phase",
    "phase_kind",
]

log = logging.getLogger(__name__)

_MEMBER_KINDS = (Kind.KEYS, Kind.SHARES, Kind.PLAIN, Kind.MASKED, Kind.UNMASK)


class Coordinator:
    """Routes bucket events to the step they trigger; records every abort in one place.

    ``metric`` and ``clock`` are read at each use, so a caller may replace them on a
    built coordinator.
    """

    def __init__(
        self,
        store: ObjectStore,
        settings: ServerSettings,
        *,
        metric: MetricSink = no_metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metric = metric
        self.clock = clock
        self.cache = Cache(store)
        self.formation = Formation(store, self.cache, settings, metric=self._emit, clock=self._now)
        self.finalizer = Finalizer(store, self.cache, settings, metric=self._emit, clock=self._now)
        self.phases = Phases(
            store, self.cache, sum_inputs=self.finalizer.sum_inputs, clock=self._now
        )
        self.sweeper = Sweeper(
            store, self.cache, settings, clock=self._now, close_phase=self.close_phase,
            finalize=self.finalize, form_cohorts=self.form_cohorts,
        )  # fmt: skip

    def _emit(self, name: str, value: float, unit: str) -> None:
        self.metric(name, value, unit)

    def _now(self) -> float:
        return self.clock()

    # -- routing -----------------------------------------------------------
    def on_object_created(self, key: str) -> Outcome:
        """React to one new object; returns what was done (for logs and tests)."""
        try:
            parsed = layout.parse_key(key)
        except UnknownKeyError as exc:
            log.warning("ignored object outside the layout", extra={"key": key, "reason": str(exc)})
            return Outcome.IGNORED
        if parsed.kind is Kind.CHECKIN:
            return Outcome.FORMED if self.form_cohorts() else Outcome.WAITING
        if parsed.cohort_id is None:
            return Outcome.NOOP
        cid = parsed.cohort_id
        if parsed.kind in _MEMBER_KINDS and parsed.client_id is not None:
            return self.on_member_object(cid, parsed.kind, parsed.client_id)
        if parsed.kind is Kind.STATE and parsed.phase not in (None, Phase.RESULT):
            try:
                cfg = self.config(cid)
            except (NotFoundError, IntegrityError):
                return Outcome.NOOP
            if parsed.phase is PHASES[cfg.mode][-1]:
                return self.finalize(cid)
            # The invocation that wrote the manifest may have died before acting on it
            # (aborting a cohort below its minimum): its event is the retry.
            return self.close_phase(cid, parsed.phase, "manifest event")
        return Outcome.NOOP

    # -- steps (each records an abort it runs into) ---------------------------
    def form_cohorts(self, *, allow_partial: bool = False) -> list[str]:
        """Form as many cohorts as the waiting check-ins allow; returns their ids."""
        return self.formation.form_cohorts(allow_partial=allow_partial)

    def on_member_object(self, cid: str, kind: Kind, client: str) -> Outcome:
        """Count a member's object; close its phase once every expected member has written."""
        return self._recording_aborts(cid, lambda: self.phases.on_member_object(cid, kind, client))

    def close_phase(self, cid: str, phase: Phase, why: str) -> Outcome:
        """Close ``phase`` with the valid objects present now; abort if too few."""
        return self._recording_aborts(cid, lambda: self.phases.close_phase(cid, phase, why))

    def finalize(self, cid: str) -> Outcome:
        """Aggregate the closed cohort and apply it, or abort; idempotent."""
        return self._recording_aborts(cid, lambda: self.finalizer.finalize(cid))

    def sweep(self) -> dict[str, int]:
        """Close overdue phases, redo stuck finalizations, form partial cohorts, expire check-ins."""
        return self.sweeper.sweep()

    def _recording_aborts(self, cid: str, step: Callable[[], Outcome]) -> Outcome:
        """Run a step; a ``CohortAborted`` it raises is recorded as the cohort's result."""
        try:
            return step()
        except CohortAborted as aborted:
            return self.finalizer.abort(self.config(cid), aborted)

    # -- reads (cached where immutable) -----------------------------------------
    def config(self, cid: str) -> CohortConfig:
        return self.cache.config(cid)

    def manifest(self, cid: str, phase: Phase) -> Manifest | None:
        return self.cache.manifest(cid, phase)

    def result(self, cid: str) -> Result | None:
        return self.cache.result(cid)

    def identity(self, client: str) -> bytes:
        return self.cache.identity(client)

    def expected(self, cid: str, cfg: CohortConfig, phase: Phase) -> list[str] | None:
        return self.cache.expected(cid, cfg, phase)

    def cohort_ids(self) -> list[str]:
        return self.cache.cohort_ids()

    def open_cohorts(self) -> list[str]:
        return self.cache.open_cohorts()
