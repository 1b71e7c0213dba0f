"""Who may touch which object: the device access policy, as one pure function.

Devices hold no AWS credentials. They ask the gateway (``fedcore.gateway``)
for presigned URLs, and the gateway signs one only if ``decide`` allows it.
The rules follow the bucket layout (``fedcore.layout``) and what the device
code actually does (``participant.py``, ``device/secure.py``, ``status.py``,
``versions.py``), and deny everything else:

- create (write-once, ``put_new``): the device's own check-ins, and its own
  key / share / input / consistency / reveal message in a cohort whose config
  names it as a member (the input kind must match the cohort's mode: ``masked``
  for secagg, ``plain`` for plaintext; consistency signatures in secagg only). Never identities (the gateway writes
  those at enrollment), configs, manifests, sums, models or the pointer.
- read (``get``/``head``): model versions and the pointer, identities
  (public keys) and their operator certificates, the config, phase manifests
  and result of a cohort the reader belongs to, the key, share and consistency
  messages of members of such a cohort (its own included; share ciphertexts
  are AES-GCM-encrypted per receiver; a consistency message is a signature
  over a public member list), and its own check-ins. A config whose cohort the
  gateway does not know yet may be asked for too: S3 answers 404 (discovery polls for configs
  being written), so a device learns the members of no cohort but its own. Never a masked/plain input or a reveal, not even its own (no
  device code reads one back, so the gateway's IAM role can go without
  read access to them: template.yaml, tests/infra/test_iam.py), the masked
  sums, or anything outside the layout (enrollment records, nonce markers).
- list: ``cohorts/`` (cohort discovery; the gateway signs it only with
  delimiter ``/``, so the answer holds cohort ids, not their objects) and
  ``cohorts/{id}/`` of a cohort the device belongs to.

There is no op for overwrite or delete at all: the gateway cannot sign one.
Membership is a fact about the bucket, so it comes in through ``cohort``
(a lookup the gateway backs with a cache of write-once configs) and the
function itself stays pure and property-testable.

The second half of this module is the wire format both ends of the gateway
use: the signed request documents and their domains.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedcore import layout
from fedcore.errors import UnknownKeyError
from fedcore.layout import Kind
from fedcore.secagg import crypto

OPS = ("get", "head", "put_new", "list")
# Every key and id of the layout is drawn from this alphabet. Checked with fullmatch first,
# because the layout's patterns end in "$", which also matches before a trailing newline.
_SAFE = re.compile(r"[A-Za-z0-9_./-]+")
_ID_FULL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
READ_OPS = ("get", "head")


@dataclass(frozen=True)
class CohortFacts:
    """What the policy needs to know about a cohort: who is in it and its mode."""

    members: frozenset[str]
    mode: str
    base_version: int | None = None  # sizes the input upload URLs (gateway)


CohortLookup = Callable[[str], CohortFacts | None]


def valid_client_id(value: object) -> bool:
    """A layout id, matched in full (``layout.check_id``'s ``$`` also accepts a final newline)."""
    return isinstance(value, str) and _ID_FULL.fullmatch(value) is not None


def no_cohorts(_cid: str) -> CohortFacts | None:
    """A lookup that knows no cohort: every membership-dependent request is denied."""
    return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


def _deny(reason: str) -> Decision:
    return Decision(False, reason)


_OK = Decision(True, "allowed")

# Member kinds a member may create, and whether peers may read them.
_INPUT_FOR_MODE = {"secagg": Kind.MASKED, "plaintext": Kind.PLAIN}
_PEER_READABLE = (Kind.KEYS, Kind.SHARES, Kind.CONSISTENCY)
_OWN_CREATABLE = (
    Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.CONSISTENCY, Kind.UNMASK,
)  # fmt: skip


def decide(
    client_id: str,
    op: str,
    target: str,
    *,
    cohort: CohortLookup = no_cohorts,
) -> Decision:
    """May ``client_id`` do ``op`` on ``target`` (a key, or for ``list`` a prefix)?"""
    if not valid_client_id(client_id):
        return _deny("invalid client id")
    if not isinstance(target, str) or not _SAFE.fullmatch(target):
        return _deny("key has characters outside the layout's alphabet")
    if op not in OPS:
        return _deny(f"unknown op {op!r}")
    if op == "list":
        return _decide_list(client_id, target, cohort)
    try:
        parsed = layout.parse_key(target)
    except UnknownKeyError:
        return _deny("key is not in the bucket layout")
    kind = parsed.kind
    if op in READ_OPS:
        return _decide_read(client_id, parsed, cohort)
    # put_new
    if kind is Kind.CHECKIN:
        return _OK if parsed.client_id == client_id else _deny("another client's check-in slot")
    if kind in _OWN_CREATABLE:
        if parsed.client_id != client_id:
            return _deny("another client's slot")
        facts = _membership(client_id, parsed, cohort)
        if isinstance(facts, Decision):
            return facts
        if kind in (Kind.MASKED, Kind.PLAIN) and kind is not _INPUT_FOR_MODE.get(facts.mode):
            return _deny(f"a {facts.mode} cohort takes no {kind.value} input")
        if kind is Kind.CONSISTENCY and facts.mode != "secagg":
            return _deny(f"a {facts.mode} cohort takes no consistency signatures")
        return _OK
    return _deny(f"devices may not create {kind.value} objects")


def _membership(
    client_id: str, parsed: layout.ParsedKey, cohort: CohortLookup
) -> CohortFacts | Decision:
    """The key's cohort if ``client_id`` is a member of it, else the refusal."""
    assert parsed.cohort_id is not None
    facts = cohort(parsed.cohort_id)
    if facts is None:
        return _deny("no such cohort")
    if client_id not in facts.members:
        return _deny("not a member of the cohort")
    return facts


def _decide_read(client_id: str, parsed: layout.ParsedKey, cohort: CohortLookup) -> Decision:
    kind = parsed.kind
    if kind in (Kind.LATEST, Kind.MODEL, Kind.IDENTITY, Kind.CERTIFICATE):
        return _OK
    if kind is Kind.CONFIG and parsed.cohort_id is not None and cohort(parsed.cohort_id) is None:
        return _OK  # not (yet) a cohort: S3 answers 404, and nothing is revealed
    if kind in (Kind.CONFIG, Kind.STATE):
        # Members, nonces and what each member did are for the cohort's own members.
        facts = _membership(client_id, parsed, cohort)
        return facts if isinstance(facts, Decision) else _OK
    if kind is Kind.SUM:
        return _deny("masked sums are for the aggregation function only")
    if kind is Kind.OPTIMIZER:
        # Devices train from model.safetensors alone; the server optimizer's moments are
        # the function's working state, not part of what a version publishes to them.
        return _deny("server optimizer state is for the aggregation function only")
    if kind is Kind.CHECKIN:
        return _OK if parsed.client_id == client_id else _deny("another client's check-in")
    if kind not in _PEER_READABLE:
        # Inputs and reveals are for the aggregation function only, the sender's own too.
        return _deny(f"{kind.value} messages are for the aggregation function only")
    if parsed.client_id == client_id:
        return _OK  # its own key or share message
    facts = _membership(client_id, parsed, cohort)
    if isinstance(facts, Decision):
        return facts
    if parsed.client_id not in facts.members:
        return _deny("the sender is not a member of the cohort")
    return _OK


def _decide_list(client_id: str, prefix: str, cohort: CohortLookup) -> Decision:
    if prefix == layout.COHORTS_PREFIX:
        return _OK
    rest = prefix[len(layout.COHORTS_PREFIX) :] if prefix.startswith(layout.COHORTS_PREFIX) else ""
    if rest.endswith("/") and rest.count("/") == 1:
        try:
            layout.cohort_seq(rest[:-1])
        except ValueError:
            return _deny("not a cohort prefix")
        # A cohort's listing names its members and their objects' sizes and ETags.
        facts = cohort(rest[:-1])
        if facts is None:
            return _deny("no such cohort")
        if client_id not in facts.members:
            return _deny("not a member of the cohort")
        return _OK
    return _deny("devices may list only cohorts/ and cohorts/{id}/")


def size_limit(key: str) -> int:
    """The largest object a device may create at ``key``: what the function would accept.

    The gateway signs the declared ``Content-Length`` into every write URL, so this
    also bounds what a device can store in its own slots. For inputs this is only the
    ceiling: the gateway narrows it to what the cohort's model schema gives
    (``Gateway.size_limit``), the cap the function applies.
    """
    from fedcore.codec import MAX_OBJECT_BYTES
    from fedcore.messages import MAX_MESSAGE_BYTES

    kind = layout.parse_key(key).kind
    return MAX_OBJECT_BYTES if kind in (Kind.MASKED, Kind.PLAIN) else MAX_MESSAGE_BYTES


def allowed(client_id: str, op: str, key: str, *, cohort: CohortLookup = no_cohorts) -> bool:
    """``decide`` as a bool (the policy's one-line form)."""
    return decide(client_id, op, key, cohort=cohort).allowed


# -- wire format of the gateway ------------------------------------------------

DOMAIN_ENROLL = "fedcore/v1/gateway/enroll"
DOMAIN_URLS = "fedcore/v1/gateway/urls"
CLOCK_SKEW_S = 300.0  # requests outside now +- this are refused (and nonces kept this long)
URL_EXPIRES_S = 300  # lifetime of every presigned URL
MAX_BATCH = 64  # URL requests per call


def token_hash(token: str) -> str:
    """What the bucket stores instead of an enrollment token (hex SHA-256)."""
    return hashlib.sha256(token.encode()).hexdigest()


def enroll_request(
    client_id: str, signing_key: bytes, token: str, *, now: float | None = None
) -> dict[str, Any]:
    """The body of ``POST /enroll``: the token and a proof that the device holds the key.

    The signature covers the token's hash, so a captured request cannot be
    replayed with another token, nor the token paired with another key.
    """
    doc: dict[str, Any] = {
        "client_id": client_id,
        "public_key": crypto.b64(crypto.ed25519_public(signing_key)),
        "token_sha256": token_hash(token),
        "timestamp": time.time() if now is None else now,
    }
    doc["signature"] = crypto.sign(signing_key, DOMAIN_ENROLL, doc)
    return {**doc, "token": token}


def enroll_signed_part(body: dict[str, Any]) -> dict[str, Any]:
    """The fields of an enroll body that its signature covers."""
    return {k: body.get(k) for k in ("client_id", "public_key", "token_sha256", "timestamp")} | {
        "signature": body.get("signature")
    }


def urls_request(
    client_id: str,
    signing_key: bytes,
    requests: list[dict[str, Any]],
    *,
    nonce: str,
    now: float | None = None,
) -> dict[str, Any]:
    """The body of ``POST /urls``: a signed batch of ``{op, key}`` / ``{op: list, prefix}``."""
    doc: dict[str, Any] = {
        "client_id": client_id,
        "timestamp": time.time() if now is None else now,
        "nonce": nonce,
        "requests": requests,
    }
    doc["signature"] = crypto.sign(signing_key, DOMAIN_URLS, doc)
    return doc
