"""Cohort formation: K waiting check-ins become one write-once ``config.json``.

A check-in is taken once a config names it; the write-once put of the config under
the next cohort id is the lock, so two invocations that see the same check-ins
cannot both form a cohort from them (the loser re-lists). Taken check-ins are
deleted afterwards as a courtesy: the configs, not the deletions, decide what is
taken.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from fedcore import layout
from fedcore.dp.distributed import DistributedDP
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    UnknownKeyError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Mode, encode_config, parse_checkin
from fedcore.metrics import COHORTS_FORMED, MetricSink
from fedcore.secagg import crypto
from fedcore.secagg.protocol import DOMAIN_CHECKIN, SecAggParams
from fedcore.server.cache import Cache
from fedcore.server.deadlines import RecentTraining, inputs_deadline_s
from fedcore.server.settings import ServerSettings
from fedcore.server.vocabulary import PHASES
from fedcore.storage import ObjectInfo, ObjectStore
from fedcore.versions import find_head, read_meta

# fedcore.server.coordinator's logger: the log lines read as they did before the split.
log = logging.getLogger("fedcore.server.coordinator")


@dataclass(frozen=True)
class Waiting:
    client_id: str
    nonce: str
    key: str
    since: float


def busy_devices(taken: set[tuple[str, str]]) -> set[str]:
    """Devices that are members of an open cohort: none of their check-ins may join another.

    A device is in at most one open cohort; its other check-ins wait until that cohort
    has a result (or expire). One device in two open cohorts could abort both, with bad
    shares in each, for the price of one enrollment.
    """
    return {client for client, _ in taken}


def delete_checkins(store: ObjectStore, cfg: CohortConfig) -> None:
    """Delete the check-ins a cohort took (harmless if it fails: the config marks them taken)."""
    keys = [layout.checkin_key(client, nonce) for client, nonce in cfg.members.items()]
    try:
        store.delete_many(keys)
    except FedError as exc:  # harmless: the config still marks them taken
        log.warning(
            "could not delete check-ins",
            extra={"cohort_id": cfg.cohort_id, "reason": str(exc)},
        )


class Formation:
    def __init__(
        self,
        store: ObjectStore,
        cache: Cache,
        settings: ServerSettings,
        *,
        metric: MetricSink,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.cache = cache
        self.settings = settings
        self.metric = metric
        self.clock = clock
        self.recent = RecentTraining(lambda version: read_meta(store, version).metrics)

    def waiting(self, now: float) -> tuple[list[Waiting], list[str]]:
        """Untaken, unexpired check-ins (oldest per client, oldest first) and the cohort ids seen.

        The cohort ids are listed *after* the check-ins (see ``Participant.check_in``)
        and the caller must name its new cohort after the last of *these* ids: if
        another invocation wrote a cohort since, the write-once config put fails
        and the caller re-lists, so no cohort is ever formed from a stale view of
        which check-ins are taken.
        """
        listed: list[ObjectInfo] = list(self.store.list(layout.CHECKINS_PREFIX))
        ids = self.cache.cohort_ids()
        taken: set[tuple[str, str]] = set()
        for cid in self.cache.open(ids):
            try:
                taken.update(self.cache.config(cid).members.items())
            except (NotFoundError, IntegrityError):
                continue  # a prefix without a (valid) config: nothing it names is taken
        busy = busy_devices(taken)
        by_client: dict[str, Waiting] = {}
        for info in sorted(listed, key=lambda i: (i.last_modified, i.key)):
            try:
                parsed = layout.parse_key(info.key)
            except UnknownKeyError:
                log.warning("ignored stray object under checkins/", extra={"key": info.key})
                continue
            if parsed.kind is not Kind.CHECKIN or parsed.client_id is None or parsed.nonce is None:
                continue
            if (parsed.client_id, parsed.nonce) in taken or parsed.client_id in busy:
                continue
            if now - info.last_modified > self.settings.checkin_ttl_s:
                continue
            by_client.setdefault(
                parsed.client_id,
                Waiting(parsed.client_id, parsed.nonce, info.key, info.last_modified),
            )
        return sorted(by_client.values(), key=lambda w: (w.since, w.key)), ids

    def new_config(self, cid: str, base: int, chosen: list[Waiting], now: float) -> CohortConfig:
        """The config of a cohort of ``chosen``, from the server's settings (fixed from here on)."""
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
                colluders=s.secagg_colluders,
            )
            phase_s = {p.value: s.short_round_s for p in PHASES[mode]}
        else:
            phase_s = {}
        phase_s[Phase.INPUTS.value] = self.inputs_deadline_s(base)
        min_members = min(s.min_cohort_size, len(chosen))
        if dp is not None:
            # The noise is sized for expected_survivors: fewer would release a larger
            # epsilon than the config promises, so they abort instead (nothing released).
            min_members = max(min_members, dp.expected_survivors)
        # Pinned in both modes: a plaintext update is signed like a masked one, and the
        # function checks it against the key pinned here (``verify_update``).
        identities = {w.client_id: crypto.b64(self.cache.identity(w.client_id)) for w in chosen}
        return CohortConfig(
            identities=identities,
            cohort_id=cid,
            base_version=base,
            members={w.client_id: w.nonce for w in chosen},
            mode=mode,
            min_members=min_members,
            created_at=now,
            phase_s=phase_s,
            server_lr=s.server_lr,
            secagg=secagg,
            dp=dp,
            staleness_weight=s.staleness_weight,
        )

    def inputs_deadline_s(self, base: int) -> float:
        """The new cohort's inputs limit: ``round_deadline_s``, or sized from what recent
        members needed to train (``fedcore.server.deadlines``, with ``deadline_margin``)."""
        s = self.settings
        if s.deadline_margin <= 0:
            return s.round_deadline_s
        deadline = inputs_deadline_s(s, self.recent.p90s(base, s.deadline_window))
        log.info("inputs deadline", extra={"version": base, "deadline_s": deadline})
        return deadline

    def form_cohorts(self, *, allow_partial: bool = False) -> list[str]:
        """Form as many cohorts as the waiting check-ins allow; returns their ids."""
        s = self.settings
        formed: list[str] = []
        for _ in range(50):
            now = self.clock()
            waiting, ids = self.waiting(now)
            if len(waiting) < s.cohort_size:
                partial_ok = (
                    allow_partial
                    and len(waiting) >= s.min_cohort_size
                    and now - waiting[0].since >= s.checkin_wait_s
                )
                if not partial_ok:
                    return formed
            chosen = [w for w in waiting[: s.cohort_size] if self.checkin_valid(w)]
            if len(chosen) < min(s.cohort_size, len(waiting)):
                continue  # a bad check-in was deleted; recount
            cid = layout.cohort_id(layout.cohort_seq(ids[-1]) + 1 if ids else 1)
            try:
                base = find_head(self.store)
            except NotFoundError:
                log.error("bucket has no global model; seed version 0 first")
                return formed
            cfg = self.new_config(cid, base, chosen, now)
            try:
                self.store.put_new(
                    layout.config_key(cid), encode_config(cfg), content_type="application/json"
                )
            except AlreadyExistsError:
                continue  # another invocation took this id: re-list and try the next
            self.cache.remember_config(cfg)
            formed.append(cid)
            self.metric(COHORTS_FORMED, 1, "Count")
            log.info(
                "cohort formed",
                extra={
                    "cohort_id": cid,
                    "version": base,
                    "members": sorted(cfg.members),
                    "phase": "formed",
                },
            )
            delete_checkins(self.store, cfg)
        return formed

    def checkin_valid(self, w: Waiting) -> bool:
        """Whether a waiting check-in may join a cohort; a forged or wrong-mode one is deleted."""
        mode = Mode(self.settings.mode)
        try:
            body = self.store.get(w.key).body
            msg = parse_checkin(body, where=w.key)
            if msg.client_id != w.client_id or msg.nonce != w.nonce:
                raise IntegrityError(f"{w.key}: body names {msg.client_id}/{msg.nonce}")
            if msg.mode != mode:
                raise IntegrityError(
                    f"{w.key}: mode {msg.mode!r} but the server runs {mode.value!r}"
                )
            # Both modes: only an enrolled device that signs joins a cohort, so the config
            # can pin every member's key (plaintext updates are signed too).
            doc = {k: v for k, v in asdict(msg).items() if k != "signature"}
            crypto.verify(
                self.cache.identity(w.client_id),
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
