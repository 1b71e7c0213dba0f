"""Finalize a closed cohort: its mean (plain, or unmasked and DP-decoded), apply, record.

    secagg:    masked uploads --(stream, check, add mod 2^32)--> sum object     (sum_inputs)
               consistency signatures: at least t of U3 signed exactly U3  (consistency)
               sum + verified s_pk/commitments + unmask reveals --> unmasked sum
               --> weighted mean, or under user-level DP the unweighted mean of
                   clipped, noised deltas (Kairouz et al. 2021, distributed DP)
    plaintext: uploads --(check metadata, signature and digest; clipped, capped,
               sample-weighted mean)--> mean
    then:      global/v{N+1} + latest.json (apply: the version is the commit)
               state/result.json            (record: written after the commit)

A cohort that cannot produce a mean (too few valid inputs, a sum that cannot be
unmasked safely, a decoded sum or mean outside what honest members can produce)
raises ``CohortAborted``; the coordinator catches it in one place and calls
``abort``, which records it. The bounds (``secure.decode_mean``,
``DistributedDP.decode_checked``, the plaintext clip) are checked before the
commit, so an out-of-bounds cohort is never applied.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore import layout
from fedcore.codec import UpdateMeta
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NonFiniteModelError,
    NotFoundError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, Mode, Result, dumps
from fedcore.metrics import (
    AGGREGATE_SECONDS,
    BYTES_READ,
    COHORTS_ABORTED,
    COHORTS_APPLIED,
    DROPOUTS,
    PHASE_SECONDS,
    STALENESS,
    MetricSink,
)
from fedcore.secagg import admission, crypto
from fedcore.secagg.protocol import ConsistencyMsg, MaskedMeta, verify_update
from fedcore.server import deadlines, phases, secure
from fedcore.server.aggregate import weighted_mean
from fedcore.server.apply import apply_cohort, find_applied
from fedcore.server.cache import Cache, Schema
from fedcore.server.formation import delete_checkins
from fedcore.server.settings import ServerSettings
from fedcore.server.vocabulary import PHASES, CohortAborted, Outcome, secagg_params
from fedcore.storage import ObjectStore
from fedcore.versions import advance_pointer, read_meta

# fedcore.server.coordinator's logger: the log lines read as they did before the split.
log = logging.getLogger("fedcore.server.coordinator")


@dataclass(frozen=True)
class CohortMean:
    """A cohort's mean update and what the new version's metadata records about it."""

    mean: dict[str, np.ndarray]
    included: list[str]  # the members whose inputs are in the mean, sorted
    num_samples: int  # plaintext: the members' sample total; secagg: the decoded weight
    rejected: dict[str, str]  # member -> why it is not in the mean
    metrics: dict[str, Any]  # train_loss (plaintext) or total_weight (secagg)
    privacy: dict[str, Any] = field(default_factory=dict)  # user-level DP release, if any

    def version_metrics(self, cfg: CohortConfig) -> dict[str, Any]:
        """The ``metrics`` of the version that applies this mean (key order as written)."""
        return {
            **self.metrics,
            **({"privacy": self.privacy} if self.privacy else {}),
            "rejected": sorted(self.rejected),
            "dropouts": sorted(set(cfg.members) - set(self.included)),
        }


class Finalizer:
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

    # -- the input round of a secure cohort -----------------------------------
    def sum_inputs(
        self, cfg: CohortConfig, present: dict[str, str]
    ) -> tuple[dict[str, str], str, dict[str, str]]:
        """Validate and sum the masked uploads; write the sum; return (valid members, sum
        key, each valid member's signed sample count for the manifest's ``verified``)."""
        cid = cfg.cohort_id
        length = secure.vector_length(self.cache.schema(cfg.base_version))
        # Without user-level DP each member signs its sample count (its weight); under DP
        # every weight is 1 and ``decode_dp_mean`` checks the slot instead.
        declared = cfg.dp is None

        def check(client: str, key: str, blob: bytes) -> tuple[np.ndarray, MaskedMeta]:
            return secure.check_masked(
                blob, where=key, length=length, identity=self.cache.member_identity(cfg, client),
                cohort_id=cid, client_id=client, base_version=cfg.base_version,
                require_samples=declared,
            )  # fmt: skip

        uploads = [(c, layout.member_key(cid, Kind.MASKED, c)) for c in sorted(present)]
        self.cache.prefetch_identities(cfg, sorted(present))
        result = secure.masked_sum(
            self.store,
            uploads,
            check=check,
            length=length,
            concurrency=self.settings.read_concurrency,
            cohort_id=cid,
        )
        self.metric(BYTES_READ, result.bytes_read, "Bytes")
        valid = {c: present[c] for c in result.included}
        key = layout.sum_key(cid, secure.sum_digest(result.included))
        # The members' training seconds, for the version's metrics (adaptive deadlines).
        train = deadlines.train_metrics(list(result.train_s.values()))
        # AlreadyExists: a concurrent close summed the same member set (same bytes).
        with contextlib.suppress(AlreadyExistsError):
            self.store.put_new(key, secure.encode_sum(result.total, result.included, cid, train))
        samples = {c: str(result.samples[c]) for c in result.included} if declared else {}
        return valid, key, samples

    # -- finalize ----------------------------------------------------------------
    def finalize(self, cid: str) -> Outcome:
        """Aggregate the closed cohort and apply it; idempotent. ``CohortAborted`` if it cannot."""
        if self.cache.result(cid) is not None:
            self.cache.mark_closed(cid)
            return Outcome.NOOP
        cfg = self.cache.config(cid)
        last = self.cache.manifest(cid, PHASES[cfg.mode][-1])
        if last is None:
            return Outcome.NOOP
        done = find_applied(self.store, cid, cfg.base_version)
        if done is not None:  # a crash or a duplicate came between the commit and the result
            log.info("cohort already applied", extra={"cohort_id": cid, "version": done})
            advance_pointer(self.store, done)
            members = read_meta(self.store, done).members
            self.record(Result(cid, "applied", done, "", members, {}, self.clock()), cfg)
            return Outcome.NOOP
        started = self.clock()
        schema = self.cache.schema(cfg.base_version)
        if cfg.mode is Mode.SECAGG:
            mean = self.secure_mean(cfg, schema)
        else:
            mean = self.plain_mean(cfg, last, schema)
        mean.rejected.update(self.refused_by_size(cfg))
        return self.apply(cfg, mean, started)

    def apply(self, cfg: CohortConfig, mean: CohortMean, started: float) -> Outcome:
        """Commit the mean as the next version, then record the result."""
        cid = cfg.cohort_id
        try:
            applied = apply_cohort(
                self.store,
                cohort_id=cid,
                base_version=cfg.base_version,
                mean_delta=mean.mean,
                server_lr=cfg.server_lr,
                rule=cfg.staleness_weight or self.settings.staleness_weight,
                members=mean.included,
                num_samples=mean.num_samples,
                metrics=mean.version_metrics(cfg),
                optimizer=self.settings.optimizer,
            )
        except NonFiniteModelError as exc:  # never committed: the cohort ends, with why
            raise CohortAborted(str(exc)) from exc
        if not applied.already:
            self.metric(COHORTS_APPLIED, 1, "Count")
            self.metric(STALENESS, applied.staleness, "Count")
            self.metric(DROPOUTS, len(cfg.members) - len(mean.included), "Count")
            self.metric(AGGREGATE_SECONDS, self.clock() - started, "Seconds")
            for name, secs in self.phase_durations(cfg).items():  # KeysPhaseSeconds, ...
                self.metric(PHASE_SECONDS[Phase(name)], secs, "Seconds")
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
        phase_s = self.phase_durations(cfg)
        phase_s["aggregate"] = self.clock() - started
        self.record(
            Result(
                cid, "applied", applied.version, "", mean.included, mean.rejected, self.clock(),
                phase_s,
            ),
            cfg,
        )  # fmt: skip
        return Outcome.APPLIED

    def phase_durations(self, cfg: CohortConfig) -> dict[str, float]:
        """Seconds each phase was open (from the config's creation, then manifest to manifest)."""
        out, start = {}, cfg.created_at
        for phase in PHASES[cfg.mode]:
            m = self.cache.manifest(cfg.cohort_id, phase)
            if m is None:
                break
            out[phase.value] = round(m.closed_at - start, 3)
            start = m.closed_at
        return out

    # -- the mean ------------------------------------------------------------------
    def plain_mean(self, cfg: CohortConfig, manifest: Manifest, schema: Schema) -> CohortMean:
        """FedAvg's sample-weighted mean of the counted members' plaintext updates."""
        cid = cfg.cohort_id

        def check(client: str, meta: UpdateMeta, delta: Mapping[str, np.ndarray]) -> None:
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
            # Last, so that a replay or a misplaced update reads as one: the member's pinned
            # key must have signed these fields and exactly these tensors.
            verify_update(
                meta, delta, identity=self.cache.member_identity(cfg, client), where=where
            )

        keys = [(c, layout.member_key(cid, Kind.PLAIN, c)) for c in manifest.members]
        self.cache.prefetch_identities(cfg, list(manifest.members))
        clip = self.plaintext_clip(schema)
        mean = weighted_mean(
            self.store, keys, schema=schema, check=check,
            concurrency=self.settings.read_concurrency, cohort_id=cid,
            clip=clip, weight_cap=self.settings.secagg_weight_cap,
        )  # fmt: skip
        self.metric(BYTES_READ, mean.bytes_read, "Bytes")
        if len(mean.included) < cfg.min_members:
            raise CohortAborted(
                f"{len(mean.included)} valid inputs < minimum {cfg.min_members}", mean.rejected
            )
        # A convex combination of deltas each clipped to L2 `clip` has norm <= clip; the
        # float32 cast of the mean adds a relative error of ~1e-7.
        norm = math.sqrt(
            sum(float(np.sum(np.square(v, dtype=np.float64))) for v in mean.mean.values())
        )
        if not norm <= clip * (1 + 1e-5):
            raise CohortAborted(
                f"mean update's L2 norm {norm:.6g} exceeds the clip {clip:.6g}; not applied",
                mean.rejected,
            )
        losses = list(mean.losses.values())
        return CohortMean(
            mean=mean.mean,
            included=mean.included,
            num_samples=mean.total_weight,
            rejected=mean.rejected,
            metrics={
                "train_loss": sum(losses) / len(losses),
                **deadlines.train_metrics(list(mean.train_s.values())),
            },
        )

    def plaintext_clip(self, schema: Schema) -> float:
        """The L2 bound of each plaintext member's delta (``PLAINTEXT_CLIP``).

        0 means the bound secure mode gives an honest member: every coordinate of
        its weighted delta within ``SECAGG_CLIP``, i.e. L2 at most clip * sqrt(d).
        """
        if self.settings.plaintext_clip > 0:
            return self.settings.plaintext_clip
        dim = sum(int(np.prod(shape)) for _, shape in schema.values())
        return self.settings.secagg_clip * math.sqrt(dim)

    def closed_manifests(self, cfg: CohortConfig) -> dict[Phase, Manifest]:
        """Every phase's manifest of a cohort whose last phase closed (each closed before it)."""
        out = {}
        for phase in PHASES[cfg.mode]:
            if (m := self.cache.manifest(cfg.cohort_id, phase)) is None:
                key = layout.state_key(cfg.cohort_id, phase)
                raise IntegrityError(f"{key}: missing, yet a later phase of the cohort closed")
            out[phase] = m
        return out

    def secure_mean(self, cfg: CohortConfig, schema: Schema) -> CohortMean:
        """Unmask the masked sum (SecAgg+ round 4) and decode its mean (DP-decoded under DP)."""
        cid = cfg.cohort_id
        params = secagg_params(cfg)
        manifests = self.closed_manifests(cfg)
        _, u2, u3, u4 = (manifests[p].members for p in PHASES[Mode.SECAGG])
        if cfg.dp is not None and len(u3) < cfg.dp.expected_survivors:
            # Formation's minimum, checked again before anything is unmasked.
            raise CohortAborted(
                f"{len(u3)} survivors < {cfg.dp.expected_survivors}, the count the DP noise "
                "is sized for: releasing would exceed the per-release epsilon"
            )
        inputs, unmask = manifests[Phase.INPUTS], manifests[Phase.UNMASK]
        # The model-sized sum downloads while the reveals are fetched and verified.
        background = ThreadPoolExecutor(max_workers=1)
        sum_obj = background.submit(lambda: self.store.get(inputs.sum_key))
        background.shutdown(wait=False)
        signers = self.consistency(cfg, u3)  # before any reveal is read
        log.info(
            "input set agreed",
            extra={"cohort_id": cid, "phase": Phase.UNMASK.value, "signers": len(signers)},
        )
        self.cache.prefetch(cid, cfg, Phase.UNMASK, unmask.etags)
        try:
            s_pks = {
                c: crypto.unb64(v, what=f"{c}'s mask key", size=32)
                for c, v in self.cache.public_values(cfg, manifests[Phase.KEYS]).items()
            }
            commits = self.cache.public_values(cfg, manifests[Phase.SHARES])
            reveals = {
                c: self.cache.message(cid, cfg, Phase.UNMASK, c, unmask.etags[c]) for c in u4
            }
            length = secure.vector_length(schema)
            sum_body = sum_obj.result().body
            total = secure.decode_sum(sum_body, where=inputs.sum_key, length=length, members=u3)
            total, flagged = secure.unmask(
                total, cohort_id=cid, params=params, members=sorted(cfg.members),
                u2=u2, u3=u3, s_pks=s_pks, commits=commits, reveals=reveals,  # type: ignore[arg-type]
            )  # fmt: skip
            privacy: dict[str, Any] = {}
            if (dp := cfg.dp) is not None:
                mean = secure.decode_dp_mean(total, dp=dp, count=len(u3), schema=schema)
                weight = len(u3) / params.weight_cap  # members count equally under DP
                release = dp.release(len(u3), length - 1)
                privacy = {
                    "user_level": {**release, "target_epsilon": dp.target_epsilon(length - 1)}
                }
            else:
                mean, weight = secure.decode_mean(
                    total, params=params, count=len(u3), schema=schema
                )
                # Within the honest range is not enough: the slot must be what was declared.
                secure.check_weight_slot(
                    total, params=params, declared=declared_samples(inputs, u3)
                )
        except secure.BoundsError as exc:
            raise CohortAborted(f"sum out of honest bounds, not applied: {exc}") from exc
        except (secure.UnmaskError, IntegrityError, NotFoundError) as exc:
            raise CohortAborted(f"cannot unmask: {exc}") from exc
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
        return CohortMean(
            mean=mean,
            included=sorted(u3),
            num_samples=round(weight * params.weight_cap),
            rejected=rejected,
            metrics={"total_weight": weight, **self.recorded_train(sum_body, inputs.sum_key, cid)},
            privacy=privacy,
        )

    def recorded_train(self, sum_body: bytes, where: str, cid: str) -> dict[str, Any]:
        """The training-seconds metrics the input round recorded with the sum, if any.

        Only sizes later deadlines: unreadable ones are logged and left out rather than
        aborting a cohort whose sum unmasked fine."""
        try:
            metrics = secure.sum_metrics(sum_body, where=where)
        except IntegrityError as exc:
            log.warning(
                "unreadable metrics in the masked sum; left out",
                extra={"cohort_id": cid, "key": where, "reason": str(exc)},
            )
            return {}
        return {k: v for k, v in metrics.items() if k in deadlines.TRAIN_METRICS}

    def consistency(self, cfg: CohortConfig, u3: list[str]) -> list[str]:
        """The members of U3 who signed exactly U3 (round 3b); ``CohortAborted`` with the
        reason if they are fewer than ``t``, the quorum every revealing member waited for.

        Every reveal counted names U3 (``admission.admit_unmask``); this is the other half
        of Bonawitz et al.'s ConsistencyCheck: the function unmasks only a set that the
        quorum of its members agreed on.
        """
        cid = cfg.cohort_id

        def read(client: str) -> tuple[str, ConsistencyMsg | None]:
            key = layout.member_key(cid, Kind.CONSISTENCY, client)
            try:
                blob = self.store.get(key).body
                return client, admission.admit_consistency(
                    blob, identity=self.cache.member_identity(cfg, client), cohort_id=cid,
                    client_id=client, where=key,
                )  # fmt: skip
            except (IntegrityError, NotFoundError) as exc:
                log.warning(
                    "consistency signature not counted",
                    extra={"cohort_id": cid, "client_id": client, "phase": Phase.UNMASK.value,
                           "key": key, "reason": str(exc)},
                )  # fmt: skip
                return client, None

        self.cache.prefetch_identities(cfg, sorted(u3))
        with ThreadPoolExecutor(max_workers=max(1, self.settings.read_concurrency)) as pool:
            msgs = {c: msg for c, msg in pool.map(read, sorted(u3)) if msg is not None}
        try:
            return admission.signed_quorum(
                msgs, cohort_id=cid, inputs=set(u3), n=len(cfg.members), t=secagg_params(cfg).t
            )
        except IntegrityError as exc:
            raise CohortAborted(f"no consistency quorum over the input set: {exc}") from exc

    # -- the result ----------------------------------------------------------------
    def abort(self, cfg: CohortConfig, aborted: CohortAborted) -> Outcome:
        """Record the cohort's abort (the one place a ``CohortAborted`` ends up)."""
        reason = aborted.reason
        log.warning(
            "cohort aborted", extra={"cohort_id": cfg.cohort_id, "reason": reason, "phase": "abort"}
        )
        self.metric(COHORTS_ABORTED, 1, "Count")
        rejected = {**aborted.rejected, **self.refused_by_size(cfg)}
        self.record(Result(cfg.cohort_id, "aborted", None, reason, [], rejected, self.clock()), cfg)
        return Outcome.ABORTED

    def refused_by_size(self, cfg: CohortConfig) -> dict[str, str]:
        """Members whose object a close refused by size, with the reason (for ``rejected``)."""
        try:
            return phases.refused_by_size(self.store, self.cache, cfg)
        except FedError as exc:  # the result still gets written, with the reasons known
            log.warning(
                "could not list refused objects",
                extra={"cohort_id": cfg.cohort_id, "reason": str(exc)},
            )
            return {}

    def record(self, result: Result, cfg: CohortConfig) -> None:
        """Write the write-once result (a second writer's identical result is dropped)."""
        # Check-ins go before the result so that a closed cohort never leaves a
        # check-in that formation could hand out again.
        delete_checkins(self.store, cfg)
        with contextlib.suppress(AlreadyExistsError):
            self.store.put_new(
                layout.state_key(cfg.cohort_id, Phase.RESULT),
                dumps(result),
                content_type="application/json",
            )
        self.cache.mark_closed(cfg.cohort_id)


def declared_samples(inputs: Manifest, counted: list[str]) -> dict[str, int]:
    """Each counted member's signed sample count, as the inputs manifest recorded it at close.

    ``CohortAborted`` if one is missing or malformed (a manifest from before declared
    weights, or one that was tampered with): the weight slot cannot be checked.
    """
    out = {}
    for client in counted:
        text = inputs.verified.get(client, "")
        if not (text.isascii() and text.isdigit()) or int(text) < 1:
            raise CohortAborted(
                f"inputs manifest has no declared weight for {client}; the weight slot "
                "cannot be checked, not applied"
            )
        out[client] = int(text)
    return out
