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
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from fedcore import layout
from fedcore.codec import UpdateMeta, max_update_bytes
from fedcore.dp.distributed import DistributedDP
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    UnknownKeyError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import (
    MAX_MESSAGE_BYTES,
    CohortConfig,
    Manifest,
    Mode,
    Result,
    dumps,
    encode_config,
    parse_checkin,
    parse_config,
    parse_manifest,
    parse_result,
)
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_CHECKIN,
    SecAggParams,
    parse_identity,
    parse_keys,
    parse_shares,
    parse_unmask,
    pinned_identity,
)
from fedcore.server import secure
from fedcore.server.aggregate import weighted_mean
from fedcore.server.apply import apply_cohort, find_applied
from fedcore.server.settings import ServerSettings
from fedcore.status import cohort_ids
from fedcore.storage import ObjectInfo, ObjectStore
from fedcore.versions import advance_pointer, find_head, read_meta, read_schema

log = logging.getLogger(__name__)
# Concurrent GETs of small protocol messages (keys, shares, unmask) and identities.
PREFETCH_CONCURRENCY = 16

MetricSink = Callable[[str, float, str], None]

PHASES: dict[Mode, tuple[Phase, ...]] = {
    Mode.PLAINTEXT: (Phase.INPUTS,),
    Mode.SECAGG: (Phase.KEYS, Phase.SHARES, Phase.INPUTS, Phase.UNMASK),
}


def phase_kind(phase: Phase, mode: Mode) -> Kind:
    """The per-member object kind that a phase collects."""
    if phase is Phase.INPUTS:
        return Kind.PLAIN if mode is Mode.PLAINTEXT else Kind.MASKED
    return {Phase.KEYS: Kind.KEYS, Phase.SHARES: Kind.SHARES, Phase.UNMASK: Kind.UNMASK}[phase]


def kind_phase(kind: Kind, mode: Mode) -> Phase | None:
    for phase in PHASES[mode]:
        if phase_kind(phase, mode) is kind:
            return phase
    return None


def _no_metrics(name: str, value: float, unit: str) -> None:
    return None


@dataclass(frozen=True)
class Waiting:
    client_id: str
    nonce: str
    key: str
    since: float


