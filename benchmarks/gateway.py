"""What the device gateway costs a device: presigned-URL calls versus direct S3 access.

Local stack on the moto server, the real gateway handler behind the local
HTTP server, one enrolled device. Measures, per operation, the median and
95th percentile wall time of:

* ``presign``: one signed ``POST /urls`` round trip (verify signature, write
  the nonce marker, check the policy, sign), for batches of 1 and 16 requests;
* the device's storage operations through ``GatewayStore`` (fresh URL each
  time, and with the URL cache warm for reads) against ``S3Store`` with
  credentials: GET of the pointer, HEAD, write-once PUT of a 1 KiB check-in,
  GET of the 4.8 MB model.

Numbers are from a loopback moto server on a shared 2-core machine, so they
show the gateway's added latency, not AWS's.

Run: ``.venv/bin/python -m benchmarks.gateway`` (about 30 s). Writes
``benchmarks/results/gateway.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_client.gateway_store import GatewayStore
from fedcore import layout
from fedcore.gateway import issue_token
from fedcore.secagg import crypto
from infra.stack import LocalStack

RESULTS = Path(__file__).parent / "results" / "gateway.json"


def timed(fn: Callable[[int], object], n: int) -> dict[str, float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "n": n,
        "p50_ms": round(statistics.median(samples), 2),
        "p95_ms": round(samples[max(0, int(0.95 * n) - 1)], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gateway", description=__doc__)
    ap.add_argument("--n", type=int, default=50, help="repetitions per measurement")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    logs = Path("runs/benchmarks/gateway-functions.log")
    # One device puts n check-ins back to back: the check-in rate limit is off here, or
    # the gateway would answer 429 after CHECKINS_PER_MINUTE of them.
    with LocalStack(
        bucket=f"bench-gw-{int(time.time())}", log_path=logs, settings={"checkins_per_minute": 0}
    ) as stack:
        direct = stack.store
        sk = crypto.ed25519_keypair()[0]
        dev = GatewayStore(stack.gateway_url, "bench-1", sk)
        dev.enroll(issue_token(direct, "bench-1"))
        model = layout.model_key(0)
        one = [{"op": "get", "key": layout.LATEST_KEY}]
        sixteen = [{"op": "get", "key": layout.identity_key("bench-1")}] * 16
        results["presign_batch_1"] = timed(lambda i: dev.presign(one), args.n)
        results["presign_batch_16"] = timed(lambda i: dev.presign(sixteen), args.n)

        def fresh(fn: Callable[[int], object]) -> Callable[[int], object]:
            def run(i: int) -> object:
                dev._cache.clear()  # measure the cold path: one gateway call per operation
                return fn(i)

            return run

        for name, fn_dev, fn_direct in [
            ("get_pointer", lambda i: dev.get(layout.LATEST_KEY), lambda i: direct.get(layout.LATEST_KEY)),
            ("head_model", lambda i: dev.head(model), lambda i: direct.head(model)),
            ("get_model_4.8MB", lambda i: dev.get(model), lambda i: direct.get(model)),
        ]:  # fmt: skip
            results[name] = {
                "direct_s3": timed(fn_direct, args.n),
                "gateway_cold": timed(fresh(fn_dev), args.n),
                "gateway_cached_url": timed(fn_dev, args.n),
            }
        body = b"x" * 1024
        results["put_new_1KiB"] = {
            "direct_s3": timed(
                lambda i: direct.put_new(layout.checkin_key("bench-1", f"d{i}"), body), args.n
            ),
            "gateway": timed(
                lambda i: dev.put_new(layout.checkin_key("bench-1", f"g{i}"), body), args.n
            ),
        }
        results["gateway_calls"] = dev.gateway_calls
    doc = {
        "benchmark": "gateway",
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "server": "moto (loopback), gateway handler behind infra.gateway_server",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    for name, value in results.items():
        print(f"{name}: {json.dumps(value)}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
