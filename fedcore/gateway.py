"""The device gateway: enrollment with operator tokens, and presigned URLs by policy.

Devices never hold bucket credentials. A device proves who it is with its
enrolled Ed25519 key on every call, and gets back presigned URLs (valid
``URL_EXPIRES_S``) for exactly the objects ``fedcore.access.decide`` allows.
A presigned URL acts with the gateway's own credentials, so the gateway's IAM
role is the ceiling of what any URL can do; ``put_new`` URLs sign the
``If-None-Match: *`` header, so S3 refuses a request without it and a device
can never overwrite anything.

Objects the gateway owns (outside the protocol layout, so devices can touch
none of them and the aggregation function's events never see them):

``enrollment/tokens/{sha256}.json``  an operator-issued token: only its hash,
                                     the client id it is for and its expiry
``enrollment/used/{sha256}.json``    write-once: the token was consumed (by whom)
``gateway/nonces/{client}/{nonce}.json``  write-once replay marker of a URL request
``gateway/nonces/{client}/checkin.{minute}.{slot}.json``  write-once: a check-in URL
                                     was issued to the client in that minute

Replay protection uses write-once nonce markers in the bucket rather than a
per-process cache: Lambda runs many containers that share no memory, so a
cache would let a captured request be replayed against another container
within the time window. Markers older than the window are useless and a
lifecycle rule expires them.

The check-in rate limit (``CHECKINS_PER_MINUTE`` per device) counts with the
same kind of marker, for the same reason: each check-in URL claims one of the
minute's numbered slots by a write-once put, so two containers can never hand
out the same slot, and a request that finds every slot of the minute taken is
refused with 429. The slot names hold a ``.``, which no nonce does, so a
device cannot collide with them. Check-in objects themselves could not serve
as the count: formation deletes the ones it takes, and a device can be given
many URLs before it writes any.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fedcore import access, layout
from fedcore.access import CLOCK_SKEW_S, MAX_BATCH, URL_EXPIRES_S, CohortFacts
from fedcore.errors import (
    AlreadyExistsError,
    FedError,
    IntegrityError,
    NotFoundError,
    UnknownKeyError,
)
from fedcore.layout import Kind
from fedcore.messages import Mode, parse_config
from fedcore.secagg import crypto
from fedcore.secagg.protocol import encode_identity, parse_identity
from fedcore.server.phases import input_cap
from fedcore.server.settings import ServerSettings
from fedcore.storage import ObjectStore
from fedcore.versions import read_schema

log = logging.getLogger(__name__)

TOKENS_PREFIX = "enrollment/tokens/"
USED_PREFIX = "enrollment/used/"
NONCES_PREFIX = "gateway/nonces/"
MAX_TOKEN_TTL_S = 30 * 86400  # tokens must expire before the enrollment/ lifecycle rule fires
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


def token_key(digest: str) -> str:
    return f"{TOKENS_PREFIX}{digest}.json"


def used_key(digest: str) -> str:
    return f"{USED_PREFIX}{digest}.json"


def nonce_key(client_id: str, nonce: str) -> str:
    return f"{NONCES_PREFIX}{layout.check_id(client_id, 'client id')}/{nonce}.json"


RATE_WINDOW_S = 60  # CHECKINS_PER_MINUTE counts per fixed minute


def checkin_slots_prefix(client_id: str, window: int) -> str:
    """Where the check-in slots a client claimed in minute ``window`` are (one LIST)."""
    return f"{NONCES_PREFIX}{layout.check_id(client_id, 'client id')}/checkin.{window}."


def checkin_slot_key(client_id: str, window: int, slot: int) -> str:
    return f"{checkin_slots_prefix(client_id, window)}{slot:04d}.json"


def issue_token(
    store: ObjectStore, client_id: str, *, ttl_s: float = 86400.0, public_key: bytes | None = None
) -> str:
    """Create a single-use enrollment token for ``client_id``; returns the token.

    Only its SHA-256 is stored (write-once), so a leak of the bucket's
    enrollment records does not leak usable tokens. With ``public_key`` (the key
    the operator certified for the device) the token enrolls that key only.
    """
    layout.check_id(client_id, "client id")
    if not access.valid_client_id(client_id):
        raise ValueError(f"invalid client id {client_id!r}")
    if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ValueError(f"token lifetime must be in (0, {MAX_TOKEN_TTL_S}] seconds")
    token = secrets.token_urlsafe(32)
    now = time.time()
    doc: dict[str, Any] = {"client_id": client_id, "created_at": now, "expires_at": now + ttl_s}
    if public_key is not None:
        doc["public_key"] = crypto.b64(public_key)
    store.put_new(
        token_key(access.token_hash(token)),
        json.dumps(doc, sort_keys=True).encode(),
        content_type="application/json",
    )
    log.info("enrollment token issued", extra={"client_id": client_id, "ttl_s": ttl_s})
    return token


class Denied(FedError):
    """A request the gateway refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, reason: str, *, status: int = 403, **fields: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.fields = fields


