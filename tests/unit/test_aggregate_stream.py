"""The streaming read of the aggregation path: bounded GETs and bodies, and threaded unmasking.

The speed of these paths is measured by ``benchmarks/aggregate.py``; these
tests pin down what the speed must not cost: the bounds on memory and
concurrency, and bit-identical sums.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from fedcore.secagg.masking import remove_masks
from fedcore.server.aggregate import stream_objects
from fedcore.server.secure import remove_masks_threaded


@dataclass
class _Body:
    body: bytes


class CountingStore:
    """Serves ``get`` from a dict and records the most GETs and bodies alive at once."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self._lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.alive = self.max_alive = 0

    def get(self, key: str) -> _Body:
        with self._lock:
            self.in_flight += 1
            self.alive += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.max_alive = max(self.max_alive, self.alive)
        time.sleep(0.001)  # let other downloads overlap this one
        with self._lock:
            self.in_flight -= 1
        return _Body(self.objects[key])

    def release(self) -> None:
        """The caller has folded one body and dropped it."""
        with self._lock:
            self.alive -= 1


@pytest.mark.parametrize("concurrency", [1, 3, 4])
def test_stream_objects_bounds_gets_and_bodies(concurrency: int) -> None:
    # GIVEN 40 objects and a parse that is slow next to a GET (hashing a large body)
    objects = {f"k{i:02d}": bytes([i]) * 64 for i in range(40)}
    store = CountingStore(objects)

    def parse(client: str, key: str, body: bytes) -> int:
        time.sleep(0.002)
        return body[0]

    # WHEN they are streamed and folded one by one
    seen = []
    items = [(f"c{i:02d}", k) for i, k in enumerate(objects)]
    for client, key, fut in stream_objects(store, items, concurrency=concurrency, parse=parse):  # type: ignore[arg-type]
        size, value = fut.result()
        seen.append((client, key, size, value))
        store.release()

    # THEN each object is yielded once with its own parse, at most `concurrency`
    # GETs ran at once, and at most `concurrency + 2` bodies were ever alive
    assert sorted(seen) == [(f"c{i:02d}", f"k{i:02d}", 64, i) for i in range(40)]
    assert store.max_in_flight <= concurrency
    assert store.max_alive <= concurrency + 2


def test_stream_objects_reports_a_failed_parse_in_its_future() -> None:
    # GIVEN one object whose parse fails among good ones
    objects = {f"k{i}": bytes([i]) for i in range(6)}
    store = CountingStore(objects)

    def parse(client: str, key: str, body: bytes) -> int:
        if key == "k3":
            raise ValueError("bad upload")
        return body[0]

    # WHEN streamed, THEN only that future raises; the others still arrive
    good, bad = [], []
    for _client, key, fut in stream_objects(
        store,  # type: ignore[arg-type]
        [(k, k) for k in objects],
        concurrency=2,
        parse=parse,
    ):
        try:
            good.append(fut.result()[1])
        except ValueError:
            bad.append(key)
    assert sorted(good) == [0, 1, 2, 4, 5] and bad == ["k3"]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n_seeds,n_pairs", [(0, 0), (1, 0), (3, 2), (9, 14)])
def test_threaded_mask_removal_equals_the_serial_one(
    threads: int, n_seeds: int, n_pairs: int
) -> None:
    # GIVEN a masked-looking vector, self seeds and dangling pair seeds
    rng = np.random.default_rng(n_seeds * 100 + n_pairs)
    total = rng.integers(0, 2**32, size=70_001, dtype=np.uint32)  # not a chunk multiple
    seeds = [os.urandom(32) for _ in range(n_seeds)]
    dangling = [(f"u{i:02d}", f"v{i % 3}", os.urandom(32)) for i in range(n_pairs)]

    # WHEN the masks are removed serially and split over threads
    serial = remove_masks(total.copy(), self_seeds=seeds, dangling=dangling)
    threaded = remove_masks_threaded(
        total.copy(), self_seeds=seeds, dangling=dangling, threads=threads
    )

    # THEN the results are identical mod 2^32
    assert threaded.dtype == np.uint32
    assert np.array_equal(serial, threaded)
