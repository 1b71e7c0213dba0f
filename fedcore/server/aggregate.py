"""Streaming weighted mean of plaintext updates in O(model) memory.

Objects are fetched with bounded concurrency (at most ``concurrency`` GETs in
flight and ``concurrency + 2`` bodies in memory at once) and folded into one
float64 accumulator as they arrive, so memory does not grow with the cohort.
An update that fails validation is excluded with its reason; the caller
treats its sender as a dropout.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from fedcore.codec import Schema, UpdateMeta, decode_update
from fedcore.errors import FedError
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# Raises IntegrityError/ProtocolError if the update's metadata contradicts its key or cohort,
# or its signature does not cover exactly these tensors: (client, metadata, tensors).
MetaCheck = Callable[[str, UpdateMeta, Mapping[str, np.ndarray]], None]


def stream_objects(
    store: ObjectStore,
    items: Iterable[tuple[str, str]],
    *,
    concurrency: int,
    parse: Callable[[str, str, bytes], T],
) -> Iterator[tuple[str, str, Future[tuple[int, T]]]]:
    """Yield (client, key, future of (size, parse(client, key, body))) as downloads finish.

    At most ``concurrency`` GETs are in flight and at most ``concurrency + 2``
    bodies are alive (downloading, being parsed, or yielded and not yet
    folded), whatever the number of items. ``parse`` (validation, decoding,
    hashing) runs in the worker threads *after* the thread gives up its GET
    slot, so the next download starts while this body is hashed: the
    connection pool stays as busy as a plain read of the same objects
    (``benchmarks/aggregate.py``); hashlib and numpy release the GIL. Two bodies
    in parse are enough: hashing one takes a fraction of the time to GET it.
    """
    gets = threading.BoundedSemaphore(concurrency)

    def fetch(client: str, key: str) -> tuple[int, T]:
        with gets:
            body = store.get(key).body
        return len(body), parse(client, key, body)

    depth = concurrency + 2
    pending: dict[Future[tuple[int, T]], tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=depth) as pool:
        for client, key in items:
            if len(pending) >= depth:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield (*pending.pop(fut), fut)
            pending[pool.submit(fetch, client, key)] = (client, key)
        for fut in as_completed(list(pending)):
            yield (*pending.pop(fut), fut)


@dataclass
class MeanResult:
    mean: dict[str, np.ndarray]
    total_weight: int
    included: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    train_s: dict[str, float] = field(default_factory=dict)  # members that reported it


def weighted_mean(
    store: ObjectStore,
    uploads: Iterable[tuple[str, str]],
    *,
    schema: Schema,
    check: MetaCheck,
    concurrency: int = 4,
    cohort_id: str | None = None,
    clip: float | None = None,
    weight_cap: int | None = None,
) -> MeanResult:
    """FedAvg's sample-weighted mean of the updates at ``uploads`` ((client, key) pairs).

    Bounded influence of one member: with ``clip``, each member's delta is scaled down
    to L2 norm ``clip`` before it is averaged, so the mean's norm is at most ``clip``
    whatever the weights (a convex combination); with ``weight_cap``, a member's weight
    is min(num_samples, weight_cap), as under secure aggregation, so no declared sample
    count outweighs ``weight_cap`` honest ones. A member whose delta is not finite
    (or whose norm overflows) is rejected and counted as a dropout.
    """
    acc = {name: np.zeros(shape, dtype=np.float64) for name, (_, shape) in schema.items()}
    result = MeanResult(mean={}, total_weight=0, included=[])

    def parse(client: str, key: str, blob: bytes) -> tuple[dict[str, np.ndarray], UpdateMeta]:
        delta, meta = decode_update(blob, where=key, schema=schema)
        check(client, meta, delta)
        return delta, meta

    def fold(client: str, key: str, fut: Future[tuple[int, Any]]) -> None:
        try:
            size, (delta, meta) = fut.result()
            result.bytes_read += size
        except FedError as exc:
            result.rejected[client] = str(exc)
            log.warning(
                "update rejected; treated as a dropout",
                extra={"cohort_id": cohort_id, "client_id": client, "key": key, "reason": str(exc)},
            )
            return
        wide = {name: arr.astype(np.float64) for name, arr in delta.items()}
        norm = math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in wide.values()))
        if not math.isfinite(norm):
            why = f"{key}: update is not finite (L2 norm {norm})"
            result.rejected[client] = why
            log.warning(
                "update rejected; treated as a dropout",
                extra={"cohort_id": cohort_id, "client_id": client, "key": key, "reason": why},
            )
            return
        scale = clip / norm if clip is not None and norm > clip else 1.0
        if scale < 1.0:
            log.info(
                "update scaled down to the server's L2 clip",
                extra={"cohort_id": cohort_id, "client_id": client, "norm": norm, "clip": clip},
            )
        weight = meta.num_samples if weight_cap is None else min(meta.num_samples, weight_cap)
        for name, arr in wide.items():
            acc[name] += (weight * scale) * arr
        result.total_weight += weight
        result.included.append(client)
        result.losses[client] = float(meta.loss)
        if meta.train_s is not None:
            result.train_s[client] = float(meta.train_s)

    for client, key, fut in stream_objects(store, uploads, concurrency=concurrency, parse=parse):
        fold(client, key, fut)
    if result.total_weight:
        result.mean = {k: (v / result.total_weight).astype(np.float32) for k, v in acc.items()}
    result.included.sort()
    return result
