"""FedBuff-style asynchronous apply with the version log as the commit.

``new = current + server_lr * w(s) * mean_delta`` where s = head - base is the
cohort's staleness in versions (Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", section 3; w(s) = 1/sqrt(1+s) there).
Exactly-once: before each commit attempt the versions since the cohort's base
are searched for the cohort's id, so a retried or concurrent apply of the same
cohort stops instead of applying it twice.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcore.codec import ModelMeta
from fedcore.storage import ObjectStore
from fedcore.versions import advance_pointer, commit_version, find_head, load_model, read_meta

log = logging.getLogger(__name__)

STALENESS_WEIGHTS: dict[str, Callable[[int], float]] = {
    "inverse_sqrt": lambda s: 1.0 / math.sqrt(1.0 + s),
    "constant": lambda s: 1.0,
    "inverse": lambda s: 1.0 / (1.0 + s),
}


def staleness_weight(staleness: int, rule: str = "inverse_sqrt") -> float:
    if staleness < 0:
        raise ValueError(f"negative staleness {staleness}")
    return STALENESS_WEIGHTS[rule](staleness)


@dataclass(frozen=True)
class Applied:
    version: int
    staleness: int
    weight: float
    already: bool  # True when an earlier (or concurrent) attempt had committed it


def _applied_in(store: ObjectStore, cohort_id: str, versions: range) -> int | None:
    for v in versions:
        if cohort_id in read_meta(store, v).cohorts:
            return v
    return None


def find_applied(store: ObjectStore, cohort_id: str, base_version: int) -> int | None:
    """The version that applied ``cohort_id``, if any (it can only be newer than its base)."""
    return _applied_in(store, cohort_id, range(base_version + 1, find_head(store) + 1))


def apply_cohort(
    store: ObjectStore,
    *,
    cohort_id: str,
    base_version: int,
    mean_delta: dict[str, np.ndarray],
    server_lr: float,
    rule: str,
    members: list[str],
    num_samples: int,
    metrics: dict | None = None,
) -> Applied:
    """Commit ``mean_delta`` on top of the newest version, exactly once."""
    head = find_head(store)
    found = _applied_in(store, cohort_id, range(base_version + 1, head + 1))
    if found is not None:
        advance_pointer(store, head)
        return Applied(found, -1, 0.0, already=True)
    while True:
        params, _, _ = load_model(store, head)
        s = head - base_version
        w = server_lr * staleness_weight(s, rule)
        new = {k: (params[k] + np.float32(w) * mean_delta[k]).astype(np.float32) for k in params}
        meta = ModelMeta(
            version=head + 1,
            parent=head,
            cohorts=[cohort_id],
            staleness=s,
            base_version=base_version,
            weight=w,
            members=sorted(members),
            num_samples=num_samples,
            created_at=time.time(),
            metrics=metrics or {},
        )
        digest = commit_version(store, new, meta)
        if digest is not None:
            advance_pointer(store, head + 1, digest)
            return Applied(head + 1, s, w, already=False)
        # Lost the race for head+1: was the winner ourselves (a duplicate event)?
        new_head = find_head(store, head + 1)
        found = _applied_in(store, cohort_id, range(head + 1, new_head + 1))
        if found is not None:
            advance_pointer(store, new_head)
            return Applied(found, -1, 0.0, already=True)
        log.info(
            "lost commit race; rebuilding on newer version",
            extra={"cohort_id": cohort_id, "version": new_head},
        )
        head = new_head
