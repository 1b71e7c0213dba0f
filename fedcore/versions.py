"""The global model as a log of write-once versions (DESIGN.md section 4).

Writing ``global/v{N+1}/model.safetensors`` with ``If-None-Match: *`` *is* the
commit; its metadata names the cohort(s) it applies and its parent N. The
pointer ``global/latest.json`` may lag: whoever sees a newer version than the
pointer rolls it forward with compare-and-swap, and never backwards.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from fedcore import layout
from fedcore.codec import Header, ModelMeta, decode_model, encode_model, parse_header
from fedcore.errors import AlreadyExistsError, ConflictError, IntegrityError, NotFoundError
from fedcore.messages import Pointer, dumps, parse_pointer
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)

_HEADER_PROBE = 64 * 1024


def read_pointer(store: ObjectStore) -> tuple[Pointer, str]:
    """The pointer and its ETag; ``NotFoundError`` if the bucket was never seeded."""
    obj = store.get(layout.LATEST_KEY)
    return parse_pointer(obj.body, where=layout.LATEST_KEY), obj.etag


def find_head(store: ObjectStore, start: int | None = None) -> int:
    """The newest committed version: the pointer's, then probe forward.

    The probe matters after a crash between a commit and the pointer update,
    or while a concurrent writer is between the two.
    """
    version = read_pointer(store)[0].version if start is None else start
    while store.head(layout.model_key(version + 1)) is not None:
        version += 1
    return version


def read_header(store: ObjectStore, version: int) -> Header:
    """A version's parsed header from ranged reads (no tensor bytes)."""
    key = layout.model_key(version)
    info = store.head(key)
    if info is None:
        raise NotFoundError(f"{key}: version {version} does not exist")
    prefix = store.get_range(key, 0, _HEADER_PROBE - 1)
    if len(prefix) >= 8:
        need = 8 + int.from_bytes(prefix[:8], "little")
        if len(prefix) < need <= info.size:
            prefix = store.get_range(key, 0, need - 1)
    return parse_header(prefix, where=key, total_size=info.size)


def read_meta(store: ObjectStore, version: int) -> ModelMeta:
    return ModelMeta.from_metadata(
        read_header(store, version).metadata, where=layout.model_key(version)
    )


def read_schema(store: ObjectStore, version: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor names, dtypes and shapes of a version: what every update must match."""
    return {n: (d, s) for n, (d, s, _, _) in read_header(store, version).tensors.items()}


def load_model(store: ObjectStore, version: int) -> tuple[dict[str, np.ndarray], ModelMeta, str]:
    """Download and decode a version; returns params, metadata and its sha256."""
    key = layout.model_key(version)
    obj = store.get(key)
    params, meta = decode_model(obj.body, where=key)
    if meta.version != version:
        raise IntegrityError(f"{key}: metadata says version {meta.version}")
    return params, meta, hashlib.sha256(obj.body).hexdigest()


def commit_version(
    store: ObjectStore, params: dict[str, np.ndarray], meta: ModelMeta
) -> str | None:
    """Try to commit ``meta.version``; its sha256 on success, ``None`` if another writer won."""
    blob = encode_model(params, meta)
    digest = hashlib.sha256(blob).hexdigest()
    try:
        store.put_new(layout.model_key(meta.version), blob, metadata={"sha256": digest})
    except AlreadyExistsError:
        return None
    return digest


def advance_pointer(store: ObjectStore, version: int, sha256: str | None = None) -> None:
    """Move ``latest.json`` forward to at least ``version`` (compare-and-swap, retried)."""
    for _ in range(20):
        try:
            current, etag = read_pointer(store)
        except NotFoundError:
            current, etag = None, None
        if current is not None and current.version >= version:
            return
        if sha256 is None:
            info = store.head(layout.model_key(version))
            sha256 = (info.metadata.get("sha256") if info else None) or ""
        body = dumps(Pointer(version, layout.model_key(version), sha256, time.time()))
        try:
            if etag is None:
                store.put_new(layout.LATEST_KEY, body, content_type="application/json")
            else:
                store.put_if_match(layout.LATEST_KEY, body, etag)
            log.info("pointer advanced", extra={"version": version})
            return
        except (ConflictError, AlreadyExistsError):
            continue
    raise ConflictError(f"{layout.LATEST_KEY}: could not advance to {version} after 20 tries")


def seed(store: ObjectStore, params: dict[str, np.ndarray]) -> bool:
    """Write version 0 and the pointer if the bucket has none; True if this call seeded."""
    meta = ModelMeta(version=0, parent=None, created_at=time.time())
    digest = commit_version(store, params, meta)
    if digest is None:
        advance_pointer(store, 0)
        return False
    advance_pointer(store, 0, digest)
    return True
