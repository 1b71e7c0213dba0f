"""Object storage with the two conditional writes the protocol is built on.

``put_new`` is S3's ``If-None-Match: *`` (write-once: the commit of every
protocol step) and ``put_if_match`` is ``If-Match: <etag>`` (compare-and-swap
of the single mutable pointer). Failed conditions become ``AlreadyExistsError``
and ``ConflictError`` so callers never parse botocore errors.

Throttling (503 SlowDown) and connection errors are retried by botocore's
"standard" retry mode with exponential backoff and jitter; what survives the
retries becomes ``ThrottledError`` / ``StorageError`` naming the key.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import boto3
import botocore.session
import botocore.utils
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from fedcore.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    NotModifiedError,
    StorageError,
    ThrottledError,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredObject:
    key: str
    body: bytes
    etag: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    last_modified: float  # seconds since the epoch
    metadata: dict[str, str] = field(default_factory=dict)  # user metadata (HEAD only)


class ObjectStore(Protocol):
    """What the protocol needs from a bucket; ``S3Store`` is the real one."""

    bucket: str

    def get(self, key: str, *, if_none_match: str | None = None) -> StoredObject: ...

    def get_range(self, key: str, start: int, end: int) -> bytes: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def put_new(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = ...,
        metadata: dict[str, str] | None = ...,
    ) -> str: ...

    def put_if_match(self, key: str, body: bytes, etag: str, *, content_type: str = ...) -> str: ...

    def put(self, key: str, body: bytes, *, content_type: str = ...) -> str: ...

    def delete(self, key: str) -> None: ...

    def delete_many(self, keys: list[str]) -> None: ...

    def list(
        self, prefix: str, *, start_after: str | None = None, page_size: int = ...
    ) -> Iterator[ObjectInfo]: ...

    def list_prefixes(self, prefix: str, *, start_after: str | None = None) -> list[str]: ...


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def make_s3_client(
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    max_attempts: int = 8,
    max_pool_connections: int = 32,
    role: str | None = None,
) -> Any:
    """A boto3 S3 client with retries and path-style addressing for local servers.

    Path-style is forced when an endpoint URL is given because moto, SeaweedFS
    and MinIO on 127.0.0.1 have no wildcard DNS for virtual-hosted buckets.
    ``max_attempts`` counts retries (botocore's meaning): 8 rides out a few
    seconds of 503 SlowDown or connection resets
    (tests/integration/test_storage_faults.py). ``role`` tags the User-Agent
    (``s3fl-role/function``), so a local run can meter who made each request.
    """
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint_url else None,
        user_agent_extra=f"s3fl-role/{role}" if role else None,
    )
    core = botocore.session.Session()
    core.get_component("response_parser_factory").set_parser_defaults(
        timestamp_parser=parse_s3_timestamp
    )
    return boto3.session.Session(botocore_session=core).client(
        "s3", endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
    )


def parse_s3_timestamp(value: str | float) -> datetime:
    """The timestamps S3 sends, parsed as botocore's default parser would, at 1/20 the cost.

    botocore parses every ``LastModified`` with dateutil (60-95 us each); a listing of a few
    hundred check-ins, which formation and the sweeper read on every invocation, spent
    milliseconds there. S3 writes ISO 8601 in XML bodies and RFC 1123 in headers; anything
    else goes to botocore's own parser, so the result never differs
    (tests/unit/test_storage_timestamps.py).
    """
    if isinstance(value, str):
        try:
            if value[:4].isdigit() and "T" in value:
                parsed = datetime.fromisoformat(value)
            else:
                parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    return botocore.utils.parse_timestamp(value)


class S3Store:
    """``ObjectStore`` over any S3 API (AWS, moto server, SeaweedFS, MinIO)."""

    def __init__(self, bucket: str, client: Any) -> None:
        self.bucket = bucket
        self._s3 = client

    @classmethod
    def connect(cls, bucket: str, endpoint_url: str | None = None, **kwargs: Any) -> S3Store:
        return cls(bucket, make_s3_client(endpoint_url, **kwargs))

    # -- error mapping -------------------------------------------------
    def _fail(self, exc: Exception, key: str, op: str) -> StorageError:
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return NotFoundError(f"s3://{self.bucket}/{key}: not found ({op})")
            if code in ("SlowDown", "Throttling", "503") or status == 503:
                return ThrottledError(f"s3://{self.bucket}/{key}: throttled after retries ({op})")
            return StorageError(f"s3://{self.bucket}/{key}: {op} failed: {code or status} {exc}")
        return StorageError(f"s3://{self.bucket}/{key}: {op} failed: {exc}")

    # -- reads ---------------------------------------------------------
    def get(self, key: str, *, if_none_match: str | None = None) -> StoredObject:
        """Download an object; with ``if_none_match`` raise ``NotModifiedError`` on 304."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        try:
            resp = self._s3.get_object(**kwargs)
            body = resp["Body"].read()
        except ClientError as exc:
            if _status(exc) == 304 or _code(exc) in ("304", "NotModified"):
                raise NotModifiedError(f"s3://{self.bucket}/{key}: not modified") from exc
            raise self._fail(exc, key, "get") from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key, "get") from exc
        return StoredObject(key, body, resp["ETag"], dict(resp.get("Metadata") or {}))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``start..end`` inclusive (HTTP Range semantics); may return fewer at EOF."""
        try:
            resp = self._s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
            return resp["Body"].read()
        except ClientError as exc:
            if _code(exc) == "InvalidRange" or _status(exc) == 416:
                return b""
            raise self._fail(exc, key, "get_range") from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key, "get_range") from exc

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _status(exc) == 404 or _code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail(exc, key, "head") from exc
        except BotoCoreError as exc:
            raise self._fail(exc, key, "head") from exc
        return ObjectInfo(
            key,
            int(resp["ContentLength"]),
            resp["ETag"],
            resp["LastModified"].timestamp(),
            dict(resp.get("Metadata") or {}),
        )

    def list(
        self, prefix: str, *, start_after: str | None = None, page_size: int = 1000
    ) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` in key order, following continuation tokens."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": prefix,
            "PaginationConfig": {"PageSize": page_size},
        }
        if start_after:
            kwargs["StartAfter"] = start_after
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(**kwargs):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        item["Key"],
                        int(item["Size"]),
                        item["ETag"],
                        item["LastModified"].timestamp(),
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, prefix, "list") from exc

    def list_prefixes(self, prefix: str, *, start_after: str | None = None) -> list[str]:
        """The immediate "folders" under ``prefix`` (delimiter ``/``), in key order.

        A listed folder may be empty: SeaweedFS keeps a folder's directory, and lists
        it, after its last object is deleted (AWS lists prefixes only through
        objects). Callers treat a folder without its expected object as "not yet"
        (``Participant.find_cohort``) or skip it (the sweeper).
        """
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
        if start_after:
            kwargs["StartAfter"] = start_after
        out: list[str] = []
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(**kwargs):
                out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, prefix, "list") from exc
        return out

    # -- writes --------------------------------------------------------
    def _put(
        self,
        key: str,
        body: bytes,
        content_type: str,
        op: str,
        metadata: dict[str, str] | None = None,
        **cond: str,
    ) -> str:
        # A 409 ConditionalRequestConflict means another conditional write to the
        # same key is in flight on AWS; it resolves within milliseconds, so retry.
        for attempt in range(5):
            try:
                resp = self._s3.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType=content_type,
                    Metadata=metadata or {},
                    **cond,
                )
                return str(resp["ETag"])
            except ClientError as exc:
                code, status = _code(exc), _status(exc)
                if status == 409 and attempt < 4:
                    time.sleep(0.05 * 2**attempt)
                    continue
                if status == 412 or code == "PreconditionFailed":
                    if "IfNoneMatch" in cond:
                        err = AlreadyExistsError(f"s3://{self.bucket}/{key}: already exists")
                        meta = exc.response.get("ResponseMetadata", {})
                        err.retried = int(meta.get("RetryAttempts") or 0) > 0  # type: ignore[attr-defined]
                        raise err from exc
                    raise ConflictError(f"s3://{self.bucket}/{key}: changed since read") from exc
                if "IfMatch" in cond and (status == 404 or code == "NoSuchKey"):
                    # AWS answers 404 for If-Match on a missing key; SeaweedFS 412.
                    raise ConflictError(f"s3://{self.bucket}/{key}: missing (If-Match)") from exc
                raise self._fail(exc, key, op) from exc
            except BotoCoreError as exc:
                raise self._fail(exc, key, op) from exc
        raise StorageError(f"s3://{self.bucket}/{key}: {op} kept conflicting")  # pragma: no cover

    def put_new(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Create ``key`` only if absent; ``AlreadyExistsError`` otherwise.

        A put whose response was lost (a connection reset after the server
        stored it) is retried by botocore and then meets its own object: 412.
        Only then, after a retry *within this call*, do identical bytes count as
        this write; without a retry a 412 is always someone else's object, even
        with the same bytes (a replayed request writing the same marker).
        """
        try:
            return self._put(key, body, content_type, "put_new", metadata, IfNoneMatch="*")
        except AlreadyExistsError as exc:
            if not getattr(exc, "retried", False):
                raise
            info = self.head(key)
            ours = hashlib.md5(body, usedforsecurity=False).hexdigest()  # S3's ETag
            if info is not None and info.etag.strip('"') == ours:
                return info.etag
            raise

    def put_if_match(
        self, key: str, body: bytes, etag: str, *, content_type: str = "application/json"
    ) -> str:
        """Replace ``key`` only if its ETag is still ``etag``; ``ConflictError`` otherwise."""
        return self._put(key, body, content_type, "put_if_match", None, IfMatch=etag)

    def put(self, key: str, body: bytes, *, content_type: str = "application/octet-stream") -> str:
        """Unconditional put: only for objects nobody else may write (bucket bootstrap)."""
        return self._put(key, body, content_type, "put")

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail(exc, key, "delete") from exc

    def delete_many(self, keys: list[str]) -> None:
        """Delete up to 1,000 keys per request (DeleteObjects); missing keys are not errors."""
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            try:
                resp = self._s3.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._fail(exc, batch[0], "delete_objects") from exc
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"delete_objects: {len(errors)} of {len(batch)} keys failed, first "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (local stacks; on AWS the template owns it)."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            try:
                self._s3.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise self._fail(exc, "", "create_bucket") from exc