def _public_value(phase: Phase, msg: Any) -> str | None:
    """What a finalize needs from a verified key or share message (see Manifest.verified)."""
    if phase is Phase.KEYS:
        return crypto.b64(msg.s_pk)
    if phase is Phase.SHARES:
        return str(msg.self_commit)
    return None


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
        self._identities: dict[str, bytes] = {}
        self._messages: dict[tuple[str, str], Any] = {}
        self._manifests: dict[tuple[str, Phase], Manifest] = {}
        self._graphs: dict[str, dict[str, set[str]]] = {}
        self._prefetched: dict[str, bytes] = {}
        self._sizes: dict[str, int] = {}  # member object key -> size as last listed
        self._schemas: dict[int, dict[str, tuple[str, tuple[int, ...]]]] = {}
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
        if parsed.cohort_id is None:
            return "noop"
        cid = parsed.cohort_id
        if parsed.kind in (Kind.KEYS, Kind.SHARES, Kind.PLAIN, Kind.MASKED, Kind.UNMASK):
            assert parsed.client_id is not None
            return self.on_member_object(cid, parsed.kind, parsed.client_id)
        if parsed.kind is Kind.STATE and parsed.phase not in (None, Phase.RESULT):
            try:
                cfg = self.config(cid)
            except (NotFoundError, IntegrityError):
                return "noop"
            if parsed.phase is PHASES[cfg.mode][-1]:
                return self.finalize(cid)
            # The invocation that wrote the manifest may have died before acting on it
            # (aborting a cohort below its minimum): its event is the retry.
            return self.close_phase(cid, parsed.phase, "manifest event")
        return "noop"

    # -- reads with immutable caches --------------------------------------
    def config(self, cid: str) -> CohortConfig:
        if cid not in self._configs:
            key = layout.config_key(cid)
            self._configs[cid] = parse_config(self.store.get(key).body, where=key)
        return self._configs[cid]

    def secagg_params(self, cfg: CohortConfig) -> SecAggParams:
        if cfg.secagg is None:  # parse_config guarantees it for secagg cohorts
            raise ProtocolError(
                f"{cfg.cohort_id}: a {cfg.mode.value} cohort has no secagg parameters"
            )
        return cfg.secagg

    def identity(self, client: str) -> bytes:
        """A member's enrolled Ed25519 public key (``clients/{id}/identity.json``, write-once)."""
        if client not in self._identities:
            key = layout.identity_key(client)
            try:
                blob = self.store.get(key).body
            except NotFoundError:
                raise IntegrityError(f"{key}: {client} has no enrolled identity") from None
            self._identities[client] = parse_identity(blob, client_id=client, where=key).ed25519
        return self._identities[client]

    def manifest(self, cid: str, phase: Phase) -> Manifest | None:
        """A phase's write-once manifest (cached once seen: it never changes)."""
        if (cid, phase) in self._manifests:
            return self._manifests[(cid, phase)]
        key = layout.state_key(cid, phase)
        try:
            m = parse_manifest(self.store.get(key).body, where=key)
        except NotFoundError:
            return None
        self._manifests[(cid, phase)] = m
        return m

    def schema(self, version: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        """A version's tensor schema (cached: a committed version never changes)."""
        if version not in self._schemas:
            self._schemas[version] = read_schema(self.store, version)
        return self._schemas[version]

    def graph(self, cfg: CohortConfig) -> dict[str, set[str]]:
        if cfg.cohort_id not in self._graphs:
            self._graphs[cfg.cohort_id] = self.secagg_params(cfg).graph(sorted(cfg.members))
        return self._graphs[cfg.cohort_id]

    def _prefetch(self, cid: str, cfg: CohortConfig, phase: Phase, present: dict[str, str]) -> None:
        """Download, concurrently, the messages and identities ``_validate`` will need.

        A cohort of n costs 3n small GETs per finalize; one at a time they took
        most of the function's time (benchmarks/secagg.py).
        """
        kind = phase_kind(phase, cfg.mode)
        keys = [
            layout.member_key(cid, kind, c)
            for c, etag in present.items()
            if (layout.member_key(cid, kind, c), etag) not in self._messages
        ]

        def message(key: str) -> None:
            with contextlib.suppress(NotFoundError):  # reported when validated
                self._prefetched[key] = self.store.get(key).body

        self._prefetch_identities(cfg, list(present))
        with ThreadPoolExecutor(max_workers=PREFETCH_CONCURRENCY) as pool:
            list(pool.map(message, keys))

    def _public_values(self, cfg: CohortConfig, manifest: Manifest) -> dict[str, str]:
        """Each member's verified public value, from the manifest or, failing that, its message."""
        phase = Phase(manifest.phase)
        out = {c: manifest.verified[c] for c in manifest.members if c in manifest.verified}
        missing = {c: manifest.etags[c] for c in manifest.members if c not in out}
        if missing:  # a manifest written before ``verified`` existed
            self._prefetch(cfg.cohort_id, cfg, phase, missing)
            for c, etag in missing.items():
                msg = self._validate(cfg.cohort_id, cfg, phase, c, etag)
                out[c] = _public_value(phase, msg)  # type: ignore[assignment]
        return out

    def member_identity(self, cfg: CohortConfig, client: str) -> bytes:
        """A member's Ed25519 key as pinned in the cohort config (enrolled key otherwise)."""
        return pinned_identity(cfg.identities, client) or self.identity(client)

    def _prefetch_identities(self, cfg: CohortConfig, clients: list[str]) -> None:
        """Fetch, concurrently, the enrolled keys of members the config does not pin."""

        def identity(client: str) -> None:
            with contextlib.suppress(IntegrityError):  # reported when validated
                self.identity(client)

        missing = [c for c in clients if c not in cfg.identities and c not in self._identities]
        with ThreadPoolExecutor(max_workers=PREFETCH_CONCURRENCY) as pool:
            list(pool.map(identity, missing))

    def result(self, cid: str) -> Result | None:
        key = layout.state_key(cid, Phase.RESULT)
        try:
            return parse_result(self.store.get(key).body, where=key)
        except NotFoundError:
            return None

    def cohort_ids(self) -> list[str]:
        return cohort_ids(self.store)

    def open_cohorts(self) -> list[str]:
        """Cohorts without a result, oldest first (closed ones are remembered)."""
        return self._open(self.cohort_ids())

    def _open(self, ids: list[str]) -> list[str]:
        out = []
        for cid in ids:
            if cid in self._closed:
                continue
            if self.store.head(layout.state_key(cid, Phase.RESULT)) is not None:
                self._closed.add(cid)
                continue
            out.append(cid)
        return out

    # -- formation ---------------------------------------------------------
    def _waiting(self, now: float) -> tuple[list[Waiting], list[str]]:
        """Untaken, unexpired check-ins (oldest per client, oldest first) and the cohort ids seen.

        The cohort ids are listed *after* the check-ins (see ``Participant.check_in``)
        and the caller must name its new cohort after the last of *these* ids: if
        another invocation wrote a cohort since, the write-once config put fails
        and the caller re-lists, so no cohort is ever formed from a stale view of
        which check-ins are taken.
        """
        listed: list[ObjectInfo] = list(self.store.list(layout.CHECKINS_PREFIX))
        ids = self.cohort_ids()
        taken: set[tuple[str, str]] = set()
        for cid in self._open(ids):
            try:
                taken.update(self.config(cid).members.items())
            except (NotFoundError, IntegrityError):
                continue  # a prefix without a (valid) config: nothing it names is taken
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
        return sorted(by_client.values(), key=lambda w: (w.since, w.key)), ids

    def _new_config(self, cid: str, base: int, chosen: list[Waiting], now: float) -> CohortConfig:
        s = self.settings
        mode = Mode(s.mode)
        secagg = dp = None
        if mode is Mode.SECAGG:
            k = s.secagg_degree or None
            n = len(chosen)
            clip, bits = s.secagg_clip, None
            if s.dp_user_noise > 0:
                dp = DistributedDP.for_cohort(
                    clip=s.dp_user_clip,
                    noise_multiplier=s.dp_user_noise,
                    delta=s.dp_delta,
                    n=n,
                    min_survivors=max(
                        min(s.min_cohort_size, n), math.ceil(n * (1 - s.secagg_max_dropout))
                    ),
                )
                clip, bits = dp.clip, dp.bits
            secagg = SecAggParams.for_cohort(
                n,
                clip=clip,
                k=k,
                weight_cap=s.secagg_weight_cap,
                max_dropout=s.secagg_max_dropout,
                bits=bits,
            )
            phase_s = {p.value: s.short_round_s for p in PHASES[mode]}
        else:
            phase_s = {}
        phase_s[Phase.INPUTS.value] = s.round_deadline_s
        identities = (
            {w.client_id: crypto.b64(self.identity(w.client_id)) for w in chosen}
            if mode is Mode.SECAGG
            else {}
        )
        return CohortConfig(
            identities=identities,
            cohort_id=cid,
            base_version=base,
            members={w.client_id: w.nonce for w in chosen},
            mode=mode,
            min_members=min(s.min_cohort_size, len(chosen)),
            created_at=now,
            phase_s=phase_s,
            server_lr=s.server_lr,
            secagg=secagg,
            dp=dp,
            staleness_weight=s.staleness_weight,
        )

    def form_cohorts(self, *, allow_partial: bool = False) -> list[str]:
        """Form as many cohorts as the waiting check-ins allow; returns their ids."""
        s = self.settings
        formed: list[str] = []
        for _ in range(50):
            now = self.clock()
            waiting, ids = self._waiting(now)
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
            cid = layout.cohort_id(layout.cohort_seq(ids[-1]) + 1 if ids else 1)
            try:
                base = find_head(self.store)
            except NotFoundError:
                log.error("bucket has no global model; seed version 0 first")
                return formed
            cfg = self._new_config(cid, base, chosen, now)
            try:
                self.store.put_new(
                    layout.config_key(cid), encode_config(cfg), content_type="application/json"
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
            body = self.store.get(w.key).body
            msg = parse_checkin(body, where=w.key)
            if msg.client_id != w.client_id or msg.nonce != w.nonce:
                raise IntegrityError(f"{w.key}: body names {msg.client_id}/{msg.nonce}")
            if msg.mode != self.settings.mode:
                raise IntegrityError(
                    f"{w.key}: mode {msg.mode!r} but the server runs {self.settings.mode!r}"
                )
            if self.settings.mode == Mode.SECAGG:
                doc = {k: v for k, v in asdict(msg).items() if k != "signature"}
                crypto.verify(
                    self.identity(w.client_id),
                    DOMAIN_CHECKIN,
                    {**doc, "signature": msg.signature},
                    where=w.key,
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
        keys = [layout.checkin_key(client, nonce) for client, nonce in cfg.members.items()]
        try:
            self.store.delete_many(keys)
        except FedError as exc:  # harmless: the config still marks them taken
            log.warning(
                "could not delete check-ins",
                extra={"cohort_id": cfg.cohort_id, "reason": str(exc)},
            )

    # -- phases ------------------------------------------------------------
    def expected(self, cid: str, cfg: CohortConfig, phase: Phase) -> list[str] | None:
        """Who may write in ``phase``: the members, or the previous phase's manifest."""
        phases = PHASES[cfg.mode]
        i = phases.index(phase)
        if i == 0:
            return sorted(cfg.members)
        prev = self.manifest(cid, phases[i - 1])
        return None if prev is None else prev.members

    def _present(
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
                self._sizes[info.key] = info.size
        return out

    def _size_cap(self, cfg: CohortConfig, phase: Phase) -> int:
        """The largest object an honest member can write in ``phase`` (derived from the model)."""
        if phase is not Phase.INPUTS:
            return MAX_MESSAGE_BYTES
        schema = self.schema(cfg.base_version)
        if cfg.mode is Mode.PLAINTEXT:
            return max_update_bytes(schema)
        return max_update_bytes({"masked": ("U32", (secure.vector_length(schema),))}, "U32")

    def _within_cap(
        self, cfg: CohortConfig, phase: Phase, present: dict[str, str]
    ) -> dict[str, str]:
        """Drop (as dropouts) members whose listed object is too large to be honest, unread."""
        cap = self._size_cap(cfg, phase)
        out = {}
        for client, etag in present.items():
            key = layout.member_key(cfg.cohort_id, phase_kind(phase, cfg.mode), client)
            size = self._sizes.get(key, 0)
            if size > cap:
                log.warning(
                    "member object rejected; treated as a dropout",
                    extra={
                        "cohort_id": cfg.cohort_id, "client_id": client, "phase": phase.value,
                        "key": key, "reason": f"{key}: object of {size} bytes exceeds the "
                        f"{cap}-byte cap for this phase (not downloaded)",
                    },
                )  # fmt: skip
                continue
            out[client] = etag
        return out

    def on_member_object(self, cid: str, kind: Kind, client: str) -> str:
        key = layout.member_key(cid, kind, client)
        extra = {"cohort_id": cid, "client_id": client, "key": key}
        try:
            cfg = self.config(cid)
        except (NotFoundError, IntegrityError) as exc:
            log.warning("object for an unknown cohort", extra={**extra, "reason": str(exc)})
            return "rejected"
        phase = kind_phase(kind, cfg.mode)
        if phase is None:
            why = f"{key}: {kind.value} objects are not used in {cfg.mode} mode"
            log.warning("object of the wrong mode; ignored", extra={**extra, "reason": why})
            return "rejected"
        extra["phase"] = phase.value
        expected = self.expected(cid, cfg, phase)
        if expected is None:
            log.warning("object before its phase opened; not counted", extra=extra)
            return "early"
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
            return "rejected"
        if (closed := self.manifest(cid, phase)) is not None:
            if client not in closed.members:
                log.warning("late object after the phase closed; not counted", extra=extra)
                return "late"
            return "noop"  # a re-delivered event for an object already counted
        if set(self._present(cid, cfg, phase, expected)) >= set(expected):
            return self.close_phase(cid, phase, "all-members")
        return "waiting"

    def _validate(self, cid: str, cfg: CohortConfig, phase: Phase, client: str, etag: str) -> Any:
        """The parsed, verified message of a member in a JSON phase (cached by key and ETag)."""
        key = layout.member_key(cid, phase_kind(phase, cfg.mode), client)
        if (key, etag) in self._messages:
            return self._messages[(key, etag)]
        if (blob := self._prefetched.pop(key, None)) is None:  # every caller prefetches first
            raise NotFoundError(f"{key}: gone before it could be read")
        ident = self.member_identity(cfg, client)
        ids = {"identity": ident, "cohort_id": cid, "client_id": client, "where": key}
        graph = self.graph(cfg)
        if phase is Phase.KEYS:
            msg = parse_keys(blob, **ids)
        elif phase is Phase.SHARES:
            msg = parse_shares(blob, **ids)
            u1 = set(self.expected(cid, cfg, Phase.SHARES) or [])
            if set(msg.ciphertexts) != graph[client] & u1:
                raise IntegrityError(
                    f"{key}: shares addressed to {sorted(msg.ciphertexts)}, expected {sorted(graph[client] & u1)}"
                )
        elif phase is Phase.UNMASK:
            msg = parse_unmask(blob, **ids)
            u2 = set(self.expected(cid, cfg, Phase.INPUTS) or [])
            u3 = set(self.expected(cid, cfg, Phase.UNMASK) or [])
            if not set(msg.self_shares) <= (graph[client] | {client}) & u3:
                raise IntegrityError(
                    f"{key}: self-mask shares for non-survivors {sorted(set(msg.self_shares) - u3)}"
                )
            if not set(msg.key_shares) <= graph[client] & (u2 - u3):
                raise IntegrityError(
                    f"{key}: key shares for members that are not dropouts {sorted(set(msg.key_shares) - (u2 - u3))}"
                )
        else:  # pragma: no cover - inputs are validated while summing
            raise ValueError(phase)
        self._messages[(key, etag)] = msg
        return msg

    def close_phase(self, cid: str, phase: Phase, why: str) -> str:
        """Close ``phase`` with the valid objects present now; abort if too few."""
        cfg = self.config(cid)
        if (existing := self.manifest(cid, phase)) is not None:
            return self._after_close(cfg, phase, existing, won=False)
        if self.result(cid) is not None:  # aborted earlier: later phases never open
            self._closed.add(cid)
            return "noop"
        expected = self.expected(cid, cfg, phase)
        if expected is None:
            return "noop"
        present = self._within_cap(cfg, phase, self._present(cid, cfg, phase, expected))
        valid: dict[str, str] = {}
        verified: dict[str, str] = {}
        sum_key = ""
        if phase is Phase.INPUTS and cfg.mode is Mode.SECAGG:
            valid, sum_key = self._sum_inputs(cfg, present)
        elif phase is Phase.INPUTS:
            valid = present  # plaintext updates are validated while averaging
        else:
            self._prefetch(cid, cfg, phase, present)
            for client, etag in sorted(present.items()):
                try:
                    msg = self._validate(cid, cfg, phase, client, etag)
                    valid[client] = etag
                    if (value := _public_value(phase, msg)) is not None:
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
            return self._after_close(cfg, phase, self.manifest(cid, phase) or manifest, won=False)
        log.info(
            "phase closed",
            extra={
                "cohort_id": cid,
                "phase": phase.value,
                "members": manifest.members,
                "closed_by": why,
            },
        )
        return self._after_close(cfg, phase, manifest, won=True)

    def _after_close(
        self, cfg: CohortConfig, phase: Phase, manifest: Manifest, *, won: bool
    ) -> str:
        minimum = 1 if phase is Phase.UNMASK else cfg.min_members
        if len(manifest.members) < minimum:
            if not won and self.result(cfg.cohort_id) is not None:
                return "noop"  # a redelivered event; the abort is already recorded
            return self._abort(
                cfg, f"{phase.value}: {len(manifest.members)} valid members < minimum {minimum}", {}
            )
        return "closed" if won else "noop"

    def _sum_inputs(self, cfg: CohortConfig, present: dict[str, str]) -> tuple[dict[str, str], str]:
        """Validate and sum the masked uploads; write the sum; return (valid members, sum key)."""
        cid = cfg.cohort_id
        length = secure.vector_length(self.schema(cfg.base_version))

        def check(client: str, key: str, blob: bytes):  # type: ignore[no-untyped-def]
            return secure.check_masked(
                blob, where=key, length=length, identity=self.member_identity(cfg, client),
                cohort_id=cid, client_id=client, base_version=cfg.base_version,
            )  # fmt: skip

        uploads = [(c, layout.member_key(cid, Kind.MASKED, c)) for c in sorted(present)]
        self._prefetch_identities(cfg, sorted(present))
        result = secure.masked_sum(
            self.store,
            uploads,
            check=check,
            length=length,
            concurrency=self.settings.read_concurrency,
            cohort_id=cid,
        )
        self.metric("BytesRead", result.bytes_read, "Bytes")
        valid = {c: present[c] for c in result.included}
        key = layout.sum_key(cid, secure.sum_digest(result.included))
        # AlreadyExists: a concurrent close summed the same member set (same bytes).
        with contextlib.suppress(AlreadyExistsError):
            self.store.put_new(key, secure.encode_sum(result.total, result.included, cid))
        return valid, key

    # -- finalize: unmask/aggregate, apply, record -------------------------
    def finalize(self, cid: str) -> str:
        """Aggregate the closed cohort and apply it, or abort; idempotent."""
        if self.result(cid) is not None:
            self._closed.add(cid)
            return "noop"
        cfg = self.config(cid)
        last = self.manifest(cid, PHASES[cfg.mode][-1])
        if last is None:
            return "noop"
        done = find_applied(self.store, cid, cfg.base_version)
        if done is not None:  # a crash or a duplicate came between the commit and the result
            log.info("cohort already applied", extra={"cohort_id": cid, "version": done})
            advance_pointer(self.store, done)
            members = read_meta(self.store, done).members
            self._record(Result(cid, "applied", done, "", members, {}, self.clock()), cfg)
            return "noop"
        started = self.clock()
        schema = self.schema(cfg.base_version)
        if cfg.mode is Mode.SECAGG:
            outcome = self._secure_mean(cfg, schema)
        else:
            outcome = self._plain_mean(cfg, last, schema)
        if isinstance(outcome, str):
            return outcome
        mean, included, num_samples, rejected, metrics = outcome
        applied = apply_cohort(
            self.store,
            cohort_id=cid,
            base_version=cfg.base_version,
            mean_delta=mean,
            server_lr=cfg.server_lr,
            rule=cfg.staleness_weight or self.settings.staleness_weight,
            members=included,
            num_samples=num_samples,
            metrics={
                **metrics,
                "rejected": sorted(rejected),
                "dropouts": sorted(set(cfg.members) - set(included)),
            },
        )
        if not applied.already:
            self.metric("CohortsApplied", 1, "Count")
            self.metric("Staleness", applied.staleness, "Count")
            self.metric("Dropouts", len(cfg.members) - len(included), "Count")
            self.metric("AggregateSeconds", self.clock() - started, "Seconds")
            for name, secs in self._phase_durations(cfg).items():  # KeysPhaseSeconds, ...
                self.metric(f"{name.capitalize()}PhaseSeconds", secs, "Seconds")
        log.info(
            "cohort applied",
            extra={
                "cohort_id": cid,
                "version": applied.version,
                "staleness": applied.staleness,
                "members": included,
                "phase": "apply",
                "duplicate": applied.already,
            },
        )
        phase_s = self._phase_durations(cfg)
        phase_s["aggregate"] = self.clock() - started
        self._record(
            Result(cid, "applied", applied.version, "", included, rejected, self.clock(), phase_s),
            cfg,
        )
        return "applied"

    def _phase_durations(self, cfg: CohortConfig) -> dict[str, float]:
        out, start = {}, cfg.created_at
        for phase in PHASES[cfg.mode]:
            m = self.manifest(cfg.cohort_id, phase)
            if m is None:
                break
            out[phase.value] = round(m.closed_at - start, 3)
            start = m.closed_at
        return out

    def _plain_mean(self, cfg: CohortConfig, manifest: Manifest, schema: dict) -> Any:
        cid = cfg.cohort_id

        def check(client: str, meta: UpdateMeta) -> None:
            where = layout.member_key(cid, Kind.PLAIN, client)
            if meta.cohort_id != cid:
                raise IntegrityError(
                    f"{where}: metadata names cohort {meta.cohort_id!r} (replayed or misplaced)"
                )
            if meta.client_id != client:
                raise IntegrityError(f"{where}: metadata names client {meta.client_id!r}")
            if meta.base_version != cfg.base_version:
                raise IntegrityError(
                    f"{where}: base version {meta.base_version}, cohort's is {cfg.base_version}"
                )
            if meta.mode != cfg.mode:
                raise IntegrityError(f"{where}: mode {meta.mode!r}, cohort's is {cfg.mode.value!r}")

        keys = [(c, layout.member_key(cid, Kind.PLAIN, c)) for c in manifest.members]
        mean = weighted_mean(
            self.store, keys, schema=schema, check=check,
            concurrency=self.settings.read_concurrency, cohort_id=cid,
        )  # fmt: skip
        self.metric("BytesRead", mean.bytes_read, "Bytes")
        if len(mean.included) < cfg.min_members:
            return self._abort(
                cfg, f"{len(mean.included)} valid inputs < minimum {cfg.min_members}", mean.rejected
            )
        losses = list(mean.losses.values())
        return (
            mean.mean,
            mean.included,
            mean.total_weight,
            mean.rejected,
            {"train_loss": sum(losses) / len(losses)},
        )

    def _secure_mean(self, cfg: CohortConfig, schema: dict) -> Any:
        cid = cfg.cohort_id
        params = self.secagg_params(cfg)
        manifests = {p: self.manifest(cid, p) for p in PHASES[Mode.SECAGG]}
        _, u2, u3, u4 = (manifests[p].members for p in PHASES[Mode.SECAGG])  # type: ignore[union-attr]
        inputs = manifests[Phase.INPUTS]
        assert inputs is not None
        unmask = manifests[Phase.UNMASK]
        assert unmask is not None
        # The model-sized sum downloads while the reveals are fetched and verified.
        background = ThreadPoolExecutor(max_workers=1)
        sum_obj = background.submit(lambda: self.store.get(inputs.sum_key))
        background.shutdown(wait=False)
        self._prefetch(cid, cfg, Phase.UNMASK, unmask.etags)
        try:
            s_pks = {
                c: crypto.unb64(v, what=f"{c}'s mask key", size=32)
                for c, v in self._public_values(cfg, manifests[Phase.KEYS]).items()  # type: ignore[arg-type]
            }
            commits = self._public_values(cfg, manifests[Phase.SHARES])  # type: ignore[arg-type]
            reveals = {
                c: self._validate(cid, cfg, Phase.UNMASK, c, manifests[Phase.UNMASK].etags[c])
                for c in u4
            }  # type: ignore[union-attr]
            length = secure.vector_length(schema)
            total = secure.decode_sum(
                sum_obj.result().body, where=inputs.sum_key, length=length, members=u3
            )
            total, flagged = secure.unmask(
                total, cohort_id=cid, params=params, members=sorted(cfg.members),
                u2=u2, u3=u3, s_pks=s_pks, commits=commits, reveals=reveals,
            )  # fmt: skip
            privacy: dict[str, Any] = {}
            if (dp := cfg.dp) is not None:
                mean = secure.decode_dp_mean(total, dp=dp, count=len(u3), schema=schema)
                weight = len(u3) / params.weight_cap  # members count equally under DP
                privacy = {"user_level": dp.release(len(u3), length - 1)}
            else:
                mean, weight = secure.decode_mean(
                    total, params=params, count=len(u3), schema=schema
                )
        except (secure.UnmaskError, IntegrityError, NotFoundError) as exc:
            return self._abort(cfg, f"cannot unmask: {exc}", {})
        for client, why in flagged.items():
            log.warning(
                "member sent a bad share",
                extra={"cohort_id": cid, "client_id": client, "reason": why},
            )
        rejected = {
            c: "dropped or rejected before the input round closed"
            for c in set(cfg.members) - set(u3)
        }
        rejected.update(flagged)
        return (
            mean,
            sorted(u3),
            round(weight * params.weight_cap),
            rejected,
            {"total_weight": weight, **({"privacy": privacy} if privacy else {})},
        )

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
            start, current = cfg.created_at, None
            for phase in PHASES[cfg.mode]:
                m = self.manifest(cid, phase)
                if m is None:
                    current = phase
                    break
                start = m.closed_at
            if current is None:
                if now - start >= self.settings.stuck_after_s and self.finalize(cid) != "noop":
                    counts["finalized"] += 1
            elif now >= start + cfg.phase_s.get(current.value, self.settings.round_deadline_s) and (
                self.close_phase(cid, current, "deadline") != "noop"
            ):
                counts["closed"] += 1
        counts["formed"] = len(self.form_cohorts(allow_partial=True))
        for info in self.store.list(layout.CHECKINS_PREFIX):
            if now - info.last_modified > self.settings.checkin_ttl_s:
                self.store.delete(info.key)
                counts["expired"] += 1
        return counts
