"""The version-watch loop that the demo and the simulator share (infra/watch.py)."""

from __future__ import annotations

import time

import numpy as np

from fedcore.codec import ModelMeta
from fedcore.storage import S3Store
from fedcore.versions import commit_version, seed
from infra.watch import Ended, VersionWatch

PARAMS = {"w": np.zeros(4, dtype=np.float32)}


def commit(store: S3Store, version: int) -> None:
    meta = ModelMeta(version=version, parent=version - 1, created_at=time.time())
    assert commit_version(store, PARAMS, meta) is not None


def test_a_version_written_just_before_the_last_device_exits_is_seen(store: S3Store) -> None:
    """
    GIVEN v0 and v1 in the bucket, and a run whose last device writes v2 and exits
          while the caller is still busy with v1
    WHEN the watch follows the bucket from v0
    THEN it yields v1 and v2, in order, and then ends because the devices exited
    """
    seed(store, PARAMS)
    commit(store, 1)
    running = [True]
    watch = VersionWatch(store, max_s=60.0, seen=0)
    seen = []
    for new in watch.follow(wait=lambda: None, alive=lambda: running[0]):
        seen.append(new.version)
        assert new.meta.version == new.version
        if new.version == 1:
            commit(store, 2)
            running[0] = False
    assert seen == [1, 2]
    assert watch.ended is Ended.EXITED


def test_the_watch_ends_at_its_time_limit_and_starts_from_the_head(store: S3Store) -> None:
    """GIVEN v0 and v1 WHEN a watch starts at the head with no time left THEN it yields
    nothing and says it timed out; a caller that stops early leaves ``ended`` unset."""
    seed(store, PARAMS)
    commit(store, 1)
    watch = VersionWatch(store, max_s=0.0)
    assert watch.seen == 1
    assert list(watch.follow(wait=lambda: None, alive=lambda: True)) == []
    assert watch.ended is Ended.TIMEOUT

    early = VersionWatch(store, max_s=60.0, seen=0)
    for _ in early.follow(wait=lambda: None, alive=lambda: True):
        break
    assert early.ended is None
