"""FedBuff-style asynchronous apply with the version log as the commit.

``new = current + server_lr * w(s) * mean_delta`` where s = head - base is the
cohort's staleness in versions (Nguyen et al. 2022, "Federated Learning with
Buffered Asynchronous Aggregation", section 3; w(s) = 1/sqrt(1+s) there).
Exactly-once: before each commit attempt the versions since the cohort's base
are searched for the cohort's id, so a retried or concurrent apply of the same
cohort stops instead of applying it twice.

A server optimizer (``fedcore.server.optimizers``) replaces the plain step, with
pseudo-gradient ``w(s) * mean_delta``. Its state belongs to the version it produced:
it is written once, *before* the commit, at a key unique to the attempt
(``layout.optimizer_key``: cohort and content digest), and the committed model's
metadata names that key and its sha256. Applying on top of version N reads the state
N names (zeros where N names none: version 0, plain FedAvg, another optimizer). So the
state is exactly-once whenever the model is: a state object no commit names (a crash
before the commit, a lost race) is never read, and never blocks the winner's write.
No version with NaN or infinity in its parameters or state is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fedcore import layout
from fedcore.codec import ModelMeta, decode_tensors, encode_tensors, load_json_object
from fedcore.errors import (
    AlreadyExistsError,
    IntegrityError,
    NonFiniteModelError,
    UnknownKeyError,
)
from fedcore.server import optimizers
from fedcore.server.optimizers import OptimizerConfig, ServerOptimizer
from fedcore.storage import ObjectStore
from fedcore.versions import advance_pointer, commit_version, find_head, load_model, read_meta

log = logging.getLogger(__name__)

OPTIMIZER_FORMAT = "fedcore.optimizer.v1"

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


def read_optimizer_state(
    store: ObjectStore, meta: ModelMeta, kind: ServerOptimizer, params: optimizers.Params
) -> dict[str, dict[str, np.ndarray]]:
    """The state version ``meta.version`` left for ``kind``: the object its metadata names
    (checked against the sha256 there), or zeros where it names none or another rule's."""
    ref = meta.optimizer
    if not kind.slots:
        return {}
    if ref is None or ref["kind"] != kind.value:
        if ref is not None:
            log.warning(
                "server optimizer changed; its state restarts at zeros",
                extra={"version": meta.version, "was": ref["kind"], "now": kind.value},
            )
        return optimizers.init_state(kind, params)
    key = ref["key"]
    where = layout.model_key(meta.version)
    try:
        parsed = layout.parse_key(key)
    except UnknownKeyError as exc:
        raise IntegrityError(f"{where}: optimizer state key {key!r} invalid: {exc}") from None
    if parsed.kind is not layout.Kind.OPTIMIZER or parsed.version != meta.version:
        raise IntegrityError(f"{where}: optimizer state key {key!r} is not this version's")
    body = store.get(key).body
    if hashlib.sha256(body).hexdigest() != ref["sha256"]:
        raise IntegrityError(f"{key}: sha256 differs from what {where} names")
    schema = {
        f"{slot}/{k}": ("F32", tuple(np.shape(a))) for slot in kind.slots for k, a in params.items()
    }
    tensors, header = decode_tensors(body, where=key, schema=schema)
    doc = load_json_object(header.get("fedcore", "").encode(), where=key, what="metadata")
    if doc.get("format") != OPTIMIZER_FORMAT or doc.get("kind") != kind.value:
        raise IntegrityError(f"{key}: not {kind.value} state in {OPTIMIZER_FORMAT}")
    return {slot: {k: tensors[f"{slot}/{k}"] for k in params} for slot in kind.slots}


def write_optimizer_state(
    store: ObjectStore,
    *,
    version: int,
    cohort_id: str,
    kind: ServerOptimizer,
    state: optimizers.OptimizerState,
) -> dict[str, str]:
    """Write the state after ``version`` once; returns the reference its commit names.

    Deterministic bytes (no timestamps), so a retried attempt on the same head finds its
    own object already there and goes on to the commit.
    """
    doc = {"format": OPTIMIZER_FORMAT, "kind": kind.value, "version": version, "cohort": cohort_id}
    # One metadata entry: safetensors writes __metadata__ from a hash map, so with two
    # entries their order (and the sha256) would change from one attempt to the next.
    blob = encode_tensors(
        {f"{slot}/{k}": a for slot, tensors in state.items() for k, a in tensors.items()},
        {"fedcore": json.dumps(doc, sort_keys=True)},
    )
    digest = hashlib.sha256(blob).hexdigest()
    key = layout.optimizer_key(version, cohort_id, digest[:16])
    # AlreadyExists: this attempt's own bytes, from an earlier try that died before its commit.
    with contextlib.suppress(AlreadyExistsError):
        store.put_new(key, blob, metadata={"sha256": digest})
    return {"kind": kind.value, "key": key, "sha256": digest}


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
    optimizer: OptimizerConfig | None = None,
) -> Applied:
    """Commit ``mean_delta`` on top of the newest version, exactly once.

    ``optimizer`` gives the server rule and its hyperparameters (None: plain FedAvg);
    its learning rate is ``server_lr``, the one the cohort's config recorded. Raises
    ``NonFiniteModelError`` (nothing written) if the step yields NaN or infinity.
    """
    config = replace(optimizer or OptimizerConfig(), lr=server_lr)
    head = find_head(store)
    found = _applied_in(store, cohort_id, range(base_version + 1, head + 1))
    if found is not None:
        advance_pointer(store, head)
        return Applied(found, -1, 0.0, already=True)
    while True:
        params, head_meta, _ = load_model(store, head)
        s = head - base_version
        sw = staleness_weight(s, rule)
        w = server_lr * sw
        state = read_optimizer_state(store, head_meta, config.kind, params)
        new, new_state = optimizers.step(config, params, mean_delta, state, weight=sw)
        if not optimizers.all_finite(new, *new_state.values()):
            bad = sorted(k for k, a in new.items() if not np.isfinite(a).all())
            reason = (
                f"{config.kind.value} step on v{head} gives a non-finite version "
                f"(tensors {bad or 'of the state'}); not committed"
            )
            log.error(reason, extra={"cohort_id": cohort_id, "version": head, "phase": "apply"})
            raise NonFiniteModelError(reason)
        ref = None
        if config.stateful:
            ref = write_optimizer_state(
                store, version=head + 1, cohort_id=cohort_id, kind=config.kind, state=new_state
            )
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
            optimizer=ref,
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
