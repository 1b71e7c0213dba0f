"""What both handlers share: the store and settings of this container.

Built once per warm Lambda container (module-level cache), from the
environment the SAM template sets: ``BUCKET`` and optionally
``S3_ENDPOINT_URL`` (local stacks, MinIO).
"""

from __future__ import annotations

import os
from functools import lru_cache

from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store


@lru_cache(maxsize=8)
def _store(bucket: str, endpoint: str | None) -> S3Store:
    return S3Store.connect(bucket, endpoint)


def coordinator(metric=None) -> Coordinator:  # type: ignore[no-untyped-def]
    bucket = os.environ.get("BUCKET")
    if not bucket:
        raise RuntimeError("BUCKET is not set: the function does not know its bucket")
    store = _store(bucket, os.environ.get("S3_ENDPOINT_URL") or None)
    kwargs = {"metric": metric} if metric else {}
    return Coordinator(store, ServerSettings.from_env(), **kwargs)
