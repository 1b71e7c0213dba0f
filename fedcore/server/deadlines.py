"""Inputs deadlines that adapt to how long recent members needed to train.

A fixed deadline with a fixed amount of local work means that when every device is
slower than the deadline, every cohort aborts. Devices report the seconds their
local training took in their upload metadata: ``UpdateMeta.train_s`` in plaintext,
the signed ``MaskedMeta.train_s`` under secure aggregation (the input round's close
keeps the cohort's percentile with the masked sum, ``secure.encode_sum``, until the
finalize writes the version). Each applied version's metrics keep the cohort's 90th
percentile of them (``train_s_p90``), so "recent" needs no database: formation reads
the last ``deadline_window`` versions' metrics and sizes the new cohort's inputs
deadline as ``deadline_margin`` times the slowest of those percentiles, within
``[deadline_min_s, deadline_max_s]``. Without reports (a fresh bucket, old devices)
or with ``deadline_margin`` 0, it is ``round_deadline_s`` as before.

Slow devices are not shut out for good: a device trains only what fits in its
cohort's inputs limit less a margin (``fedcore.device.machine.train_box``) and reports
those seconds, so when the slow members are the percentile, the next deadline is
``deadline_margin`` times (the limit less the margin), about 1.4 times the limit or more
for a margin of 2: deadlines grow until the slow members finish their local work,
up to ``deadline_max_s``, and shrink again (over ``deadline_window`` versions) when
they no longer need it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from fedcore.errors import IntegrityError, NotFoundError, StorageError
from fedcore.server.settings import ServerSettings

log = logging.getLogger(__name__)

TRAIN_P90 = "train_s_p90"  # the version metric: the cohort's 90th percentile of train_s
TRAIN_REPORTS = "train_s_reports"  # how many members reported train_s
TRAIN_METRICS = (TRAIN_P90, TRAIN_REPORTS)


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of non-empty ``values``."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def train_metrics(reported: Sequence[float]) -> dict[str, Any]:
    """The version metrics recording what the cohort's members reported (none: nothing)."""
    if not reported:
        return {}
    return {TRAIN_P90: round(percentile(reported, 90), 3), TRAIN_REPORTS: len(reported)}


def inputs_deadline_s(settings: ServerSettings, recent_p90: Sequence[float]) -> float:
    """The inputs phase limit of a new cohort, from recent cohorts' ``train_s_p90``."""
    if settings.deadline_margin <= 0 or not recent_p90:
        return settings.round_deadline_s
    wanted = settings.deadline_margin * max(recent_p90)
    return min(settings.deadline_max_s, max(settings.deadline_min_s, wanted))


class RecentTraining:
    """Reads (and remembers: versions are immutable) the last versions' ``train_s_p90``."""

    def __init__(self, read_metrics: Callable[[int], dict[str, Any]]) -> None:
        self.read_metrics = read_metrics
        self._seen: dict[int, float | None] = {}

    def p90s(self, head: int, window: int) -> list[float]:
        out = []
        for version in range(head, max(0, head - window), -1):  # version 0 is the seed
            if version not in self._seen:
                try:
                    value = self.read_metrics(version).get(TRAIN_P90)
                except (NotFoundError, IntegrityError, StorageError) as exc:
                    log.warning(
                        "cannot read a version's metrics for the deadline",
                        extra={"version": version, "reason": str(exc)},
                    )
                    continue
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                self._seen[version] = float(value) if ok and math.isfinite(value) else None
            if (seen := self._seen[version]) is not None and seen >= 0:
                out.append(seen)
        return out
