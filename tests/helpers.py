"""Test helpers: synthetic devices that speak the protocol without torch."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.codec import ModelMeta
from fedcore.messages import CohortConfig
from fedcore.modelspec import SIMPLE_CNN
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.storage import S3Store, make_s3_client
from fedcore.versions import find_head, read_meta

TINY = {"w": (6, 5), "b": (5,)}

# The S3 APIs a scenario can run on (``backend`` fixture, tests/conftest.py): moto's
# server, whose objects LocalStack's pump finds by listing, and SeaweedFS, whose
# webhook bridge pushes the events. ``@both_backends`` runs a test on each.
BACKENDS = ("moto", "seaweed")
both_backends = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@cache
def _client(endpoint: str) -> Any:
    return make_s3_client(endpoint)


def connect(bucket: str, endpoint: str) -> S3Store:
    """``S3Store.connect`` with one boto3 client per endpoint for the whole session.

    Building a client costs about 0.13 s of CPU; paid per bucket, that was a second
    per ten tests and half a minute over the 200 random schedules. Clients are
    thread-safe, and the tests' threads shared one client per store already.
    """
    return S3Store(bucket, _client(endpoint))


def delta_for(
    client: str, spec: dict[str, tuple[int, ...]] = TINY, scale: float = 0.01
) -> dict[str, np.ndarray]:
    """A deterministic per-client update, so expected means can be computed.

    Seeded with a CRC of the name: ``hash(str)`` changes with PYTHONHASHSEED, which
    made every run draw different updates.
    """
    rng = np.random.default_rng(zlib.crc32(client.encode()))
    return {k: (scale * rng.normal(size=s)).astype(np.float32) for k, s in spec.items()}


def wait_until(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


_SIGNING_KEYS: dict[str, bytes] = {}


def signing_key(client: str) -> bytes:
    """The test client's Ed25519 private key, one per client id for the whole session."""
    return _SIGNING_KEYS.setdefault(client, crypto.ed25519_keypair()[0])


def participant(store: S3Store, client: str, mode: str = "plaintext") -> Participant:
    """A device with a per-client signing key, enrolled in this bucket (both modes sign)."""
    key = signing_key(client)
    p = Participant(store, client, mode=mode, signing_key=key)
    p.enroll()
    return p


def join_all(
    store: S3Store, clients: list[str], last_version: int = 0, mode: str = "plaintext"
) -> dict[str, CohortConfig]:
    """Check every client in, then wait until each has found its cohort."""
    parts = {c: participant(store, c, mode) for c in clients}
    tickets = {c: p.check_in(last_version) for c, p in parts.items()}
    out = {}
    for c, p in parts.items():
        cfg = p.wait_for_cohort(tickets[c], timeout_s=30, poll_s=0.05)
        assert cfg is not None, f"{c} found no cohort"
        out[c] = cfg
    return out


def chain(store: S3Store) -> list[ModelMeta]:
    return [read_meta(store, v) for v in range(find_head(store) + 1)]


def assert_consistent(store: S3Store, expect_cohorts: set[str] | None = None) -> list[ModelMeta]:
    """One linear version chain; every cohort applied at most once; results agree."""
    metas = chain(store)
    for v, m in enumerate(metas):
        assert m.version == v
        assert m.parent == (v - 1 if v else None), f"v{v} parent {m.parent}"
    applied = [c for m in metas for c in m.cohorts]
    assert len(applied) == len(set(applied)), f"cohort applied twice: {applied}"
    if expect_cohorts is not None:
        assert set(applied) == expect_cohorts
    for m in metas[1:]:
        for c in m.cohorts:
            obj = store.get(layout.state_key(c, layout.Phase.RESULT))
            assert b'"applied"' in obj.body and f'"version":{m.version}'.encode() in obj.body
    return metas


__all__ = [
    "BACKENDS",
    "SIMPLE_CNN",
    "TINY",
    "assert_consistent",
    "both_backends",
    "chain",
    "connect",
    "delta_for",
    "join_all",
    "participant",
    "signing_key",
    "wait_until",
]


def function_env(
    monkeypatch: pytest.MonkeyPatch, store: S3Store, s3_endpoint: str, **settings: str
) -> pytest.MonkeyPatch:
    """The environment a handler test's functions read: the code's defaults (a LocalStack
    earlier in the process may have left its settings), this bucket, deadlines far away
    (events drive the rounds) and ``settings`` (env name -> value) on top; the TINY model
    seeded at version 0."""
    from fedcore.server.settings import ServerSettings
    from fedcore.versions import seed

    for var in ServerSettings.env_names().values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("BUCKET", store.bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint)
    far = {"ROUND_DEADLINE_S": "600", "SHORT_ROUND_S": "600", "CHECKIN_WAIT_S": "600"}
    for name, value in {**far, "STUCK_AFTER_S": "600", **settings}.items():
        monkeypatch.setenv(name, value)
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    return monkeypatch