@dataclass(frozen=True)
class Signer:
    """Turns an allowed request into a presigned URL (boto3 ``generate_presigned_url``)."""

    client: Any  # a boto3 S3 client configured for SigV4 ("s3v4")
    bucket: str

    def url(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        params: dict[str, Any] = {"Bucket": self.bucket}
        headers: dict[str, str] = {}
        if op == "list":
            method, api = "GET", "list_objects_v2"
            params["Prefix"] = req["prefix"]
            for name, param in (
                ("delimiter", "Delimiter"),
                ("start_after", "StartAfter"),
                ("continuation_token", "ContinuationToken"),
            ):
                if req.get(name):
                    params[param] = req[name]
        else:
            params["Key"] = req["key"]
            if op == "get":
                method, api = "GET", "get_object"
            elif op == "head":
                method, api = "HEAD", "head_object"
            else:  # put_new: condition and size are signed headers, so neither can change
                method, api = "PUT", "put_object"
                params["IfNoneMatch"] = "*"
                params["ContentLength"] = int(req["size"])
                headers["If-None-Match"] = "*"
                headers["Content-Length"] = str(int(req["size"]))
        url = self.client.generate_presigned_url(
            api, Params=params, ExpiresIn=URL_EXPIRES_S, HttpMethod=method
        )
        return {"method": method, "url": url, "headers": headers, "expires_in": URL_EXPIRES_S}


class _LRU:
    """A small thread-safe cache of write-once facts (identities, cohort configs)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class Gateway:
    """``enroll`` and ``urls``: the two calls a device makes; torch-free, stateless but caches.

    The caches hold only write-once objects (identities, cohort configs), so a
    cached entry can never go stale; absences are never cached.
    """

    def __init__(
        self,
        store: ObjectStore,
        signer: Signer,
        *,
        clock: Any = time.time,
        checkins_per_minute: int = ServerSettings.checkins_per_minute,
    ) -> None:
        self.store = store
        self.signer = signer
        self.clock = clock
        self.checkins_per_minute = checkins_per_minute
        self._identities = _LRU(4096)
        self._cohorts = _LRU(1024)
        self._schemas = _LRU(64)

    # -- enrollment ----------------------------------------------------------
    def enroll(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id = _str(body, "client_id")
        if not access.valid_client_id(client_id):
            raise Denied("invalid client id", status=400)
        token = _str(body, "token")
        digest = access.token_hash(token)
        if body.get("token_sha256") != digest:
            raise Denied("token_sha256 does not match the token", client_id=client_id)
        try:
            public = crypto.unb64(body.get("public_key"), what="public_key", size=32)
        except IntegrityError as exc:
            raise Denied(str(exc), status=400, client_id=client_id) from None
        self._check_time(body, client_id)
        try:
            crypto.verify(
                public, access.DOMAIN_ENROLL, access.enroll_signed_part(body), where="enroll"
            )
        except IntegrityError:
            raise Denied("bad proof-of-possession signature", client_id=client_id) from None
        ident_key = layout.identity_key(client_id)
        existing = self._stored_identity(client_id)
        if existing is not None:
            if existing == public:
                return {"client_id": client_id, "enrolled": False, "detail": "already enrolled"}
            raise Denied(
                "client id already enrolled with another key", status=409, client_id=client_id
            )
        try:
            rec = json.loads(self.store.get(token_key(digest)).body)
        except NotFoundError:
            raise Denied("unknown enrollment token", client_id=client_id) from None
        if rec.get("client_id") != client_id:
            raise Denied("token was issued for another client id", client_id=client_id)
        if float(rec.get("expires_at", 0)) <= self.clock():
            raise Denied("enrollment token expired", client_id=client_id)
        if rec.get("public_key") not in (None, crypto.b64(public)):
            raise Denied("token was issued for another key", client_id=client_id)
        claim = {"client_id": client_id, "public_key": crypto.b64(public), "used_at": self.clock()}
        try:
            # Consuming the token is a write-once put: of two concurrent uses, one wins.
            self.store.put_new(
                used_key(digest), json.dumps(claim).encode(), content_type="application/json"
            )
        except AlreadyExistsError:
            prior = json.loads(self.store.get(used_key(digest)).body)
            # A retry by the same device after a crash between consume and identity write.
            if (prior.get("client_id"), prior.get("public_key")) != (
                client_id,
                crypto.b64(public),
            ):
                raise Denied("enrollment token already used", client_id=client_id) from None
        try:
            self.store.put_new(
                ident_key,
                encode_identity(client_id, public, self.clock()),
                content_type="application/json",
            )
        except AlreadyExistsError:
            if self._stored_identity(client_id) != public:
                raise Denied(
                    "client id already enrolled with another key", status=409, client_id=client_id
                ) from None
        self._identities.put(client_id, public)
        log.info("device enrolled", extra={"client_id": client_id, "key": ident_key})
        return {"client_id": client_id, "enrolled": True, "identity_key": ident_key}

    # -- presigned URLs ------------------------------------------------------
    def urls(self, body: dict[str, Any]) -> dict[str, Any]:
        client_id = _str(body, "client_id")
        if not access.valid_client_id(client_id):
            raise Denied("invalid client id", status=400)
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not reqs or len(reqs) > MAX_BATCH:
            raise Denied(f"requests must be a list of 1..{MAX_BATCH}", status=400)
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            raise Denied("nonce must be 16-64 of [A-Za-z0-9_-]", status=400, client_id=client_id)
        self._check_time(body, client_id)
        public = self._stored_identity(client_id)
        if public is None:
            raise Denied("client is not enrolled", client_id=client_id)
        try:
            crypto.verify(public, access.DOMAIN_URLS, body, where="urls")
        except IntegrityError:
            raise Denied("bad signature", client_id=client_id) from None
        # Only authenticated requests reach the bucket's write path.
        try:
            self.store.put_new(
                nonce_key(client_id, nonce),
                # The random id makes each marker's bytes unique to the request that wrote it.
                json.dumps({"timestamp": body["timestamp"], "id": os.urandom(8).hex()}).encode(),
                content_type="application/json",
            )
        except AlreadyExistsError:
            raise Denied("replayed nonce", client_id=client_id) from None
        targets = [_target(req) for req in reqs]
        denied = []
        for op, target in targets:
            decision = access.decide(client_id, op, target, cohort=self.cohort)
            if not decision:
                log.warning(
                    "request denied by the access policy",
                    extra={
                        "client_id": client_id,
                        "op": op,
                        "key": target,
                        "reason": decision.reason,
                    },
                )
                denied.append((op, target, decision.reason))
        for req, (op, target) in zip(reqs, targets, strict=True):
            if op == "list" and (why := list_refusal(target, req)):
                denied.append((op, target, why))
            if op == "put_new" and not denied and req["size"] > (cap := self.size_limit(target)):
                reason = f"object of {req['size']} bytes exceeds {cap}"
                log.warning(
                    "request denied by the size limit",
                    extra={"client_id": client_id, "op": op, "key": target, "reason": reason},
                )
                denied.append((op, target, reason))
        if denied:
            op, target, reason = denied[0]
            more = f" (and {len(denied) - 1} more)" if len(denied) > 1 else ""
            raise Denied(
                f"{op} {target}: {reason}{more}",
                client_id=client_id,
                op=op,
                key=target,
                policy=reason,
            )
        checkins = sum(1 for op, target in targets if op == "put_new" and _is_checkin(target))
        if checkins:
            self._claim_checkin_slots(client_id, checkins, nonce)
        out = [
            self.signer.url({**req, "op": op}) for req, (op, _) in zip(reqs, targets, strict=True)
        ]
        log.info(
            "presigned urls issued",
            extra={
                "client_id": client_id,
                "count": len(out),
                "ops": sorted({r["op"] for r in reqs}),
            },
        )
        return {"urls": out}

    # -- limits --------------------------------------------------------------
    def _claim_checkin_slots(self, client_id: str, count: int, nonce: str) -> None:
        """Claim ``count`` of this minute's check-in slots, or refuse with 429.

        One LIST counts the slots taken; each new one is a write-once put, so
        containers racing for the same slot cannot both win (the loser takes the
        next). A request over the limit as listed claims nothing; one that loses
        races on the way keeps the slots it won (they were asked for).
        """
        limit = self.checkins_per_minute
        if limit <= 0:
            return  # no limit configured
        now = self.clock()
        window = int(now // RATE_WINDOW_S)
        slot = sum(1 for _ in self.store.list(checkin_slots_prefix(client_id, window)))
        claimed = 0
        while claimed < count:
            if slot + count - claimed > limit:
                retry_after = RATE_WINDOW_S * (window + 1) - now
                log.warning(
                    "check-in rate limit reached",
                    extra={
                        "client_id": client_id,
                        "limit": limit,
                        "requested": count,
                        "retry_after_s": round(retry_after, 1),
                    },
                )
                raise Denied(
                    f"check-in rate limit: at most {limit} per device per minute",
                    status=429,
                    client_id=client_id,
                    retry_after_s=math.ceil(retry_after),
                )
            try:
                self.store.put_new(
                    checkin_slot_key(client_id, window, slot),
                    json.dumps({"timestamp": now, "nonce": nonce}).encode(),
                    content_type="application/json",
                )
                claimed += 1
            except AlreadyExistsError:
                pass  # another container took this slot: try the next
            slot += 1

    def size_limit(self, key: str) -> int:
        """The largest object a device may create at ``key``: an input is sized from its
        cohort's model schema (what the function accepts), anything else by ``access``."""
        parsed = layout.parse_key(key)
        if parsed.kind not in (Kind.MASKED, Kind.PLAIN) or parsed.cohort_id is None:
            return access.size_limit(key)
        facts = self.cohort(parsed.cohort_id)
        if facts is None or facts.base_version is None:
            return 0  # unreachable: the policy asked for the cohort already
        schema = self._schemas.get(facts.base_version)
        if schema is None:
            try:
                schema = read_schema(self.store, facts.base_version)
            except (NotFoundError, IntegrityError):
                return 0  # the function could not read the model either
            self._schemas.put(facts.base_version, schema)
        return input_cap(schema, Mode(facts.mode))

    # -- lookups -------------------------------------------------------------
    def cohort(self, cid: str) -> CohortFacts | None:
        """A cohort's members, mode and base version from its write-once config (cached)."""
        facts = self._cohorts.get(cid)
        if facts is not None:
            return facts
        key = layout.config_key(cid)
        try:
            cfg = parse_config(self.store.get(key).body, where=key)
        except (NotFoundError, IntegrityError):
            return None
        facts = CohortFacts(frozenset(cfg.members), cfg.mode, cfg.base_version)
        self._cohorts.put(cid, facts)
        return facts

    def _stored_identity(self, client_id: str) -> bytes | None:
        cached = self._identities.get(client_id)
        if cached is not None:
            return cached
        key = layout.identity_key(client_id)
        try:
            public = parse_identity(
                self.store.get(key).body, client_id=client_id, where=key
            ).ed25519
        except NotFoundError:
            return None
        self._identities.put(client_id, public)
        return public

    def _check_time(self, body: dict[str, Any], client_id: str) -> None:
        ts = body.get("timestamp")
        if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
            raise Denied("timestamp must be a number", status=400, client_id=client_id)
        skew = float(ts) - self.clock()
        if abs(skew) > CLOCK_SKEW_S:
            raise Denied(
                f"timestamp is {skew:+.0f}s from the gateway's clock (limit +-{CLOCK_SKEW_S:.0f}s)",
                client_id=client_id,
            )


def _str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Denied(f"{name} must be a non-empty string", status=400)
    return value


def list_refusal(prefix: str, req: dict[str, Any]) -> str | None:
    """Why a list the policy allows is still refused for its shape (None: it is not).

    ``cohorts/`` without the delimiter would list every cohort's objects (members, sizes,
    ETags); with it, the answer holds only the cohort ids that discovery needs.
    """
    if prefix == layout.COHORTS_PREFIX and req.get("delimiter") != "/":
        return "cohorts/ is listed only with delimiter '/'"
    return None


def _is_checkin(key: str) -> bool:
    try:
        return layout.parse_key(key).kind is Kind.CHECKIN
    except UnknownKeyError:
        return False


def _target(req: Any) -> tuple[str, str]:
    if not isinstance(req, dict):
        raise Denied("each request must be an object", status=400)
    op = req.get("op")
    field = "prefix" if op == "list" else "key"
    target = req.get(field)
    if not isinstance(op, str) or not isinstance(target, str):
        raise Denied(f"each request needs op and {field}", status=400)
    for extra in ("delimiter", "start_after", "continuation_token"):
        if extra in req and not isinstance(req[extra], str):
            raise Denied(f"{extra} must be a string", status=400)
    if op == "list" and req.get("delimiter") not in (None, "", "/"):
        raise Denied("delimiter must be '/'", status=400)
    if op == "put_new":
        size = req.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Denied("put_new needs the object's size in bytes", status=400)
    return op, target
