"""A read-only summary of a bucket: versions and cohorts, for ``status`` views.

For an open cohort it also says what the cohort is waiting for (the phase the sweeper
would close next, how many expected members have not written in it, and when its
deadline falls on the server's clock), so a person watching a stalled run can tell a
slow phase from a cohort that is about to abort; an aborted one carries its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedcore import layout
from fedcore.errors import FedError, NotFoundError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, parse_config, parse_manifest, parse_result
from fedcore.server.vocabulary import PHASES, phase_kind
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
    # Open cohorts: the phase in progress ("finalize" once every phase closed), how many
    # of the members it expects have written, and when the sweeper closes it (server
    # clock, seconds since the epoch; None: no limit known). Aborted ones: why.
    open_phase: str | None = None
    expected: int = 0
    written: int = 0
    deadline_at: float | None = None
    reason: str = ""

    @property
    def waiting_for(self) -> int:
        """Expected members that have not written in the open phase yet."""
        return max(0, self.expected - self.written)


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
        cfg: CohortConfig | None = None
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
            cv.outcome, cv.version, cv.reason = res.status, res.version, res.reason
        elif cfg is not None:
            _progress(store, cfg, set(objs), cv)
        view.cohorts.append(cv)
    return view


def _progress(store: ObjectStore, cfg: CohortConfig, objs: set[str], cv: CohortView) -> None:
    """Fill an open cohort's phase, counts and deadline as the sweeper sees them (reads: the
    closed phases' manifests; the last one's members are whom the open phase expects)."""
    cid = cfg.cohort_id
    expected, start = sorted(cfg.members), cfg.created_at
    for phase in PHASES[cfg.mode]:
        key = layout.state_key(cid, phase)
        if key not in objs:
            kind = phase_kind(phase, cfg.mode)
            cv.open_phase, cv.expected = phase.value, len(expected)
            cv.written = sum(layout.member_key(cid, kind, c) in objs for c in expected)
            limit = cfg.phase_s.get(phase.value)
            cv.deadline_at = None if limit is None else start + limit
            return
        try:
            manifest = parse_manifest(store.get(key).body, where=key)
        except (NotFoundError, FedError):
            return  # a manifest listed but unreadable: nothing more to say
        expected, start = manifest.members, manifest.closed_at
    cv.open_phase, cv.expected, cv.written = "finalize", 0, 0
