"""``ObjectStore`` for a device without bucket credentials: presigned URLs from the gateway.

Every operation asks the gateway (``POST /urls``, signed with the device's
enrolled Ed25519 key) for a presigned URL and then talks to S3 directly with
plain HTTP (urllib3, which botocore already depends on), so the model and
update bytes never pass through the function. Read URLs are cached for most
of their lifetime, so polling the pointer costs one gateway call per few
minutes, not one per poll; ``presign`` fetches many URLs in one call.

Errors map to what ``S3Store`` raises: 404 -> ``NotFoundError``, 304 ->
``NotModifiedError``, 412 on a write-once put -> ``AlreadyExistsError``; a
refusal by the gateway's policy (or S3's) -> ``GatewayDeniedError``. Torch-free.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import unquote

import urllib3

from fedcore import access
from fedcore.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    NotModifiedError,
    StorageError,
    ThrottledError,
)
from fedcore.storage import ObjectInfo, StoredObject

log = logging.getLogger(__name__)
DEVICE_UA = {"User-Agent": "s3fl-role/device"}  # lets a local run meter who made each request

_S3NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_REUSE_S = access.URL_EXPIRES_S - 60  # use a cached URL only while it has a minute left


class GatewayDeniedError(AccessDeniedError):
    """The gateway (or S3, on the gateway's URL) refused: the device may not do this."""


def _iso_to_epoch(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class GatewayStore:
    """The device's bucket, reached only through gateway-issued presigned URLs."""

    def __init__(
        self,
        gateway_url: str,
        client_id: str,
        signing_key: bytes,
        *,
        retries: int = 4,
        timeout_s: float = 60.0,
    ) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.bucket = f"gateway:{self.gateway_url}"  # the device never learns the bucket's name
        self.client_id = client_id
        self._sk = signing_key
        self._http = urllib3.PoolManager(
            maxsize=8,
            timeout=urllib3.Timeout(connect=5.0, read=timeout_s),
            retries=urllib3.Retry(
                total=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,  # also PUT: a lost write-once put then reads as 412
                raise_on_status=False,
                respect_retry_after_header=True,
            ),
        )
        self._cache: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.gateway_calls = 0

    # -- talking to the gateway -------------------------------------------------
    def _post(self, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            resp = self._http.request(
                "POST",
                self.gateway_url + path,
                body=json.dumps(doc).encode(),
                headers={"Content-Type": "application/json"},
                retries=False,  # the caller retries with a fresh nonce and timestamp
            )
        except urllib3.exceptions.HTTPError as exc:
            raise StorageError(f"gateway {self.gateway_url}{path}: {exc}") from exc
        try:
            answer = json.loads(resp.data or b"{}")
        except ValueError:
            answer = {"reason": resp.data[:200].decode("utf-8", "replace")}
        return resp.status, answer if isinstance(answer, dict) else {}

    def enroll(self, token: str) -> bool:
        """Enroll this device's key with an operator token; True if this call enrolled it."""
        status, answer = self._post(
            "/enroll", access.enroll_request(self.client_id, self._sk, token)
        )
        if status == 200:
            return bool(answer.get("enrolled"))
        reason = answer.get("reason", f"HTTP {status}")
        if status == 409:
            raise IntegrityError(f"enrollment of {self.client_id!r} refused: {reason}")
        raise GatewayDeniedError(f"enrollment of {self.client_id!r} refused: {reason}")

    def presign(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Presigned URLs for a batch of ``{op, key}`` / ``{op: "list", prefix, ...}``."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(requests), access.MAX_BATCH):
            batch = requests[start : start + access.MAX_BATCH]
            for attempt in range(4):
                # A fresh nonce per attempt: a retried body would read as a replay.
                body = access.urls_request(
                    self.client_id, self._sk, batch, nonce=secrets.token_urlsafe(16)
                )
                self.gateway_calls += 1
                try:
                    status, answer = self._post("/urls", body)
                except StorageError:
                    if attempt == 3:
                        raise
                    time.sleep(0.2 * 2**attempt)
                    continue
                if status < 500 or attempt == 3:
                    break
                time.sleep(0.2 * 2**attempt)
            if status != 200:
                reason = answer.get("reason", f"HTTP {status}")
                if status == 403:
                    raise GatewayDeniedError(f"gateway refused: {reason}")
                if status == 429:  # the check-in rate limit: retry after the minute
                    raise ThrottledError(f"gateway refused: {reason}")
                raise StorageError(f"gateway answered {status}: {reason}")
            urls = answer.get("urls")
            if not isinstance(urls, list) or len(urls) != len(batch):
                raise StorageError("gateway answered a malformed URL list")
            now = time.monotonic()
            with self._lock:
                for req, url in zip(batch, urls, strict=True):
                    if req["op"] != "put_new":  # write URLs are single use
                        self._cache[_cache_key(req)] = (now, url)
            out.extend(urls)
        return out

    def _url(self, req: dict[str, Any]) -> dict[str, Any]:
        ck = _cache_key(req)
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None and time.monotonic() - hit[0] < _REUSE_S:
                return hit[1]
            if len(self._cache) > 4096:  # drop expired entries now and then
                cutoff = time.monotonic() - _REUSE_S
                self._cache = {k: v for k, v in self._cache.items() if v[0] >= cutoff}
        return self.presign([req])[0]

    def _send(
        self,
        req: dict[str, Any],
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> urllib3.BaseHTTPResponse:
        for attempt in range(2):
            url = self._url(req)
            try:
                resp = self._http.request(
                    url["method"],
                    url["url"],
                    body=body,
                    headers={**DEVICE_UA, **(headers or {}), **url.get("headers", {})},
                    preload_content=True,
                    redirect=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                raise StorageError(f"{req.get('key') or req.get('prefix')}: {exc}") from exc
            if resp.status != 403 or attempt or req["op"] == "put_new":
                return resp
            # A cached URL S3 no longer honours (expired early, rotated credentials): once more.
            with self._lock:
                self._cache.pop(_cache_key(req), None)
        return resp  # pragma: no cover

    def _fail(self, resp: urllib3.BaseHTTPResponse, what: str, op: str) -> StorageError:
        code = _error_code(resp.data)
        if resp.status == 404:
            return NotFoundError(f"{what}: not found ({op})")
        if resp.status == 403:
            return GatewayDeniedError(f"{what}: S3 refused the presigned {op} ({code or 403})")
        if resp.status == 503:
            return ThrottledError(f"{what}: throttled after retries ({op})")
        return StorageError(f"{what}: {op} failed: HTTP {resp.status} {code}")

    # -- reads ------------------------------------------------------------------
    def get(self, key: str, *, if_none_match: str | None = None) -> StoredObject:
        headers = {"If-None-Match": if_none_match} if if_none_match else {}
        resp = self._send({"op": "get", "key": key}, headers=headers)
        if resp.status == 304:
            raise NotModifiedError(f"{key}: not modified")
        if resp.status != 200:
            raise self._fail(resp, key, "get")
        return StoredObject(key, resp.data, resp.headers.get("ETag", ""), _meta(resp))

    def get_range(self, key: str, start: int, end: int) -> bytes:
        resp = self._send({"op": "get", "key": key}, headers={"Range": f"bytes={start}-{end}"})
        if resp.status == 416:
            return b""
        if resp.status not in (200, 206):
            raise self._fail(resp, key, "get_range")
        data = resp.data
        # A server that ignores Range answers 200 with everything: cut it here.
        return data[start : end + 1] if resp.status == 200 else data

    def head(self, key: str) -> ObjectInfo | None:
        resp = self._send({"op": "head", "key": key})
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._fail(resp, key, "head")
        modified = resp.headers.get("Last-Modified")
        return ObjectInfo(
            key,
            int(resp.headers.get("Content-Length", 0)),
            resp.headers.get("ETag", ""),
            parsedate_to_datetime(modified).timestamp() if modified else 0.0,
            _meta(resp),
        )

    def _pages(self, prefix: str, delimiter: str, start_after: str | None) -> Iterator[ET.Element]:
        token: str | None = None
        while True:
            req: dict[str, Any] = {"op": "list", "prefix": prefix}
            if delimiter:
                req["delimiter"] = delimiter
            if start_after:
                req["start_after"] = start_after
            if token:
                req["continuation_token"] = token
            resp = self._send(req)
            if resp.status != 200:
                raise self._fail(resp, prefix, "list")
            try:
                root = ET.fromstring(resp.data)
            except ET.ParseError as exc:
                raise StorageError(f"{prefix}: unparsable list response ({exc})") from exc
            yield root
            if _text(root, "IsTruncated") != "true":
                return
            token = _text(root, "NextContinuationToken")
            if not token:
                raise StorageError(f"{prefix}: truncated list without a continuation token")

    def list(
        self, prefix: str, *, start_after: str | None = None, page_size: int = 1000
    ) -> Iterator[ObjectInfo]:
        """Every object under ``prefix`` in key order (``page_size`` is the server's)."""
        for root in self._pages(prefix, "", start_after):
            encoded = _text(root, "EncodingType") == "url"
            for item in root.iter(f"{_S3NS}Contents"):
                key = _text(item, "Key") or ""
                yield ObjectInfo(
                    unquote(key) if encoded else key,
                    int(_text(item, "Size") or 0),
                    _text(item, "ETag") or "",
                    _iso_to_epoch(_text(item, "LastModified") or "1970-01-01T00:00:00Z"),
                )

    def list_prefixes(self, prefix: str, *, start_after: str | None = None) -> list[str]:
        out: list[str] = []
        for root in self._pages(prefix, "/", start_after):
            encoded = _text(root, "EncodingType") == "url"
            for cp in root.iter(f"{_S3NS}CommonPrefixes"):
                p = _text(cp, "Prefix") or ""
                out.append(unquote(p) if encoded else p)
        return out

    # -- writes -----------------------------------------------------------------
    def put_new(
        self,
        key: str,
        body: bytes,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> str:
        """Create ``key`` only if absent (the URL signs ``If-None-Match: *``)."""
        if metadata:
            raise GatewayDeniedError(f"{key}: devices may not set object metadata")
        for attempt in range(5):
            resp = self._send(
                {"op": "put_new", "key": key, "size": len(body)},
                body=body,
                headers={"Content-Type": content_type, "If-None-Match": "*"},
            )
            if resp.status == 409 and attempt < 4:  # a concurrent conditional write in flight
                time.sleep(0.05 * 2**attempt)
                continue
            if resp.status == 412:
                raise AlreadyExistsError(f"{key}: already exists")
            if resp.status != 200:
                raise self._fail(resp, key, "put_new")
            return resp.headers.get("ETag", "")
        raise StorageError(f"{key}: put_new kept conflicting")  # pragma: no cover

    def _refuse(self, op: str, key: str) -> GatewayDeniedError:
        return GatewayDeniedError(f"{key}: devices may not {op} (write-once objects only)")

    def put_if_match(
        self, key: str, body: bytes, etag: str, *, content_type: str = "application/json"
    ) -> str:
        raise self._refuse("replace objects", key)

    def put(self, key: str, body: bytes, *, content_type: str = "application/octet-stream") -> str:
        raise self._refuse("overwrite objects", key)

    def delete(self, key: str) -> None:
        raise self._refuse("delete objects", key)

    def delete_many(self, keys: list[str]) -> None:
        raise self._refuse("delete objects", keys[0] if keys else "")


def _cache_key(req: dict[str, Any]) -> tuple[Any, ...]:
    return (
        req["op"],
        req.get("key") or req.get("prefix"),
        req.get("delimiter"),
        req.get("start_after"),
        req.get("continuation_token"),
    )


def _meta(resp: urllib3.BaseHTTPResponse) -> dict[str, str]:
    return {
        k.lower()[len("x-amz-meta-") :]: v
        for k, v in resp.headers.items()
        if k.lower().startswith("x-amz-meta-")
    }


def _text(node: ET.Element, name: str) -> str | None:
    child = node.find(f"{_S3NS}{name}")
    if child is None:
        child = node.find(name)  # servers that omit the namespace
    return child.text if child is not None else None


def _error_code(data: bytes) -> str:
    try:
        return _text(ET.fromstring(data), "Code") or ""
    except ET.ParseError:
        return ""
