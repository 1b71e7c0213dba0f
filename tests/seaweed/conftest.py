"""SeaweedFS fixtures: one real ``weed mini`` server for the session, a fresh bucket per test.

Overriding ``s3_endpoint`` and ``notifications`` makes the moto suites' fixtures
(imported into the modules here) run the same scenarios against SeaweedFS, with
events from its webhook bridge instead of the pump's listing. No skip when
``weed`` is missing: ``make test`` installs it (dev extra), so its absence is a
broken environment and fails loudly.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import pytest

from fedcore.storage import S3Store
from infra.seaweed import SeaweedFS

log = logging.getLogger(__name__)

_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        log.info("SeaweedFS started", extra={"startup_s": round(server.startup_s, 2)})
        yield server
        assert server.bridge.stats.rejected == 0, "webhook calls with a wrong token or body"
        assert server.bridge.stats.failures == [], server.bridge.stats.failures


@pytest.fixture(scope="session")
def s3_endpoint(seaweed: SeaweedFS) -> str:
    return seaweed.endpoint_url


@pytest.fixture
def notifications(seaweed: SeaweedFS) -> SeaweedFS:
    """Events for ``LocalStack`` come from SeaweedFS's webhook, not from listing."""
    return seaweed


@pytest.fixture
def store(s3_endpoint: str) -> S3Store:
    """A fresh, empty bucket on the SeaweedFS server."""
    s = S3Store.connect(f"sw-{os.getpid()}-{next(_buckets)}", s3_endpoint)
    s.ensure_bucket()
    return s
