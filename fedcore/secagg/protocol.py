"""Secure-aggregation wire messages and parameters, validated in one place.

Every message a member publishes is signed with its long-term Ed25519 key
(``clients/{id}/identity.json``) under a per-message domain tag, and names
its cohort and sender, so a message replayed into another cohort, another
member's mailbox or another round fails verification.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from fedcore.codec import UpdateMeta, load_json_object
from fedcore.errors import IntegrityError
from fedcore.layout import check_id
from fedcore.secagg import crypto
from fedcore.secagg.graph import COLLUDERS, default_degree, default_threshold, neighbours
from fedcore.secagg.quantize import Quantizer, bits_for

DOMAIN_CHECKIN = "fedcore/v1/checkin"
DOMAIN_KEYS = "fedcore/v1/secagg/keys"
DOMAIN_SHARES = "fedcore/v1/secagg/shares"
DOMAIN_MASKED = "fedcore/v1/secagg/masked"
DOMAIN_UNMASK = "fedcore/v1/secagg/unmask"
DOMAIN_CONSISTENCY = "fedcore/v1/secagg/consistency"
DOMAIN_CERTIFICATE = "fedcore/v1/operator/certificate"
DOMAIN_PLAIN = "fedcore/v1/plain/update"
CERTIFICATE_FORMAT = "fedcore.certificate.v1"
MASKED_FORMAT = "fedcore.masked.v1"
MASKED_TENSOR = "masked"
MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class SecAggParams:
    """Per-cohort parameters, fixed in the write-once config.

    k: neighbour degree (k = n-1: all pairs); t: Shamir threshold over a member's
    k + 1 share holders (its neighbours and itself), a strict majority, so the
    server plus a minority of them learn nothing;
    clip and bits: quantization (bits leave headroom so n values cannot wrap
    mod 2^32); weight_cap: the sample count that maps to weight 1.
    """

    k: int
    t: int
    graph_seed: str
    clip: float
    bits: int
    weight_cap: int

    @classmethod
    def for_cohort(
        cls,
        n: int,
        *,
        clip: float = 1.0,
        weight_cap: int = 100_000,
        k: int | None = None,
        max_dropout: float = 0.1,
        bits: int | None = None,
        colluders: int = COLLUDERS,
    ) -> SecAggParams:
        k = default_degree(n, max_dropout, colluders) if k is None else min(k, n - 1)
        return cls(
            k=k,
            t=max(1, default_threshold(k, colluders)),
            graph_seed=secrets.token_hex(16),
            clip=clip,
            bits=bits_for(n) if bits is None else min(bits, bits_for(n)),
            weight_cap=weight_cap,
        )

    def validate(self, n: int, *, where: str) -> None:
        ok = (
            1 <= self.k <= max(1, n - 1)
            and 1 <= self.t <= self.k + 1
            and self.clip > 0
            and math.isfinite(self.clip)
            and 1 <= self.bits <= bits_for(n)
            and self.weight_cap >= 1
        )
        if not ok:
            raise IntegrityError(f"{where}: invalid secagg parameters {self} for {n} members")

    @classmethod
    def from_dict(cls, doc: Any, *, where: str) -> SecAggParams:
        """Strict: a key the protocol does not know (a server-written neighbour list, say)
        is refused, never silently ignored; the graph is derived from ``graph_seed`` only."""
        if isinstance(doc, dict) and (unknown := sorted(set(doc) - _PARAM_FIELDS)):
            raise IntegrityError(f"{where}: unknown secagg parameters {unknown}")
        try:
            p = cls(
                k=int(doc["k"]),
                t=int(doc["t"]),
                graph_seed=str(doc["graph_seed"]),
                clip=float(doc["clip"]),
                bits=int(doc["bits"]),
                weight_cap=int(doc["weight_cap"]),
            )
            bytes.fromhex(p.graph_seed)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise IntegrityError(f"{where}: bad secagg parameters: {exc!r}") from None
        return p

    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, bits=self.bits)

    def weight(self, samples: int) -> float:
        """A member's FedAvg weight: min(samples, weight_cap) / weight_cap, in [1/cap, 1]."""
        if samples < 1:
            raise ValueError(f"a member declares at least one sample, got {samples}")
        return min(samples, self.weight_cap) / self.weight_cap

    def weight_code(self, samples: int) -> int:
        """The exact code of a member's weight slot for ``samples`` declared samples.

        Deterministic (round to nearest, never the stochastic rounding of the other
        slots), so the function can check the unmasked slot against the sum of the
        counted members' signed declarations exactly; device and function both call
        this one function. The weight is clipped to ``clip`` like any other slot.
        """
        q = self.quantizer()
        w = min(self.weight(samples), self.clip)
        return min(math.floor((w + self.clip) / q.step + 0.5), q.levels)

    def graph(self, members: list[str]) -> dict[str, set[str]]:
        return neighbours(sorted(members), k=self.k, seed=bytes.fromhex(self.graph_seed))


