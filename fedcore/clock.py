"""Where the server side reads the time: the system clock, or one a test moves by hand.

Deadlines (a phase's ``phase_s`` counted from the cohort's ``created_at`` or the
previous manifest's ``closed_at``), check-in expiry and stuck-cohort recovery all
compare the coordinator's clock with times it wrote earlier. Injecting the clock
lets a test cross a deadline with ``ManualClock.advance`` instead of sleeping it
out, and makes the crossing exact: nothing closes before the test says so, however
slow the machine.

A clock is any zero-argument callable returning seconds since the epoch, so
``time.time`` itself is one; ``Coordinator(clock=...)`` has always taken that shape.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Seconds since the epoch, as ``time.time()`` returns them."""

    def __call__(self) -> float: ...


class SystemClock:
    """The real time: what deployed functions use."""

    def __call__(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that stands still until ``advance`` moves it (thread-safe).

    It starts at the real time by default, because the server also compares its
    clock with times the S3 API stamps (an object's ``LastModified`` for check-in
    expiry): starting there keeps those ages near zero, as they would be for real.
    Moving it far ahead of the S3 server's clock (past ``checkin_ttl_s``) would
    make fresh check-ins look expired, as a badly skewed server clock would.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the time forward by ``seconds`` (not backward); returns the new time."""
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        with self._lock:
            self._now += seconds
            return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self():.3f})"
