"""Follow a bucket's global versions as they appear: the loop the demo and the simulator share.

``make demo`` and ``python -m infra.simulate`` watch a run the same way: wait
a little (the simulator drains its workers' reports meanwhile, the demo
sleeps), read the head, load every version past the last one seen, and end
when the time is up or whatever makes versions has exited. What a run does
with each version (evaluate it, build its report entry, print a line) stays
with the run; the loop, its clock and why it ended live here once.

``waiting_lines`` says why no version came yet, from ``fedcore.status.describe``'s
view: each open cohort's phase, how many members it waits for and when its deadline
falls, and each aborted cohort's reason (once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np

from fedcore.codec import ModelMeta
from fedcore.status import BucketView, CohortView
from fedcore.storage import ObjectStore
from fedcore.versions import find_head, load_model


class Ended(Enum):
    """Why ``VersionWatch.follow`` stopped by itself (a caller may also stop it early)."""

    TIMEOUT = "timeout"  # ``max_s`` passed
    EXITED = "exited"  # ``alive()`` said nothing that makes versions is left


@dataclass(frozen=True)
class NewVersion:
    version: int
    params: dict[str, np.ndarray]
    meta: ModelMeta


class VersionWatch:
    """New global versions of ``store``, in order, until ``max_s`` after ``t0``.

    ``seen`` is the last version already accounted for: the head at the start
    unless given (the demo counts from 0, so a reused bucket's versions count).
    """

    def __init__(
        self,
        store: ObjectStore,
        *,
        max_s: float,
        t0: float | None = None,
        seen: int | None = None,
    ) -> None:
        self.store = store
        self.max_s = max_s
        self.t0 = time.monotonic() if t0 is None else t0
        self.seen = find_head(store) if seen is None else seen
        self.ended: Ended | None = None

    def elapsed_s(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def follow(
        self, *, wait: Callable[[], None], alive: Callable[[], bool]
    ) -> Iterator[NewVersion]:
        """Yield each version past ``seen``; ``wait()`` runs before every read of the head.

        ``alive()`` is asked before the head is read, and the versions up to
        that head are yielded before the watch ends: a version written while
        the caller was evaluating the previous one, just before the last device
        exited, is not lost.
        """
        while time.monotonic() - self.t0 < self.max_s:
            wait()
            exited = not alive()
            head = find_head(self.store)
            while self.seen < head:
                self.seen += 1
                params, meta, _ = load_model(self.store, self.seen)
                yield NewVersion(self.seen, params, meta)
            if exited:
                self.ended = Ended.EXITED
                return
        self.ended = Ended.TIMEOUT


def waiting_lines(
    view: BucketView,
    *,
    next_version: int,
    elapsed_s: float,
    now: float,
    reported: Collection[str] = (),
) -> list[str]:
    """Why the run is still waiting for ``next_version``: a header, then one line per open
    cohort and per aborted cohort not in ``reported`` (ids already explained).

    ``now`` is on the server's clock (the deadlines' clock: ``time.time()`` unless the
    stack runs on another); a deadline in the past means the next sweep closes the phase.
    """
    open_ = [c for c in view.cohorts if c.outcome is None and c.open_phase is not None]
    aborted = [c for c in view.cohorts if c.outcome == "aborted" and c.cohort_id not in reported]
    what = (
        f"{len(open_)} open cohort{'' if len(open_) == 1 else 's'}" if open_ else "no open cohort"
    )
    lines = [f"... waiting for v{next_version} ({elapsed_s:.0f}s): {what}"]
    lines += [f"    {_open_line(c, now)}" for c in open_]
    lines += [f"    {c.cohort_id} aborted: {c.reason or 'no reason recorded'}" for c in aborted]
    return lines


def _open_line(c: CohortView, now: float) -> str:
    base = f"{c.cohort_id} (base v{c.base_version})"
    if c.open_phase == "finalize":
        return f"{base}: every phase closed, being finalized"
    waits = f"{c.open_phase}, waiting for {c.waiting_for} of {c.expected}"
    if c.deadline_at is None:
        return f"{base}: {waits}, no deadline"
    left = c.deadline_at - now
    when = f"deadline in {left:.0f}s" if left >= 0 else f"deadline passed {-left:.0f}s ago"
    return f"{base}: {waits}, {when}"
