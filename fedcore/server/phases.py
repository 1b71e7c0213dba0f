"""Phase bookkeeping: who may write in a phase, who has, and the write-once close.

A phase closes once, in a write-once manifest (``state/{phase}.json``) naming exactly
the members whose objects are valid at that moment: when the last expected member
writes (``all-members``) or at the deadline (the sweeper). Whoever loses the race to
write the manifest adopts the winner's. A phase that closes with fewer valid members
than the cohort's minimum aborts the cohort (``CohortAborted``, recorded by the
coordinator).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fedcore import layout
from fedcore.codec import max_update_bytes
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    UnknownKeyError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import MAX_MESSAGE_BYTES, CohortConfig, Manifest, Mode, dumps
from fedcore.secagg import admission
from fedcore.server import secure
from fedcore.server.cache import Cache
from fedcore.server.vocabulary import PHASES, CohortAborted, Outcome, kind_phase, phase_kind
from fedcore.storage import ObjectStore

# fedcore.server.coordinator's logger: the log lines read as they did before the split.
log = logging.getLogger("fedcore.server.coordinator")

# Validates and sums a secure cohort's masked uploads: (valid member -> ETag, sum key,
# valid member -> its signed sample count, recorded in the manifest's ``verified``).
SumInputs = Callable[[CohortConfig, dict[str, str]], tuple[dict[str, str], str, dict[str, str]]]


class Phases:
    def __init__(
        self,
        store: ObjectStore,
        cache: Cache,
        *,
        sum_inputs: SumInputs,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.cache = cache
        self.sum_inputs = sum_inputs
        self.clock = clock

    def on_member_object(self, cid: str, kind: Kind, client: str) -> Outcome:
        """Count a member's object; close its phase once every expected member has written."""
        key = layout.member_key(cid, kind, client)
        extra = {"cohort_id": cid, "client_id": client, "key": key}
        try:
            cfg = self.cache.config(cid)
        except (NotFoundError, IntegrityError) as exc:
            log.warning("object for an unknown cohort", extra={**extra, "reason": str(exc)})
            return Outcome.REJECTED
        phase = kind_phase(kind, cfg.mode)
        if phase is None:
            why = f"{key}: {kind.value} objects are not used in {cfg.mode} mode"
            log.warning("object of the wrong mode; ignored", extra={**extra, "reason": why})
            return Outcome.REJECTED
        extra["phase"] = phase.value
        expected = self.cache.expected(cid, cfg, phase)
        if expected is None:
            log.warning("object before its phase opened; not counted", extra=extra)
            return Outcome.EARLY
        if client not in expected:
            why = (
                f"{key}: {client} is not a member of {cid}"
                if client not in cfg.members
                else f"{key}: {client} was not counted in the previous phase"
            )
            log.warning(
                "object from a client not expected in this phase; ignored",
                extra={**extra, "reason": why},
            )
            return Outcome.REJECTED
        if (closed := self.cache.manifest(cid, phase)) is not None:
            if client not in closed.members:
                if self.refused_by_cap(cfg, phase, key):
                    # The close refused it by size and logged why; it is not late.
                    return Outcome.REJECTED
                log.warning("late object after the phase closed; not counted", extra=extra)
                return Outcome.LATE
            return Outcome.NOOP  # a re-delivered event for an object already counted
        if set(self.present(cid, cfg, phase, expected)) >= set(expected):
            return self.close_phase(cid, phase, "all-members")
        return Outcome.WAITING

    def refused_by_cap(self, cfg: CohortConfig, phase: Phase, key: str) -> bool:
        """Whether the object at ``key`` is over the phase's size cap (one HEAD, late objects only)."""
        size = self.cache.size(key)
        if not size:
            try:
                info = self.store.head(key)
            except FedError:
                return False  # cannot tell: say "late", as before
            size = info.size if info is not None else 0
        return size > self.size_cap(cfg, phase)

    def present(
        self, cid: str, cfg: CohortConfig, phase: Phase, expected: list[str]
    ) -> dict[str, str]:
        """Expected member -> ETag of its object in this phase's folder (others are logged)."""
        out: dict[str, str] = {}
        for info in self.store.list(layout.member_prefix(cid, phase_kind(phase, cfg.mode))):
            try:
                client = layout.parse_key(info.key).client_id
            except UnknownKeyError as exc:
                log.warning(
                    "ignored stray object",
                    extra={"key": info.key, "cohort_id": cid, "reason": str(exc)},
                )
                continue
            if client in expected:
                out[client] = info.etag
                self.cache.note_size(info.key, info.size)
        return out

    def size_cap(self, cfg: CohortConfig, phase: Phase) -> int:
        """The largest object an honest member can write in ``phase`` (derived from the model)."""
        return size_cap(self.cache, cfg, phase)

    def within_cap(
        self, cfg: CohortConfig, phase: Phase, present: dict[str, str]
    ) -> dict[str, str]:
        """Drop (as dropouts) members whose listed object is too large to be honest, unread."""
        cap = self.size_cap(cfg, phase)
        out = {}
        for client, etag in present.items():
            key = layout.member_key(cfg.cohort_id, phase_kind(phase, cfg.mode), client)
            size = self.cache.size(key)
            if size > cap:
                log.warning(
                    "member object rejected; treated as a dropout",
                    extra={
                        "cohort_id": cfg.cohort_id, "client_id": client, "phase": phase.value,
                        "key": key, "reason": over_cap_reason(key, size, cap),
                    },
                )  # fmt: skip
                continue
            out[client] = etag
        return out

    def close_phase(self, cid: str, phase: Phase, why: str) -> Outcome:
        """Close ``phase`` with the valid objects present now; ``CohortAborted`` if too few."""
        cfg = self.cache.config(cid)
        if (existing := self.cache.manifest(cid, phase)) is not None:
            return self.after_close(cfg, phase, existing, won=False)
        if self.cache.result(cid) is not None:  # aborted earlier: later phases never open
            self.cache.mark_closed(cid)
            return Outcome.NOOP
        expected = self.cache.expected(cid, cfg, phase)
        if expected is None:
            return Outcome.NOOP
        present = self.within_cap(cfg, phase, self.present(cid, cfg, phase, expected))
        valid: dict[str, str] = {}
        verified: dict[str, str] = {}
        sum_key = ""
        if phase is Phase.INPUTS and cfg.mode is Mode.SECAGG:
            valid, sum_key, verified = self.sum_inputs(cfg, present)
        elif phase is Phase.INPUTS:
            valid = present  # plaintext updates are validated while averaging
        else:
            self.cache.prefetch(cid, cfg, phase, present)
            for client, etag in sorted(present.items()):
                try:
                    msg = self.cache.message(cid, cfg, phase, client, etag)
                    valid[client] = etag
                    if (value := admission.public_value(msg)) is not None:
                        verified[client] = value
                except (IntegrityError, NotFoundError) as exc:
                    log.warning(
                        "member object rejected; treated as a dropout",
                        extra={
                            "cohort_id": cid,
                            "client_id": client,
                            "phase": phase.value,
                            "key": layout.member_key(cid, phase_kind(phase, cfg.mode), client),
                            "reason": str(exc),
                        },
                    )
        manifest = Manifest(
            cid, phase.value, sorted(valid), dict(sorted(valid.items())), why, self.clock(),
            sum_key, verified,
        )  # fmt: skip
        try:
            self.store.put_new(
                layout.state_key(cid, phase), dumps(manifest), content_type="application/json"
            )
        except AlreadyExistsError:
            return self.after_close(
                cfg, phase, self.cache.manifest(cid, phase) or manifest, won=False
            )
        log.info(
            "phase closed",
            extra={
                "cohort_id": cid,
                "phase": phase.value,
                "members": manifest.members,
                "closed_by": why,
            },
        )
        return self.after_close(cfg, phase, manifest, won=True)

    def after_close(
        self, cfg: CohortConfig, phase: Phase, manifest: Manifest, *, won: bool
    ) -> Outcome:
        """What a closed phase means: the cohort goes on, or it aborts below its minimum."""
        minimum = 1 if phase is Phase.UNMASK else cfg.min_members
        if cfg.dp is not None and phase is not Phase.UNMASK:
            # Formation sets this minimum; a config that does not (an older function's)
            # must still not release with less noise than the config promises.
            minimum = max(minimum, cfg.dp.expected_survivors)
        if len(manifest.members) < minimum:
            if not won and self.cache.result(cfg.cohort_id) is not None:
                return Outcome.NOOP  # a redelivered event; the abort is already recorded
            raise CohortAborted(
                f"{phase.value}: {len(manifest.members)} valid members < minimum {minimum}"
            )
        return Outcome.CLOSED if won else Outcome.NOOP


