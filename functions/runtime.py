"""What both handlers share: the store and settings of this container.

Built once per warm Lambda container (module-level cache), from the
environment the SAM template sets: ``BUCKET`` and optionally
``S3_ENDPOINT_URL`` (local stacks, MinIO).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from typing import Any

from fedcore.clock import Clock, SystemClock
from fedcore.metrics import MetricSink
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store, make_s3_client

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def _one_malloc_arena() -> None:
    """Keep the container's peak memory a function of the model size, not the cohort size.

    The streaming sum downloads a model-sized body per upload in up to six
    threads (``stream_objects``). glibc gives each thread its own malloc arena,
    and the freed bodies fragment across them, so the peak kept growing with
    the cohort: 111 MB at n = 10, 135 MB (up to 144) at n = 500
    (``benchmarks/aggregate.py``). With one arena the bodies reuse each other's
    memory (within 1.1x from 9 to 500 bodies) for about 8% more CPU; handing
    each body back to the OS instead (``MALLOC_MMAP_THRESHOLD_``) is flat too
    but costs 25% more CPU in page faults. Must run before any thread starts.
    No-op on other C libraries.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


_one_malloc_arena()


# The time the coordinator reads. Handlers are called with only (event, context), so a
# local stack that wants deadlines crossed on its own clock (``LocalStack(clock=...)``)
# sets it here for every invocation in this process; deployed functions keep the system's.
_clock: Clock = SystemClock()


def set_clock(clock: Clock | None) -> Clock:
    """Make every coordinator built from now on read ``clock`` (None: the system clock).

    Returns the clock it replaces, so that the caller can put it back.
    """
    global _clock
    previous, _clock = _clock, clock if clock is not None else SystemClock()
    return previous


def get_clock() -> Clock:
    return _clock


@lru_cache(maxsize=8)
def _client(endpoint: str | None) -> Any:
    """One boto3 client per endpoint: building one costs about 0.13 s of CPU, and a
    local stack (or a test session) serves many buckets from one process."""
    return make_s3_client(endpoint, role="function")


def _store(bucket: str, endpoint: str | None) -> S3Store:
    return S3Store(bucket, _client(endpoint))


def coordinator(metric: MetricSink | None = None) -> Coordinator:
    """The coordinator over this container's store, publishing through ``metric``."""
    bucket = os.environ.get("BUCKET")
    if not bucket:
        raise RuntimeError("BUCKET is not set: the function does not know its bucket")
    store = _store(bucket, os.environ.get("S3_ENDPOINT_URL") or None)
    kwargs = {"metric": metric} if metric else {}
    return Coordinator(store, ServerSettings.from_env(), clock=_clock, **kwargs)