_PARAM_FIELDS = frozenset({"k", "t", "graph_seed", "clip", "bits", "weight_cap"})


def member_index(members: list[str], client: str) -> int:
    """The member's Shamir x-coordinate: its 1-based position among the sorted members."""
    return sorted(members).index(client) + 1


def _load(blob: bytes, where: str) -> dict[str, Any]:
    if len(blob) > MAX_MESSAGE_BYTES:
        raise IntegrityError(f"{where}: message of {len(blob)} bytes is too large")
    return load_json_object(blob, where=where, what="message")


def _check_sender(doc: dict[str, Any], *, cohort_id: str, client_id: str, where: str) -> None:
    if doc.get("cohort_id") != cohort_id or doc.get("client_id") != client_id:
        raise IntegrityError(
            f"{where}: names {doc.get('cohort_id')}/{doc.get('client_id')}, "
            f"expected {cohort_id}/{client_id} (replayed or misplaced)"
        )


def encode_signed(doc: dict[str, Any], *, domain: str, signing_key: bytes) -> bytes:
    body = dict(doc)
    body["signature"] = crypto.sign(signing_key, domain, body)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _verified(
    blob: bytes, *, domain: str, identity: bytes, cohort_id: str, client_id: str, where: str
) -> dict[str, Any]:
    doc = _load(blob, where)
    _check_sender(doc, cohort_id=cohort_id, client_id=client_id, where=where)
    crypto.verify(identity, domain, doc, where=where)
    return doc


# -- identity -----------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    client_id: str
    ed25519: bytes


def encode_identity(client_id: str, public: bytes, created_at: float) -> bytes:
    return json.dumps(
        {"client_id": client_id, "ed25519": crypto.b64(public), "created_at": created_at},
        sort_keys=True,
    ).encode()


def pinned_identity(identities: dict[str, str], client_id: str) -> bytes | None:
    """A member's Ed25519 key as the cohort config pins it (``CohortConfig.identities``)."""
    if client_id not in identities:
        return None
    return crypto.unb64(identities[client_id], what=f"{client_id}'s identity", size=32)


def parse_identity(blob: bytes, *, client_id: str, where: str) -> Identity:
    doc = _load(blob, where)
    if doc.get("client_id") != client_id:
        raise IntegrityError(f"{where}: identity names {doc.get('client_id')!r}")
    return Identity(client_id, crypto.unb64(doc.get("ed25519"), what=f"{where}: ed25519", size=32))


# -- operator certificates ------------------------------------------------------


class CertificateError(IntegrityError):
    """A member's operator certificate is missing, forged, or certifies another key."""


@dataclass(frozen=True)
class Certificate:
    """The operator's word that ``client_id``'s long-term Ed25519 key is ``ed25519``.

    Security: only the operator's signing key (kept outside AWS, ``fedcore.operator``)
    makes one, so nothing the function or the gateway writes can swap a member's
    identity: a device checks each peer's certificate against the operator's public
    key it was given at enrollment, never against a key read from the bucket.
    ``issued_at`` (seconds since the epoch) records when the operator certified it.
    """

    client_id: str
    ed25519: bytes
    issued_at: float


