"""The sweeper: what no event triggers, done on a timer.

Events close a phase only when its last expected member writes, and finalize only
when the last manifest lands. The sweeper closes phases past their time limit,
redoes finalizations a crash interrupted (after ``stuck_after_s``), forms partial
cohorts from check-ins that waited ``checkin_wait_s``, advances a pointer left
behind by a crash, and expires old check-ins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedcore import layout
from fedcore.errors import IntegrityError, NotFoundError
from fedcore.layout import Phase
from fedcore.server.cache import Cache
from fedcore.server.settings import ServerSettings
from fedcore.server.vocabulary import PHASES, Outcome
from fedcore.storage import ObjectStore
from fedcore.versions import advance_pointer, find_head

# fedcore.server.coordinator's logger: the log lines read as they did before the split.
log = logging.getLogger("fedcore.server.coordinator")


class Sweeper:
    def __init__(
        self,
        store: ObjectStore,
        cache: Cache,
        settings: ServerSettings,
        *,
        clock: Callable[[], float],
        close_phase: Callable[[str, Phase, str], Outcome],
        finalize: Callable[[str], Outcome],
        form_cohorts: Callable[..., list[str]],
    ) -> None:
        self.store = store
        self.cache = cache
        self.settings = settings
        self.clock = clock
        self.close_phase = close_phase
        self.finalize = finalize
        self.form_cohorts = form_cohorts

    def sweep(self) -> dict[str, int]:
        """Close overdue phases, redo stuck finalizations, form partial cohorts, expire check-ins."""
        now = self.clock()
        counts = {"closed": 0, "finalized": 0, "formed": 0, "expired": 0}
        advance_pointer(self.store, find_head(self.store))  # a lagging pointer after a crash
        for cid in self.cache.open_cohorts():
            try:
                cfg = self.cache.config(cid)
            except NotFoundError:
                continue
            except IntegrityError as exc:
                log.error("unreadable cohort config", extra={"cohort_id": cid, "reason": str(exc)})
                continue
            start, current = cfg.created_at, None
            for phase in PHASES[cfg.mode]:
                m = self.cache.manifest(cid, phase)
                if m is None:
                    current = phase
                    break
                start = m.closed_at
            if current is None:
                if (
                    now - start >= self.settings.stuck_after_s
                    and self.finalize(cid) != Outcome.NOOP
                ):
                    counts["finalized"] += 1
            elif now >= start + cfg.phase_s.get(current.value, self.settings.round_deadline_s) and (
                self.close_phase(cid, current, "deadline") != Outcome.NOOP
            ):
                counts["closed"] += 1
        counts["formed"] = len(self.form_cohorts(allow_partial=True))
        for info in self.store.list(layout.CHECKINS_PREFIX):
            if now - info.last_modified > self.settings.checkin_ttl_s:
                self.store.delete(info.key)
                counts["expired"] += 1
        return counts
