"""Local event source: turns new objects into AWS-shaped S3 events for the handler.

moto's S3 -> Lambda path needs Docker, and its notifications lack fields AWS
sends, so the pump lists the watched prefixes, diffs against what it has
seen (key + ETag) and invokes the real handler on a thread pool with one
record per event, as S3 does. Like Lambda's asynchronous invocation, a failed
invocation is retried twice with a delay and then parked in ``dead_letters``.
For tests it can deliver every event twice and shuffle the order.

With ``listing=False`` the pump lists nothing: a push source (the SeaweedFS
webhook bridge in ``infra/seaweed.py``) hands it each written object through
``push``, and the same invocation, retry and dead-letter machinery runs.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedcore.events import build_event, build_record
from fedcore.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any], Any], Any]


class PushSource(Protocol):
    """A change feed that pushes written objects (``infra.seaweed.SeaweedFS``)."""

    def subscribe(
        self, bucket: str, callback: Callable[[str, int, str], Any]
    ) -> Callable[[], None]:
        """Call ``callback(key, size, etag)`` per object written to ``bucket``; returns
        the unsubscribe."""
        ...


@dataclass
class LocalContext:
    """Enough of Lambda's context object for powertools' ``inject_lambda_context``."""

    function_name: str
    memory_limit_in_mb: int = 1024
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:000000000000:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


@dataclass
class PumpStats:
    events: int = 0
    invocations: int = 0
    retries: int = 0
    dead_letters: list[tuple[str, str]] = field(default_factory=list)


class EventPump:
    def __init__(
        self,
        store: ObjectStore,
        handler: Handler,
        *,
        prefixes: tuple[str, ...] = ("checkins/", "cohorts/"),
        interval_s: float = 0.1,
        workers: int = 4,
        duplicate: bool = False,
        shuffle: bool = False,
        retry_delay_s: float = 0.5,
        seed: int | None = None,
        function_name: str = "aggregator",
        listing: bool = True,
    ) -> None:
        self.store = store
        self.handler = handler
        self.prefixes = prefixes
        self.interval_s = interval_s
        self.duplicate = duplicate
        self.shuffle = shuffle
        self.retry_delay_s = retry_delay_s
        self.function_name = function_name
        self.listing = listing
        self.stats = PumpStats()
        self._rng = random.Random(seed)
        self._seen: set[tuple[str, str]] = set()
        self._seq = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lambda")
        self._inflight: set[Future[None]] = set()
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> EventPump:
        self._thread = threading.Thread(target=self._run, name="event-pump", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        self._pool.shutdown(wait=True)

    def _run(self) -> None:
        while self.listing and not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep pumping through transient listing errors
                log.exception("event pump tick failed")
            self._stop.wait(self.interval_s)

    # -- delivery -------------------------------------------------------------
    def tick(self) -> int:
        """List once and dispatch an event for every new object; returns how many.

        Without ``listing`` it dispatches nothing and returns how many listed objects
        the push source has not delivered yet.
        """
        with self._tick_lock:
            return self._tick()

    def push(self, key: str, size: int, etag: str) -> bool:
        """Dispatch an event for one object a push source reports written.

        Returns False (and dispatches nothing) for keys outside the watched prefixes
        and for a (key, ETag) already dispatched, e.g. a notification redelivered
        by its source.
        """
        if not key.startswith(self.prefixes):
            return False
        with self._tick_lock:
            if (key, etag) in self._seen:
                return False
            self._seen.add((key, etag))
            self._dispatch([ObjectInfo(key, size, etag, time.time())])
        return True

    def _tick(self) -> int:
        new = []
        for prefix in self.prefixes:
            for info in self.store.list(prefix):
                ident = (info.key, info.etag)
                if ident not in self._seen:
                    if not self.listing:  # count only: the push source owes this event
                        new.append(info)
                        continue
                    self._seen.add(ident)
                    new.append(info)
        if self.listing:
            self._dispatch(new)
        return len(new)

    def _dispatch(self, new: list[ObjectInfo]) -> None:
        deliveries = [i for i in new for _ in range(2 if self.duplicate else 1)]
        if self.shuffle:
            self._rng.shuffle(deliveries)
        for info in deliveries:
            record = build_record(
                bucket=self.store.bucket,
                key=info.key,
                size=info.size,
                etag=info.etag,
                sequencer=next(self._seq),
            )
            self._submit(build_event([record]), info.key, attempt=0)
        self.stats.events += len(new)

    def _submit(self, event: dict[str, Any], key: str, attempt: int) -> None:
        fut = self._pool.submit(self._invoke, event, key, attempt)
        with self._lock:
            self._inflight.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(fut)

    def _invoke(self, event: dict[str, Any], key: str, attempt: int) -> None:
        if attempt:
            time.sleep(self.retry_delay_s * attempt)
        self.stats.invocations += 1
        try:
            self.handler(event, LocalContext(self.function_name))
        except Exception as exc:
            if attempt < 2 and not self._stop.is_set():
                self.stats.retries += 1
                log.warning("invocation failed; retrying", extra={"key": key, "reason": repr(exc)})
                self._submit(event, key, attempt + 1)
            else:
                self.stats.dead_letters.append((key, repr(exc)))
                log.error(
                    "invocation failed 3 times; dead-lettered",
                    extra={"key": key, "reason": repr(exc)},
                )

    def idle(self) -> bool:
        with self._lock:
            return not self._inflight

    def drain(self, timeout_s: float = 60.0) -> None:
        """Block until a listing finds nothing new and no invocation is running.

        Without ``listing``, "nothing new" means every listed object has been pushed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle() and self.tick() == 0 and self.idle():
                return
            time.sleep(self.interval_s)
        raise TimeoutError(f"event pump did not drain within {timeout_s} s")


class Timer:
    """Calls ``fn`` every ``interval_s`` seconds on a daemon thread (the local EventBridge)."""

    def __init__(self, fn: Callable[[], Any], interval_s: float, name: str = "timer") -> None:
        self.fn = fn
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Timer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.fn()
            except Exception:
                log.exception("timer callback failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