def operator_key_id(operator_public: bytes) -> str:
    """A short name of an operator key (hex of its SHA-256, 16 digits), for logs and checks."""
    return hashlib.sha256(b"fedcore/v1/operator-key\n" + operator_public).hexdigest()[:16]


def encode_certificate(cert: Certificate, operator_sk: bytes) -> bytes:
    """The certificate document, signed by the operator (canonical JSON, one line)."""
    doc = {
        "format": CERTIFICATE_FORMAT,
        "client_id": check_id(cert.client_id, "client id"),
        "ed25519": crypto.b64(cert.ed25519),
        "issued_at": cert.issued_at,
        "operator": operator_key_id(crypto.ed25519_public(operator_sk)),
    }
    return encode_signed(doc, domain=DOMAIN_CERTIFICATE, signing_key=operator_sk)


def parse_certificate(
    blob: bytes, *, operator_key: bytes, client_id: str, where: str
) -> Certificate:
    """The certificate if the operator ``operator_key`` signed it for ``client_id``.

    Raises ``CertificateError`` (an ``IntegrityError``) for a wrong format, another
    client id (a certificate moved to another member), a signature by any other key
    (a forgery, or another operator's), or a malformed key.
    """
    try:
        doc = _load(blob, where)
    except IntegrityError as exc:
        raise CertificateError(str(exc)) from None
    if doc.get("format") != CERTIFICATE_FORMAT:
        raise CertificateError(
            f"{where}: format {doc.get('format')!r}, expected {CERTIFICATE_FORMAT!r}"
        )
    if doc.get("client_id") != client_id:
        raise CertificateError(f"{where}: certifies {doc.get('client_id')!r}, not {client_id!r}")
    if doc.get("operator") != operator_key_id(operator_key):
        raise CertificateError(f"{where}: signed by operator {doc.get('operator')!r}, not ours")
    try:
        crypto.verify(operator_key, DOMAIN_CERTIFICATE, doc, where=where)
        public = crypto.unb64(doc.get("ed25519"), what=f"{where}: ed25519", size=32)
        issued_at = doc.get("issued_at")
        if not isinstance(issued_at, int | float) or isinstance(issued_at, bool):
            raise IntegrityError(f"{where}: issued_at must be a number")
    except IntegrityError as exc:
        raise CertificateError(str(exc)) from None
    return Certificate(client_id, public, float(issued_at))


# -- round 1: AdvertiseKeys -----------------------------------------------------


@dataclass(frozen=True)
class KeysMsg:
    cohort_id: str
    client_id: str
    c_pk: bytes  # X25519 public key for share encryption
    s_pk: bytes  # X25519 public key for mask agreement


def encode_keys(msg: KeysMsg, signing_key: bytes) -> bytes:
    doc = {
        "cohort_id": msg.cohort_id,
        "client_id": msg.client_id,
        "c_pk": crypto.b64(msg.c_pk),
        "s_pk": crypto.b64(msg.s_pk),
    }
    return encode_signed(doc, domain=DOMAIN_KEYS, signing_key=signing_key)


