"""The aggregation function's logic: form cohorts, close phases, finalize.

Stateless by design: every decision is re-derived from the bucket, and every
step ends in one write-once object, so a duplicated, reordered or retried
event repeats a step harmlessly:

    check-in  --(K waiting)-->  config.json            (formation, write-once)
    upload    --(all in)----->  state/inputs.json      (phase close, write-once)
    inputs    --------------->  global/v{N+1} + latest (apply; the version is the commit)
                                state/result.json      (record; written after the commit)

The sweeper calls ``sweep`` on a timer to close phases whose deadline passed,
form partial cohorts and redo finalizations a crash interrupted.
Caches hold only immutable facts (configs, closed cohorts), so a warm Lambda
container never acts on stale state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcore import layout
from fedcore.codec import UpdateMeta
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    UnknownKeyError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import (
    CohortConfig,
    Manifest,
    Result,
    dumps,
    parse_checkin,
    parse_config,
    parse_manifest,
    parse_result,
)
from fedcore.server.aggregate import weighted_mean
from fedcore.server.apply import apply_cohort, find_applied
from fedcore.server.settings import ServerSettings
from fedcore.storage import ObjectInfo, ObjectStore
from fedcore.versions import advance_pointer, find_head, read_meta, read_schema

log = logging.getLogger(__name__)

MetricSink = Callable[[str, float, str], None]


def _no_metrics(name: str, value: float, unit: str) -> None:
    return None


@dataclass(frozen=True)
class Waiting:
    client_id: str
    nonce: str
    key: str
    since: float


class Coordinator:
    def __init__(
        self,
        store: ObjectStore,
        settings: ServerSettings,
        *,
        metric: MetricSink = _no_metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metric = metric
        self.clock = clock
        self._configs: dict[str, CohortConfig] = {}
        self._closed: set[str] = set()

    # -- routing -----------------------------------------------------------
    def on_object_created(self, key: str) -> str:
        """React to one new object; returns what was done (for logs and tests)."""
        try:
            parsed = layout.parse_key(key)
        except UnknownKeyError as exc:
            log.warning("ignored object outside the layout", extra={"key": key, "reason": str(exc)})
            return "ignored"
        if parsed.kind is Kind.CHECKIN:
            return "formed" if self.form_cohorts() else "waiting"
        if parsed.kind is Kind.PLAIN:
            assert parsed.cohort_id and parsed.client_id
            return self.on_update(parsed.cohort_id, parsed.client_id)
        if parsed.kind is Kind.STATE and parsed.phase is Phase.INPUTS:
            assert parsed.cohort_id
            return self.finalize(parsed.cohort_id)
        return "noop"

    # -- reads with immutable caches --------------------------------------
    def config(self, cid: str) -> CohortConfig:
        if cid not in self._configs:
            key = layout.config_key(cid)
            self._configs[cid] = parse_config(self.store.get(key).body, where=key)
        return self._configs[cid]

    def _manifest(self, cid: str, phase: Phase) -> Manifest | None:
        key = layout.state_key(cid, phase)
        try:
            return parse_manifest(self.store.get(key).body, where=key)
        except NotFoundError:
            return None

    def result(self, cid: str) -> Result | None:
        key = layout.state_key(cid, Phase.RESULT)
        try:
            return parse_result(self.store.get(key).body, where=key)
        except NotFoundError:
            return None

    def cohort_ids(self) -> list[str]:
        return [
            p[len(layout.COHORTS_PREFIX) : -1]
            for p in self.store.list_prefixes(layout.COHORTS_PREFIX)
        ]

    def open_cohorts(self) -> list[str]:
        """Cohorts without a result, oldest first (closed ones are remembered)."""
        out = []
        for cid in self.cohort_ids():
            if cid in self._closed:
                continue
            if self.store.head(layout.state_key(cid, Phase.RESULT)) is not None:
                self._closed.add(cid)
                continue
            out.append(cid)
        return out

    # -- formation ---------------------------------------------------------
    def _waiting(self, now: float) -> tuple[list[Waiting], list[str]]:
        """Untaken, unexpired check-ins (oldest per client first) and the open cohort ids."""
        listed: list[ObjectInfo] = list(self.store.list(layout.CHECKINS_PREFIX))
        open_ids = self.open_cohorts()  # listed *after* the check-ins: see participant.check_in
        taken: set[tuple[str, str]] = set()
        for cid in open_ids:
            try:
                taken.update(self.config(cid).members.items())
            except NotFoundError:
                continue  # a prefix without config yet: its writer is mid-flight
        by_client: dict[str, Waiting] = {}
        for info in sorted(listed, key=lambda i: (i.last_modified, i.key)):
            try:
                parsed = layout.parse_key(info.key)
            except UnknownKeyError:
                log.warning("ignored stray object under checkins/", extra={"key": info.key})
                continue
            if parsed.kind is not Kind.CHECKIN or parsed.client_id is None or parsed.nonce is None:
                continue
            if (parsed.client_id, parsed.nonce) in taken:
                continue
            if now - info.last_modified > self.settings.checkin_ttl_s:
                continue
            by_client.setdefault(
                parsed.client_id,
                Waiting(parsed.client_id, parsed.nonce, info.key, info.last_modified),
            )
        return sorted(by_client.values(), key=lambda w: (w.since, w.key)), open_ids

    def form_cohorts(self, *, allow_partial: bool = False) -> list[str]:
        """Form as many cohorts as the waiting check-ins allow; returns their ids."""
        s = self.settings
        formed: list[str] = []
        for _ in range(50):
            now = self.clock()
            waiting, _ = self._waiting(now)
            if len(waiting) < s.cohort_size:
                partial_ok = (
                    allow_partial
                    and len(waiting) >= s.min_cohort_size
                    and now - waiting[0].since >= s.checkin_wait_s
                )
                if not partial_ok:
                    return formed
            chosen = [w for w in waiting[: s.cohort_size] if self._checkin_valid(w)]
            if len(chosen) < min(s.cohort_size, len(waiting)):
                continue  # a bad check-in was deleted; recount
            ids = self.cohort_ids()
            seq = layout.cohort_seq(ids[-1]) + 1 if ids else 1
            cid = layout.cohort_id(seq)
            try:
                base = find_head(self.store)
            except NotFoundError:
                log.error("bucket has no global model; seed version 0 first")
                return formed
            cfg = CohortConfig(
                cohort_id=cid,
                base_version=base,
                members={w.client_id: w.nonce for w in chosen},
                mode=s.mode,
                min_members=min(s.min_cohort_size, len(chosen)),
                created_at=now,
                deadlines={Phase.INPUTS.value: now + s.round_deadline_s},
                server_lr=s.server_lr,
                params={"staleness_weight": s.staleness_weight},
            )
            try:
                self.store.put_new(
                    layout.config_key(cid), dumps(cfg), content_type="application/json"
                )
            except AlreadyExistsError:
                continue  # another invocation took this id: re-list and try the next
            self._configs[cid] = cfg
            formed.append(cid)
            self.metric("CohortsFormed", 1, "Count")
            log.info(
                "cohort formed",
                extra={
                    "cohort_id": cid,
                    "version": base,
                    "members": sorted(cfg.members),
                    "phase": "formed",
                },
            )
            self._delete_checkins(cfg)
        return formed

    def _checkin_valid(self, w: Waiting) -> bool:
        try:
            msg = parse_checkin(self.store.get(w.key).body, where=w.key)
            if msg.client_id != w.client_id or msg.nonce != w.nonce:
                raise IntegrityError(f"{w.key}: body names {msg.client_id}/{msg.nonce}")
            if msg.mode != self.settings.mode:
                raise IntegrityError(
                    f"{w.key}: mode {msg.mode!r} but server runs {self.settings.mode!r}"
                )
            return True
        except NotFoundError:
            return False
        except IntegrityError as exc:
            log.warning(
                "check-in rejected",
                extra={"key": w.key, "client_id": w.client_id, "reason": str(exc)},
            )
            self.store.delete(w.key)
            return False

    def _delete_checkins(self, cfg: CohortConfig) -> None:
        for client, nonce in cfg.members.items():
            try:
                self.store.delete(layout.checkin_key(client, nonce))
            except FedError as exc:  # harmless: the config still marks it taken
                log.warning(
                    "could not delete check-in", extra={"client_id": client, "reason": str(exc)}
                )

    # -- the input phase ---------------------------------------------------
    def _uploads(self, cid: str, cfg: CohortConfig) -> dict[str, str]:
        """Member -> ETag of the members' uploads present now (non-members are logged)."""
        out: dict[str, str] = {}
        for info in self.store.list(layout.member_prefix(cid, Kind.PLAIN)):
            try:
                parsed = layout.parse_key(info.key)
            except UnknownKeyError:
                log.warning("ignored stray object", extra={"key": info.key, "cohort_id": cid})
                continue
            if parsed.client_id not in cfg.members:
                log.warning(
                    "upload from a client outside the cohort ignored",
                    extra={"key": info.key, "cohort_id": cid, "client_id": parsed.client_id},
                )
                continue
            out[parsed.client_id] = info.etag
        return out

    def on_update(self, cid: str, client: str) -> str:
        try:
            cfg = self.config(cid)
        except (NotFoundError, IntegrityError) as exc:
            log.warning(
                "upload for an unknown cohort",
                extra={"cohort_id": cid, "client_id": client, "reason": str(exc)},
            )
            return "rejected"
        if client not in cfg.members:
            log.warning(
                "upload from a non-member ignored", extra={"cohort_id": cid, "client_id": client}
            )
            return "rejected"
        if self.store.head(layout.state_key(cid, Phase.INPUTS)) is not None:
            log.warning(
                "late upload after the input phase closed; not counted",
                extra={"cohort_id": cid, "client_id": client, "phase": Phase.INPUTS.value},
            )
            return "late"
        uploads = self._uploads(cid, cfg)
        if set(uploads) >= set(cfg.members):
            return (
                "closed" if self.close_phase(cid, Phase.INPUTS, uploads, "all-members") else "noop"
            )
        return "waiting"

    def close_phase(self, cid: str, phase: Phase, etags: dict[str, str], why: str) -> bool:
        manifest = Manifest(
            cid, phase.value, sorted(etags), dict(sorted(etags.items())), why, self.clock()
        )
        try:
            self.store.put_new(
                layout.state_key(cid, phase), dumps(manifest), content_type="application/json"
            )
        except AlreadyExistsError:
            return False
        log.info(
            "phase closed",
            extra={
                "cohort_id": cid,
                "phase": phase.value,
                "members": manifest.members,
                "closed_by": why,
            },
        )
        return True

    # -- finalize: aggregate, apply, record --------------------------------
    def finalize(self, cid: str) -> str:
        """Aggregate the closed input phase and apply it, or abort; idempotent."""
        if self.result(cid) is not None:
            self._closed.add(cid)
            return "noop"
        cfg = self.config(cid)
        manifest = self._manifest(cid, Phase.INPUTS)
        if manifest is None:
            return "noop"
        if len(manifest.members) < cfg.min_members:
            return self._abort(
                cfg, f"{len(manifest.members)} inputs < minimum {cfg.min_members}", {}
            )
        done = find_applied(self.store, cid, cfg.base_version)
        if done is not None:  # a crash or a duplicate came between the commit and the result
            log.info("cohort already applied", extra={"cohort_id": cid, "version": done})
            advance_pointer(self.store, done)
            members = read_meta(self.store, done).members
            self._record(Result(cid, "applied", done, "", members, {}, self.clock()), cfg)
            return "noop"
        schema = read_schema(self.store, cfg.base_version)

        def check(client: str, meta: UpdateMeta) -> None:
            if (meta.cohort_id, meta.client_id) != (cid, client):
                raise IntegrityError(
                    f"metadata names {meta.cohort_id}/{meta.client_id}, key {cid}/{client}"
                )
            if meta.base_version != cfg.base_version:
                raise IntegrityError(
                    f"base version {meta.base_version}, cohort's is {cfg.base_version}"
                )
            if meta.mode != cfg.mode:
                raise IntegrityError(f"mode {meta.mode!r}, cohort's is {cfg.mode!r}")

        started = self.clock()
        keys = [(c, layout.member_key(cid, Kind.PLAIN, c)) for c in manifest.members]
        mean = weighted_mean(
            self.store, keys, schema=schema, check=check, concurrency=self.settings.read_concurrency
        )
        self.metric("BytesRead", mean.bytes_read, "Bytes")
        if len(mean.included) < cfg.min_members:
            return self._abort(
                cfg, f"{len(mean.included)} valid inputs < minimum {cfg.min_members}", mean.rejected
            )
        losses = list(mean.losses.values())
        applied = apply_cohort(
            self.store,
            cohort_id=cid,
            base_version=cfg.base_version,
            mean_delta=mean.mean,
            server_lr=cfg.server_lr,
            rule=str(cfg.params.get("staleness_weight", self.settings.staleness_weight)),
            members=mean.included,
            num_samples=mean.total_weight,
            metrics={"train_loss": sum(losses) / len(losses), "rejected": sorted(mean.rejected)},
        )
        phase_s = {
            "inputs": manifest.closed_at - cfg.created_at,
            "aggregate": self.clock() - started,
        }
        if not applied.already:
            self.metric("CohortsApplied", 1, "Count")
            self.metric("Staleness", applied.staleness, "Count")
            self.metric("Dropouts", len(cfg.members) - len(mean.included), "Count")
        log.info(
            "cohort applied",
            extra={
                "cohort_id": cid,
                "version": applied.version,
                "staleness": applied.staleness,
                "members": mean.included,
                "phase": "apply",
                "duplicate": applied.already,
            },
        )
        self._record(
            Result(
                cid,
                "applied",
                applied.version,
                "",
                mean.included,
                mean.rejected,
                self.clock(),
                phase_s,
            ),
            cfg,
        )
        return "applied"

    def _abort(self, cfg: CohortConfig, reason: str, rejected: dict[str, str]) -> str:
        log.warning(
            "cohort aborted", extra={"cohort_id": cfg.cohort_id, "reason": reason, "phase": "abort"}
        )
        self.metric("CohortsAborted", 1, "Count")
        self._record(
            Result(cfg.cohort_id, "aborted", None, reason, [], rejected, self.clock()), cfg
        )
        return "aborted"

    def _record(self, result: Result, cfg: CohortConfig) -> None:
        # Check-ins go before the result so that a closed cohort never leaves a
        # check-in that formation could hand out again.
        self._delete_checkins(cfg)
        with contextlib.suppress(AlreadyExistsError):
            self.store.put_new(
                layout.state_key(cfg.cohort_id, Phase.RESULT),
                dumps(result),
                content_type="application/json",
            )
        self._closed.add(cfg.cohort_id)

    # -- the sweeper -------------------------------------------------------
    def sweep(self) -> dict[str, int]:
        """Close overdue phases, redo stuck finalizations, form partial cohorts, expire check-ins."""
        now = self.clock()
        counts = {"closed": 0, "finalized": 0, "formed": 0, "expired": 0}
        advance_pointer(self.store, find_head(self.store))  # a lagging pointer after a crash
        for cid in self.open_cohorts():
            try:
                cfg = self.config(cid)
            except NotFoundError:
                continue
            except IntegrityError as exc:
                log.error("unreadable cohort config", extra={"cohort_id": cid, "reason": str(exc)})
                continue
            manifest = self._manifest(cid, Phase.INPUTS)
            if manifest is None:
                if now >= cfg.deadlines.get(Phase.INPUTS.value, float("inf")):
                    uploads = self._uploads(cid, cfg)
                    if self.close_phase(cid, Phase.INPUTS, uploads, "deadline"):
                        counts["closed"] += 1
            elif (
                now - manifest.closed_at >= self.settings.stuck_after_s
                and self.finalize(cid) != "noop"
            ):
                counts["finalized"] += 1
        counts["formed"] = len(self.form_cohorts(allow_partial=True))
        for info in self.store.list(layout.CHECKINS_PREFIX):
            if now - info.last_modified > self.settings.checkin_ttl_s:
                self.store.delete(info.key)
                counts["expired"] += 1
        return counts
