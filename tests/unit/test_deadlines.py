"""Adaptive inputs deadlines: sizing from reported training seconds, and the metadata field."""

from __future__ import annotations

import json

import pytest

from fedcore.codec import UpdateMeta
from fedcore.errors import IntegrityError, NotFoundError
from fedcore.server.deadlines import (
    TRAIN_P90,
    RecentTraining,
    inputs_deadline_s,
    percentile,
    train_metrics,
)
from fedcore.server.settings import ServerSettings


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0], 90) == 5.0
    assert percentile([float(i) for i in range(1, 11)], 90) == 9.0
    assert percentile([3.0, 1.0, 2.0], 90) == 3.0
    assert train_metrics([]) == {}
    assert train_metrics([1.0, 2.0, 30.0]) == {TRAIN_P90: 30.0, "train_s_reports": 3}


def test_deadline_is_margin_times_the_slowest_recent_p90_within_bounds() -> None:
    """GIVEN margin 2 and bounds [10, 100] THEN recent p90s of 12 and 30 give 60; tiny ones
    give the minimum, huge ones the maximum; no reports, or margin 0, keep the fixed one."""
    s = ServerSettings(
        round_deadline_s=600.0, deadline_margin=2.0, deadline_min_s=10.0, deadline_max_s=100.0
    )
    assert inputs_deadline_s(s, [12.0, 30.0]) == 60.0
    assert inputs_deadline_s(s, [1.0]) == 10.0
    assert inputs_deadline_s(s, [500.0]) == 100.0
    assert inputs_deadline_s(s, []) == 600.0
    fixed = ServerSettings(round_deadline_s=600.0)
    assert inputs_deadline_s(fixed, [30.0]) == 600.0
    with pytest.raises(ValueError):
        ServerSettings(deadline_min_s=10.0, deadline_max_s=5.0)


def test_recent_training_reads_each_version_once_and_skips_what_it_cannot_use() -> None:
    """GIVEN versions 1-4 (v2 without reports, v3 unreadable, v4 malformed) THEN the window
    yields what is usable, and each version is read once however often formation asks."""
    reads: list[int] = []
    metrics = {1: {TRAIN_P90: 8.0}, 2: {}, 4: {TRAIN_P90: "fast"}, 5: {TRAIN_P90: 20.0}}

    def read(version: int) -> dict:  # type: ignore[type-arg]
        reads.append(version)
        if version == 3:
            raise NotFoundError("v3")
        return metrics[version]

    recent = RecentTraining(read)
    assert recent.p90s(5, 5) == [20.0, 8.0]
    assert recent.p90s(5, 2) == [20.0]
    assert reads == [5, 4, 3, 2, 1]
    assert recent.p90s(5, 5) == [20.0, 8.0]
    assert reads == [5, 4, 3, 2, 1, 3]  # only the unreadable one is read again
    assert recent.p90s(0, 5) == []  # version 0 is the seed: never trained


def test_update_meta_train_s_is_optional_and_byte_compatible() -> None:
    """GIVEN an update without train_s THEN its metadata is what it was before the field
    (no key); old metadata parses; a reported value round-trips; nonsense is refused."""
    old = UpdateMeta("c00000001", "a", 0, 10, 0.5)
    doc = json.loads(old.to_metadata()["fedcore"])
    assert "train_s" not in doc
    assert UpdateMeta.from_metadata(old.to_metadata(), where="k") == old
    new = UpdateMeta("c00000001", "a", 0, 10, 0.5, train_s=12.5)
    assert UpdateMeta.from_metadata(new.to_metadata(), where="k").train_s == 12.5
    for bad in (-1.0, 1e9, "12", True, float("nan")):
        meta = new.to_metadata()
        raw = json.loads(meta["fedcore"])
        raw["train_s"] = bad
        with pytest.raises(IntegrityError):
            UpdateMeta.from_metadata({**meta, "fedcore": json.dumps(raw)}, where="k")
