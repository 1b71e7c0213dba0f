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
from typing import Any, TypeVar

import numpy as np

from fedcore.codec import Schema, UpdateMeta, decode_update
from fedcore.errors import FedError
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# Raises IntegrityError/ProtocolError if the update's metadata contradicts its key or cohort.
MetaCheck = Callable[[str, UpdateMeta], None]


def stream_objects(
    store: ObjectStore,
    items: Iterable[tuple[str, str]],
    *,
    concurrency: int,
    parse: Callable[[str, str, bytes], T],
) -> Iterator[tuple[str, str, Future[tuple[int, T]]]]:
    """Yield (client, key, future of (size, parse(client, key, body))) as downloads finish.

    At most ``concurrency`` bodies are in memory at once. ``parse`` (validation,
    decoding, hashing) runs in the download threads, so it overlaps with the
    other downloads and with the caller's fold; hashlib and numpy release the GIL.
    """

    def fetch(client: str, key: str) -> tuple[int, T]:
        body = store.get(key).body
        return len(body), parse(client, key, body)

    pending: dict[Future[tuple[int, T]], tuple[str, str]] = {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for client, key in items:
            if len(pending) >= concurrency:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield (*pending.pop(fut), fut)
            pending[pool.submit(fetch, client, key)] = (client, key)
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

    def parse(client: str, key: str, blob: bytes) -> tuple[dict[str, np.ndarray], UpdateMeta]:
        delta, meta = decode_update(blob, where=key, schema=schema)
        check(client, meta)
        return delta, meta

    def fold(client: str, key: str, fut: Future[tuple[int, Any]]) -> None:
        try:
            size, (delta, meta) = fut.result()
            result.bytes_read += size
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

    for client, key, fut in stream_objects(store, uploads, concurrency=concurrency, parse=parse):
        fold(client, key, fut)
    if result.total_weight:
        result.mean = {k: (v / result.total_weight).astype(np.float32) for k, v in acc.items()}
    result.included.sort()
    return result
