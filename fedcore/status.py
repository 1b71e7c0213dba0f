"""A read-only summary of a bucket: versions and cohorts, for ``status`` views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcore import layout
from fedcore.errors import FedError, NotFoundError
from fedcore.layout import Kind, Phase
from fedcore.messages import parse_config, parse_result
from fedcore.storage import ObjectStore
from fedcore.versions import find_head, read_meta, read_pointer


@dataclass
class CohortView:
    cohort_id: str
    base_version: int | None
    members: int
    uploads: int
    phases: list[str]
    outcome: str | None = None
    version: int | None = None


@dataclass
class BucketView:
    pointer_version: int
    head_version: int
    versions: list[dict[str, Any]] = field(default_factory=list)
    cohorts: list[CohortView] = field(default_factory=list)


def cohort_ids(store: ObjectStore) -> list[str]:
    """Every cohort folder's id, oldest first (ids sort by their sequence number).

    A folder whose name is not a cohort id (a stray ``cohorts/evil/x``) is not a
    cohort: counting it would break formation's ``max + 1`` for everyone.
    """
    ids = [p[len(layout.COHORTS_PREFIX) : -1] for p in store.list_prefixes(layout.COHORTS_PREFIX)]
    return [i for i in ids if layout.is_cohort_id(i)]


def describe(store: ObjectStore, *, versions: int = 10, cohorts: int = 10) -> BucketView:
    pointer, _ = read_pointer(store)
    head = find_head(store)
    view = BucketView(pointer.version, head)
    for v in range(max(0, head - versions + 1), head + 1):
        m = read_meta(store, v)
        view.versions.append(
            {
                "version": v,
                "parent": m.parent,
                "cohorts": m.cohorts,
                "staleness": m.staleness,
                "members": len(m.members),
                "created_at": m.created_at,
            }
        )
    ids = cohort_ids(store)
    for cid in ids[-cohorts:]:
        objs = [o.key for o in store.list(layout.cohort_prefix(cid))]
        try:
            cfg = parse_config(store.get(layout.config_key(cid)).body, where=cid)
            base, members = cfg.base_version, len(cfg.members)
        except (NotFoundError, FedError):
            base, members = None, 0
        phases = [p.value for p in Phase if layout.state_key(cid, p) in objs]
        uploads = sum(1 for k in objs if k.startswith(layout.member_prefix(cid, Kind.PLAIN)))
        cv = CohortView(cid, base, members, uploads, phases)
        if Phase.RESULT.value in phases:
            key = layout.state_key(cid, Phase.RESULT)
            res = parse_result(store.get(key).body, where=key)
            cv.outcome, cv.version = res.status, res.version
        view.cohorts.append(cv)
    return view
