"""S3 event notifications: parse what AWS sends, and build the same JSON locally.

AWS URL-encodes object keys in notifications (``quote_plus``: spaces become
``+``), so every key is ``unquote_plus``-ed exactly once here. ``build_record``
produces the complete record shape AWS documents (including
``userIdentity``, ``requestParameters``, ``responseElements`` and
``sequencer``, which moto's own notifications omit), so the local event pump
drives the real handler with real-shaped events.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus, unquote_plus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ObjectCreated:
    bucket: str
    key: str  # decoded
    size: int
    etag: str
    event_name: str
    sequencer: str


def is_test_event(event: dict[str, Any]) -> bool:
    """S3 sends ``{"Event": "s3:TestEvent", ...}`` once when notifications are configured."""
    return isinstance(event, dict) and event.get("Event") == "s3:TestEvent"


def parse_records(event: Any) -> Iterator[ObjectCreated | ValueError]:
    """Yield each ObjectCreated record, or a ``ValueError`` describing a malformed one.

    Errors are yielded, not raised, so one bad record cannot hide the others.
    """
    if not isinstance(event, dict) or not isinstance(event.get("Records"), list):
        yield ValueError(
            f"not an S3 notification: keys {sorted(event) if isinstance(event, dict) else type(event).__name__}"
        )
        return
    for i, rec in enumerate(event["Records"]):
        try:
            if not isinstance(rec, dict):
                raise ValueError(f"record {i}: not an object ({type(rec).__name__})")
            if rec.get("eventSource") != "aws:s3":
                raise ValueError(
                    f"record {i}: eventSource {rec.get('eventSource')!r} is not aws:s3"
                )
            name = rec["eventName"]
            s3 = rec["s3"]
            obj = s3["object"]
            bucket, raw_key, size = s3["bucket"]["name"], obj["key"], obj.get("size", 0)
            if not all(isinstance(v, str) for v in (name, bucket, raw_key)):
                raise ValueError(f"record {i}: eventName, bucket name and key must be strings")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ValueError(f"record {i}: object size {size!r} is not a non-negative integer")
            yield ObjectCreated(
                bucket=bucket,
                key=decode_key(raw_key, where=f"record {i}"),
                size=size,
                etag=str(obj.get("eTag", "")),
                event_name=name,
                sequencer=str(obj.get("sequencer", "")),
            )
        except ValueError as exc:
            yield exc
        except (KeyError, TypeError, AttributeError) as exc:
            yield ValueError(f"record {i}: malformed: missing or wrong-typed field {exc!r}")


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def decode_key(raw: str, *, where: str) -> str:
    """``unquote_plus`` exactly once, refusing what AWS never sends.

    ``unquote_plus`` silently keeps a malformed escape (``%G1``) and turns bytes
    that are not UTF-8 into U+FFFD, so two different keys could decode to the
    same string; a ``ValueError`` names the problem instead.
    """
    if _BAD_ESCAPE.search(raw):
        raise ValueError(
            f"{where}: key {raw[:200]!r} has bad URL-encoding (a '%' not followed by two hex digits)"
        )
    try:
        key = unquote_plus(raw, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: key {raw[:200]!r} is not URL-encoded UTF-8") from None
    if not key or len(key.encode()) > 1024:
        raise ValueError(f"{where}: key of {len(key.encode())} bytes (S3 allows 1 to 1024)")
    return key


def build_record(
    *,
    bucket: str,
    key: str,
    size: int,
    etag: str,
    sequencer: int,
    region: str = "us-east-1",
    when: _dt.datetime | None = None,
) -> dict[str, Any]:
    """One ``ObjectCreated:Put`` record exactly as AWS shapes it (event version 2.1)."""
    when = when or _dt.datetime.now(_dt.UTC)
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:LOCALDEVICE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": f"{sequencer:016X}",
            "x-amz-id-2": f"local/{sequencer:016X}",
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "local-event-pump",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "LOCALOWNER"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": {
                "key": quote_plus(key, safe="/"),
                "size": size,
                "eTag": etag.strip('"'),
                "sequencer": f"{sequencer:016X}",
            },
        },
    }


def build_event(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"Records": records}


def scheduled_event(
    *, region: str = "us-east-1", when: _dt.datetime | None = None
) -> dict[str, Any]:
    """The EventBridge "Scheduled Event" the sweeper receives on AWS."""
    when = when or _dt.datetime.now(_dt.UTC)
    return {
        "version": "0",
        "id": "00000000-0000-0000-0000-000000000000",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "000000000000",
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:events:{region}:000000000000:rule/local-sweeper"],
        "detail": {},
    }
