"""The injectable clock: a ManualClock moves only when told, and the handlers read it."""

from __future__ import annotations

import time

import pytest

from fedcore.clock import ManualClock, SystemClock
from functions import runtime


def test_manual_clock_stands_still_until_advanced() -> None:
    clock = ManualClock(1000.0)
    assert clock() == clock() == 1000.0
    assert clock.advance(2.5) == 1002.5 and clock() == 1002.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    assert abs(ManualClock()() - time.time()) < 60  # starts near the S3 server's clock


def test_system_clock_is_the_real_time() -> None:
    before = time.time()
    assert before <= SystemClock()() <= time.time()


def test_coordinators_built_by_the_handlers_read_the_clock_set_for_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIVEN runtime.set_clock(c) THEN every coordinator the handlers build reads c, and
    set_clock(None) puts the system clock back."""
    monkeypatch.setenv("BUCKET", "clock-test")
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # never contacted
    clock = ManualClock(5.0)
    previous = runtime.set_clock(clock)
    try:
        assert runtime.coordinator().clock is clock
        clock.advance(1)
        assert runtime.coordinator().clock() == 6.0
        assert runtime.set_clock(None) is clock
        assert isinstance(runtime.get_clock(), SystemClock)
    finally:
        runtime.set_clock(previous)