def parse_keys(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> KeysMsg:
    doc = _verified(
        blob,
        domain=DOMAIN_KEYS,
        identity=identity,
        cohort_id=cohort_id,
        client_id=client_id,
        where=where,
    )
    c_pk = crypto.unb64(doc.get("c_pk"), what=f"{where}: c_pk", size=32)
    s_pk = crypto.unb64(doc.get("s_pk"), what=f"{where}: s_pk", size=32)
    if c_pk == s_pk:
        raise IntegrityError(f"{where}: the two advertised keys must differ")
    return KeysMsg(cohort_id, client_id, c_pk, s_pk)


# -- round 2: ShareKeys ---------------------------------------------------------


@dataclass(frozen=True)
class SharesMsg:
    cohort_id: str
    client_id: str
    self_commit: str  # sha256 hex of the self-mask seed: lets the server check its reconstruction
    ciphertexts: dict[str, bytes]  # receiver -> AES-GCM(share of s_sk || share of b)


def encode_shares(msg: SharesMsg, signing_key: bytes) -> bytes:
    doc = {
        "cohort_id": msg.cohort_id,
        "client_id": msg.client_id,
        "self_commit": msg.self_commit,
        "ciphertexts": {k: crypto.b64(v) for k, v in sorted(msg.ciphertexts.items())},
    }
    return encode_signed(doc, domain=DOMAIN_SHARES, signing_key=signing_key)


def parse_shares(
    blob: bytes,
    *,
    identity: bytes | None,
    cohort_id: str,
    client_id: str,
    where: str,
    receiver: str | None = None,
) -> SharesMsg:
    """The verified message; with ``receiver``, only that member's ciphertext is decoded.

    A device needs one ciphertext from each neighbour's message; decoding the
    other k - 1 was a third of its unmask time at k = 32. A receiver may also
    pass ``identity=None`` to skip the signature: its ciphertext is AES-GCM
    under a key only it and the sender can derive (from the sender's signed
    round-1 key), with cohort, sender and receiver bound in, so decrypting it
    authenticates it. The function, which reads every ciphertext, always checks.
    """
    if identity is None and receiver is None:
        raise ValueError("only a receiver may rely on the AEAD instead of the signature")
    if identity is None:
        doc = _load(blob, where)
        _check_sender(doc, cohort_id=cohort_id, client_id=client_id, where=where)
    else:
        doc = _verified(
            blob,
            domain=DOMAIN_SHARES,
            identity=identity,
            cohort_id=cohort_id,
            client_id=client_id,
            where=where,
        )
    commit = doc.get("self_commit")
    if not (isinstance(commit, str) and len(commit) == 64):
        raise IntegrityError(f"{where}: self_commit must be a sha256 hex digest")
    cts = doc.get("ciphertexts")
    if not isinstance(cts, dict):
        raise IntegrityError(f"{where}: ciphertexts must be an object")
    out = {}
    for to, ct in cts.items():
        if receiver is not None and to != receiver:
            continue
        try:
            check_id(to, "receiver")
        except ValueError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        raw = crypto.unb64(ct, what=f"{where}: ciphertext for {to}")
        if len(raw) != SHARE_PLAINTEXT_BYTES + 28:
            raise IntegrityError(f"{where}: ciphertext for {to} has {len(raw)} bytes")
        out[to] = raw
    return SharesMsg(cohort_id, client_id, commit, out)


SHARE_BYTES = 66
SHARE_PLAINTEXT_BYTES = 2 * SHARE_BYTES


def commit_seed(seed: bytes) -> str:
    return hashlib.sha256(b"fedcore/v1/secagg/self-seed\n" + seed).hexdigest()


# -- round 3: MaskedInput (metadata of the safetensors upload) ------------------


@dataclass(frozen=True)
class MaskedMeta:
    cohort_id: str
    client_id: str
    base_version: int
    length: int
    digest: str  # sha256 hex of the uint32 tensor's bytes
    # Seconds the member's local training took (sizes later cohorts' inputs deadlines,
    # ``fedcore.server.deadlines``). Optional and left out of the signed document when
    # None, so an upload without it is byte-for-byte what it was before the field. It
    # tells the server little that the upload's arrival time does not already show.
    train_s: float | None = None
    # The member's declared sample count (>= 1), public and signed before masking; its
    # weight slot must hold ``SecAggParams.weight_code(samples)``, which the function
    # checks on the unmasked sum. None (omitted from the document, like ``train_s``):
    # user-level DP cohorts, where every member's weight is 1 and a count would only leak.
    samples: int | None = None


_OPTIONAL_META = frozenset({"train_s", "samples"})  # left out of the document when None


def masked_metadata(meta: MaskedMeta, signing_key: bytes) -> dict[str, str]:
    doc = {k: v for k, v in asdict(meta).items() if not (k in _OPTIONAL_META and v is None)}
    doc["signature"] = crypto.sign(signing_key, DOMAIN_MASKED, doc)
    return {"format": MASKED_FORMAT, "fedcore": json.dumps(doc, sort_keys=True)}


def parse_masked_metadata(
    meta: dict[str, str], *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> MaskedMeta:
    if meta.get("format") != MASKED_FORMAT:
        raise IntegrityError(f"{where}: format {meta.get('format')!r}, expected {MASKED_FORMAT!r}")
    doc = _verified(
        meta.get("fedcore", "").encode(), domain=DOMAIN_MASKED, identity=identity,
        cohort_id=cohort_id, client_id=client_id, where=where,
    )  # fmt: skip
    try:
        return MaskedMeta(
            cohort_id=doc["cohort_id"],
            client_id=doc["client_id"],
            base_version=int(doc["base_version"]),
            length=int(doc["length"]),
            digest=str(doc["digest"]),
            train_s=_train_s(doc.get("train_s"), where),
            samples=_declared_samples(doc.get("samples"), where),
        )
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise IntegrityError(f"{where}: masked metadata invalid: {exc!r}") from None


def _train_s(value: Any, where: str) -> float | None:
    """The optional signed ``train_s``: absent, or seconds in [0, 1e6] (as ``UpdateMeta``)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1e6:
        raise IntegrityError(f"{where}: train_s must be a number of seconds in [0, 1e6]")
    return float(value)


# -- plaintext uploads (explicit plaintext mode): the same signed digest ---------------


def update_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """sha256 hex of a plaintext update's tensors, as float32, the one definition both
    the device (before it signs) and the function (before it counts) compute.

    Names, shapes and bytes are framed in sorted-name order, so two same-shaped tensors
    whose data offsets were swapped in the header digest differently, though the data
    buffer is byte-for-byte the same.
    """
    h = hashlib.sha256(b"fedcore/v1/plain/tensors\n")
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(json.dumps([name, "F32", list(a.shape)]).encode() + b"\n")
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def sign_update(
    meta: UpdateMeta, tensors: Mapping[str, np.ndarray], signing_key: bytes
) -> UpdateMeta:
    """``meta`` with the tensors' digest and the member's Ed25519 signature over every
    metadata field (digest included) under ``DOMAIN_PLAIN``, as a masked upload is signed."""
    signed = replace(meta, digest=update_digest(tensors), signature=None)
    return replace(signed, signature=crypto.sign(signing_key, DOMAIN_PLAIN, signed.document()))


def verify_update(
    meta: UpdateMeta, tensors: Mapping[str, np.ndarray], *, identity: bytes, where: str
) -> None:
    """Raise ``IntegrityError`` unless the member ``identity`` (its pinned Ed25519 key)
    signed these metadata fields and exactly these tensors.

    Security: without it a flipped bit, or a rewrite by anyone who can put the object,
    is averaged in (within the clip). Call it after the metadata's cohort, client and base
    version were checked against the slot, so a replay reads as one.
    """
    if meta.signature is None or meta.digest is None:
        raise IntegrityError(f"{where}: unsigned plaintext update (no digest or signature)")
    crypto.verify(identity, DOMAIN_PLAIN, meta.document(), where=where)
    if update_digest(tensors) != meta.digest:
        raise IntegrityError(f"{where}: data does not match its signed digest (tampered)")


# -- round 3b: ConsistencyCheck (Bonawitz et al. 2017, section 4, malicious model) ----


@dataclass(frozen=True)
class ConsistencyMsg:
    """A survivor's signature over the input set it was shown (U3: cohort id, sorted ids).

    Manifests are the server's word: a server that shows some of a victim's share holders
    a U3 with the victim and others one without it collects both kinds of the victim's
    shares. A member reveals only after ``t`` members of U3 signed the identical set, and
    its reveal names that set (``UnmaskMsg.inputs``).
    """

    cohort_id: str
    client_id: str
    inputs: tuple[str, ...]  # U3, sorted


def encode_consistency(msg: ConsistencyMsg, signing_key: bytes) -> bytes:
    doc = {"cohort_id": msg.cohort_id, "client_id": msg.client_id, "inputs": sorted(msg.inputs)}
    return encode_signed(doc, domain=DOMAIN_CONSISTENCY, signing_key=signing_key)


def _member_set(value: Any, where: str, what: str) -> tuple[str, ...]:
    """A sorted, duplicate-free list of member ids (as signed), else ``IntegrityError``."""
    if not isinstance(value, list) or len(value) > 100_000:
        raise IntegrityError(f"{where}: {what} must be a list of member ids")
    try:
        ids = [check_id(v, "member") for v in value]
    except ValueError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    if ids != sorted(set(ids)):
        raise IntegrityError(f"{where}: {what} must be sorted and without duplicates")
    return tuple(ids)


def parse_consistency(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> ConsistencyMsg:
    """A member's verified signature over an input set that includes the member itself."""
    doc = _verified(
        blob, domain=DOMAIN_CONSISTENCY, identity=identity, cohort_id=cohort_id,
        client_id=client_id, where=where,
    )  # fmt: skip
    if set(doc) != {"cohort_id", "client_id", "inputs", "signature"}:
        raise IntegrityError(f"{where}: unexpected fields {sorted(doc)}")
    inputs = _member_set(doc["inputs"], where, "inputs")
    if client_id not in inputs:
        raise IntegrityError(f"{where}: {client_id} signs an input set that leaves it out")
    return ConsistencyMsg(cohort_id, client_id, inputs)


def _declared_samples(value: Any, where: str) -> int | None:
    """A declared sample count: absent, or an integer of at least one (never a float or bool)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise IntegrityError(f"{where}: declared samples {value!r} is not an integer >= 1")
    return value


# -- round 4: Unmask ------------------------------------------------------------


@dataclass(frozen=True)
class UnmaskMsg:
    cohort_id: str
    client_id: str
    self_shares: dict[str, int]  # survivor v -> this member's share of b_v
    key_shares: dict[str, int]  # dropped v -> this member's share of s_sk_v
    inputs: tuple[str, ...] = ()  # the input set (U3, sorted) this reveal was made for


def encode_unmask(msg: UnmaskMsg, signing_key: bytes) -> bytes:
    from fedcore.secagg.shamir import share_to_bytes

    doc = {
        "cohort_id": msg.cohort_id,
        "client_id": msg.client_id,
        "self_shares": {
            k: crypto.b64(share_to_bytes(v)) for k, v in sorted(msg.self_shares.items())
        },
        "key_shares": {k: crypto.b64(share_to_bytes(v)) for k, v in sorted(msg.key_shares.items())},
        "inputs": sorted(msg.inputs),
    }
    return encode_signed(doc, domain=DOMAIN_UNMASK, signing_key=signing_key)


def parse_unmask(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> UnmaskMsg:
    from fedcore.secagg.shamir import InconsistentSharesError, share_from_bytes

    doc = _verified(
        blob,
        domain=DOMAIN_UNMASK,
        identity=identity,
        cohort_id=cohort_id,
        client_id=client_id,
        where=where,
    )
    out: dict[str, dict[str, int]] = {}
    for field in ("self_shares", "key_shares"):
        raw = doc.get(field)
        if not isinstance(raw, dict):
            raise IntegrityError(f"{where}: {field} must be an object")
        try:
            out[field] = {
                str(k): share_from_bytes(
                    crypto.unb64(v, what=f"{where}: {field}[{k}]", size=SHARE_BYTES)
                )
                for k, v in raw.items()
            }
        except InconsistentSharesError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
    both = set(out["self_shares"]) & set(out["key_shares"])
    if both:
        raise IntegrityError(f"{where}: reveals both kinds of share for {sorted(both)}")
    if "inputs" not in doc:
        raise IntegrityError(f"{where}: missing field 'inputs' (the input set it reveals for)")
    inputs = _member_set(doc["inputs"], where, "inputs")
    return UnmaskMsg(cohort_id, client_id, out["self_shares"], out["key_shares"], inputs)
