"""What a run would cost on AWS, from what it measurably did.

Two meters collect the usage of a local run: ``S3Meter`` wraps the embedded S3
server's WSGI app and counts every request by price class and caller role (the
``s3fl-role/...`` tag each component puts in its User-Agent), with the bytes
sent back; ``InvocationMeter`` times each function invocation. ``estimate``
prices that usage with ``infra/aws-prices.json`` (edit it to match your region
and date) and divides it per global version and per device participation.

Caveats the report repeats: function durations are measured on this machine,
not on Lambda's CPUs; free tiers are ignored; S3-to-Lambda traffic in one
region is free, so only the devices' downloads count as data transfer out.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRICES = Path(__file__).with_name("aws-prices.json")
ROLE_TAG = "s3fl-role/"
_ROLE = re.compile(r"s3fl-role/([a-z]+)")
# Who would make these requests on AWS. "other" is the local stack itself (the pump's
# listings stand in for S3 notifications) and the demo's own evaluation reads.
PRICED_ROLES = ("device", "function", "gateway")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def price_class(method: str, path: str) -> str:
    """S3's billing class of one request: tier1 (PUT, COPY, POST, LIST), tier2 (GET,
    HEAD and the rest) or free (DELETE). A GET on the bucket itself is a LIST."""
    if method == "DELETE":
        return "free"
    if method in ("PUT", "POST"):
        return "tier1"
    if method == "GET" and path.strip("/").count("/") == 0:
        return "tier1"  # path-style bucket URL: a listing
    return "tier2"


@dataclass
class S3Usage:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (role, class)
    bytes_out: Counter[str] = field(default_factory=Counter)  # role -> response bytes
    bytes_in: Counter[str] = field(default_factory=Counter)  # role -> request bytes


class S3Meter:
    """WSGI middleware: counts requests and bytes by caller role and price class."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app
        self.usage = S3Usage()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        m = _ROLE.search(environ.get("HTTP_USER_AGENT", ""))
        role = m.group(1) if m else "other"
        cls = price_class(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/"))
        size_in = int(environ.get("CONTENT_LENGTH") or 0)
        body = self.app(environ, start_response)
        out = 0
        try:
            for chunk in body:
                out += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close:
                close()
            with self._lock:
                self.usage.requests[(role, cls)] += 1
                self.usage.bytes_out[role] += out
                self.usage.bytes_in[role] += size_in


class InvocationMeter:
    """Invocations and busy seconds per function (what Lambda bills as duration)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()
        self._lock = threading.Lock()

    def timed(self, function: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.calls[function] += 1
                    self.seconds[function] += time.perf_counter() - t

        return wrapper


def load_prices(path: Path = PRICES) -> dict[str, Any]:
    return json.loads(path.read_text())


def estimate(
    s3: S3Usage,
    functions: InvocationMeter,
    *,
    stored_bytes: int,
    versions: int,
    participations: int,
    prices: dict[str, Any],
) -> dict[str, Any]:
    """Dollar figures for the run, per version and per device participation."""
    p_s3, p_fn, dep = prices["s3"], prices["lambda"], prices["deployment"]
    gb = 1024**3
    tiers: Counter[str] = Counter()
    for (role, cls), n in s3.requests.items():
        if role in PRICED_ROLES:
            tiers[cls] += n
    gb_s = {
        name: functions.seconds[name] * dep["memory_mb"].get(name, 1024) / 1024
        for name in functions.calls
    }
    rate = p_fn[f"gb_second_{dep['architecture']}"]
    lines = {
        "s3_tier1_requests": tiers["tier1"] * p_s3["tier1_per_1000"] / 1000,
        "s3_tier2_requests": tiers["tier2"] * p_s3["tier2_per_1000"] / 1000,
        "s3_storage_month": stored_bytes / gb * p_s3["storage_gb_month"],
        "transfer_out_to_devices": s3.bytes_out["device"] / gb * p_s3["transfer_out_gb"],
        "lambda_requests": sum(functions.calls.values()) * p_fn["per_million_requests"] / 1e6,
        "lambda_duration": sum(gb_s.values()) * rate,
    }
    run_total = sum(v for k, v in lines.items() if k != "s3_storage_month")
    return {
        "prices": {"source": prices["source"], "currency": prices["currency"]},
        "usage": {
            "s3_requests": {f"{r}/{c}": n for (r, c), n in sorted(s3.requests.items())},
            "s3_requests_by_class": dict(tiers),
            "bytes_to_devices": s3.bytes_out["device"],
            "bytes_from_devices": s3.bytes_in["device"],
            "stored_bytes": stored_bytes,
            "invocations": dict(functions.calls),
            "function_seconds": {k: round(v, 3) for k, v in functions.seconds.items()},
            "gb_seconds": {k: round(v, 3) for k, v in gb_s.items()},
        },
        "cost_usd": {k: round(v, 6) for k, v in lines.items()},
        "run_usd": round(run_total, 6),
        "per_version_usd": round(run_total / versions, 6) if versions else None,
        "per_participation_usd": round(run_total / participations, 6) if participations else None,
        "storage_per_month_usd": round(lines["s3_storage_month"], 6),
        "notes": [
            "Function durations are measured locally, not on Lambda's CPUs.",
            "Free tiers are ignored; S3 to Lambda traffic in one region is free.",
            "Requests by the local event pump and the demo's evaluation (role 'other') "
            "are listed in usage but not priced: on AWS, S3 notifications replace the pump.",
            "The local sweeper runs every second; the template schedules it every minute.",
            "Storage is everything in the bucket at the end, for one month "
            "(the template's lifecycle rules expire cohort objects sooner).",
        ],
    }