def size_cap(cache: Cache, cfg: CohortConfig, phase: Phase) -> int:
    """The largest object an honest member can write in ``phase`` (derived from the model)."""
    if phase is not Phase.INPUTS:
        return MAX_MESSAGE_BYTES
    return input_cap(cache.schema(cfg.base_version), cfg.mode)


def input_cap(schema: dict[str, tuple[str, tuple[int, ...]]], mode: Mode) -> int:
    """The largest input (plain update or masked vector) an honest member of a cohort on a
    model of ``schema`` writes; the gateway signs upload URLs for at most this size."""
    if mode is Mode.PLAINTEXT:
        return max_update_bytes(schema)
    return max_update_bytes({"masked": ("U32", (secure.vector_length(schema),))}, "U32")


def over_cap_reason(key: str, size: int, cap: int) -> str:
    return (
        f"{key}: object of {size} bytes exceeds the {cap}-byte cap for this phase (not downloaded)"
    )


def refused_by_size(store: ObjectStore, cache: Cache, cfg: CohortConfig) -> dict[str, str]:
    """Member -> why, for every member object of the cohort that a close refused by size.

    The manifests name only the members counted; re-listing (one LIST per phase) lets
    the result's ``rejected`` map give these refusals their reason, as for every other.
    """
    out: dict[str, str] = {}
    for phase in PHASES[cfg.mode]:
        cap = size_cap(cache, cfg, phase)
        for info in store.list(layout.member_prefix(cfg.cohort_id, phase_kind(phase, cfg.mode))):
            if info.size <= cap:
                continue
            try:
                client = layout.parse_key(info.key).client_id
            except UnknownKeyError:
                continue
            if client in cfg.members:
                out.setdefault(client, over_cap_reason(info.key, info.size, cap))
    return out
