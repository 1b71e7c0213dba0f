"""Device gateway function: enrollment and presigned URLs (Lambda Function URL / HTTP API).

``POST /enroll`` and ``POST /urls`` with a JSON body, in the payload format
2.0 that Lambda Function URLs and API Gateway HTTP APIs share. The function
URL needs no IAM auth (devices have no AWS credentials, by design): every
call is authenticated by the device's Ed25519 signature, and enrollment by a
single-use operator token (``fedcore.gateway``). Thin by design: parse,
call the core, log, answer.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from functools import lru_cache
from typing import Any

import boto3
from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext
from botocore.config import Config

from fedcore.errors import StorageError
from fedcore.gateway import Denied, Gateway, Signer
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store

logger = Logger(service="fl-gateway")
if not logging.getLogger("fedcore").handlers:
    # Alone in a Lambda container: format the core's logs as this function's JSON. In the
    # local stack another handler (same process) has configured them already; keep that.
    copy_config_to_registered_loggers(source_logger=logger, include={"fedcore"})

MAX_BODY_BYTES = 64 * 1024


@lru_cache(maxsize=4)
def _gateway(
    bucket: str, endpoint: str | None, public_endpoint: str | None, checkins_per_minute: int
) -> Gateway:
    """One gateway per warm container: its caches hold only write-once facts."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    url_endpoint = public_endpoint or endpoint
    presigner = boto3.session.Session().client(
        "s3",
        endpoint_url=url_endpoint,
        region_name=region,
        # SigV4 so that If-None-Match is a signed header of put_new URLs.
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if url_endpoint else "virtual"},
        ),
    )
    return Gateway(
        S3Store.connect(bucket, endpoint, role="gateway"),
        Signer(presigner, bucket),
        checkins_per_minute=checkins_per_minute,
    )


def gateway() -> Gateway:
    bucket = os.environ.get("BUCKET")
    if not bucket:
        raise RuntimeError("BUCKET is not set: the function does not know its bucket")
    return _gateway(
        bucket,
        os.environ.get("S3_ENDPOINT_URL") or None,
        os.environ.get("S3_PUBLIC_ENDPOINT_URL") or None,
        ServerSettings.from_env().checkins_per_minute,
    )


def _answer(
    status: int, doc: dict[str, Any], headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "statusCode": status,
        "headers": {
            "content-type": "application/json",
            "cache-control": "no-store",
            **(headers or {}),
        },
        "body": json.dumps(doc, sort_keys=True),
    }


def _body(event: dict[str, Any]) -> dict[str, Any]:
    raw = event.get("body") or ""
    data = base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()
    if len(data) > MAX_BODY_BYTES:
        raise Denied(f"body larger than {MAX_BODY_BYTES} bytes", status=413)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise Denied("body is not JSON", status=400) from None
    if not isinstance(doc, dict):
        raise Denied("body must be a JSON object", status=400)
    return doc


# Routed by hand rather than with powertools' LambdaFunctionUrlResolver: the resolver
# keeps the request being served in class-level state (BaseRouter.current_event, shared
# by every instance), and the local stack serves this handler from a threading HTTP
# server (infra/gateway_server.py), where concurrent requests then read each other's
# event (powertools 3.37, 8 threads, 1 us thread switch interval: 24 of 4,000 calls were
# answered with another request's route or body). On AWS each container serves one
# request at a time, so only the local stack would be wrong, and only under load.
ROUTES = {"/enroll": "enroll", "/urls": "urls"}


@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    http = (event.get("requestContext") or {}).get("http") or {}
    method = str(http.get("method", "")).upper()
    path = event.get("rawPath") or http.get("path") or ""
    if path not in ROUTES:
        return _answer(404, {"error": "not_found", "reason": f"no route {path}"})
    if method != "POST":
        return _answer(405, {"error": "method_not_allowed", "reason": "use POST"})
    try:
        body = _body(event)
        gw = gateway()
        result = gw.enroll(body) if ROUTES[path] == "enroll" else gw.urls(body)
    except Denied as exc:
        logger.warning(
            "request refused",
            extra={
                "route": path,
                "client_id": exc.fields.get("client_id"),
                "op": exc.fields.get("op"),
                "key": exc.fields.get("key"),
                "reason": exc.reason,
                "status": exc.status,
            },
        )
        kind = {
            400: "bad_request",
            409: "conflict",
            413: "too_large",
            429: "too_many_requests",
        }.get(exc.status, "forbidden")
        retry = exc.fields.get("retry_after_s")
        return _answer(
            exc.status,
            {"error": kind, "reason": exc.reason},
            {"retry-after": str(retry)} if retry is not None else None,
        )
    except StorageError:
        logger.exception("storage error", extra={"route": path})
        return _answer(503, {"error": "unavailable", "reason": "storage error; retry"})
    return _answer(200, result)
