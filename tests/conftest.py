"""Shared fixtures: a real S3 API (moto's standalone server) for the whole session."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from fedcore.storage import S3Store
from infra.pump import PushSource
from infra.s3server import EmbeddedS3

os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    with EmbeddedS3() as server:
        yield server.endpoint_url


@pytest.fixture
def notifications() -> PushSource | None:
    """Where ``LocalStack`` gets events: None lets its pump list new objects.

    ``tests/seaweed/conftest.py`` overrides it with SeaweedFS's webhook bridge.
    """
    return None


@pytest.fixture
def store(s3_endpoint: str) -> S3Store:
    """A fresh, empty bucket on the moto server."""
    s = S3Store.connect(f"test-{os.getpid()}-{next(_buckets)}", s3_endpoint)
    s.ensure_bucket()
    return s
