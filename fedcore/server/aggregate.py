"""Streaming weighted mean of plaintext updates in O(model) memory.

Objects are fetched with bounded concurrency (at most ``concurrency`` bodies
in memory at once) and folded into one float64 accumulator as they arrive,
so memory does not grow with the cohort. An update that fails validation is
excluded with its reason; the caller treats its sender as a dropout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np

from fedcore.codec import Schema, UpdateMeta, decode_update
from fedcore.errors import FedError
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)

# Raises IntegrityError/ProtocolError if the update's metadata contradicts its key or cohort.
MetaCheck = Callable[[str, UpdateMeta], None]


def stream_objects(
    store: ObjectStore, items: Iterable[tuple[str, str]], *, concurrency: int
) -> Iterator[tuple[str, str, Future[bytes]]]:
    """Yield (client, key, finished download) with at most ``concurrency`` bodies in memory."""
    pending: dict[Future[bytes], tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for client, key in items:
            if len(pending) >= concurrency:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield (*pending.pop(fut), fut)
            pending[pool.submit(lambda k=key: store.get(k).body)] = (client, key)
        for fut in list(pending):
            yield (*pending.pop(fut), fut)


@dataclass
class MeanResult:
    mean: dict[str, np.ndarray]
    total_weight: int
    included: list[str]
    rejected: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0
    losses: dict[str, float] = field(default_factory=dict)


def weighted_mean(
    store: ObjectStore,
    uploads: Iterable[tuple[str, str]],
    *,
    schema: Schema,
    check: MetaCheck,
    concurrency: int = 4,
) -> MeanResult:
    """FedAvg's sample-weighted mean of the updates at ``uploads`` ((client, key) pairs)."""
    acc = {name: np.zeros(shape, dtype=np.float64) for name, (_, shape) in schema.items()}
    result = MeanResult(mean={}, total_weight=0, included=[])

    def fold(client: str, key: str, fut: Future[bytes]) -> None:
        try:
            blob = fut.result()
            result.bytes_read += len(blob)
            delta, meta = decode_update(blob, where=key, schema=schema)
            check(client, meta)
        except FedError as exc:
            result.rejected[client] = str(exc)
            log.warning(
                "update rejected", extra={"client_id": client, "key": key, "reason": str(exc)}
            )
            return
        for name, arr in delta.items():
            acc[name] += meta.num_samples * arr.astype(np.float64)
        result.total_weight += meta.num_samples
        result.included.append(client)
        result.losses[client] = float(meta.loss)

    for client, key, fut in stream_objects(store, uploads, concurrency=concurrency):
        fold(client, key, fut)
    if result.total_weight:
        result.mean = {k: (v / result.total_weight).astype(np.float32) for k, v in acc.items()}
    result.included.sort()
    return result
