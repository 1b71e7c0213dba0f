"""JSON protocol messages, parsed and validated in one place.

Every JSON object in the bucket that the protocol reads goes through
``parse_*`` here: size-bounded, strictly typed, with an ``IntegrityError``
naming the object on anything unexpected.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from fedcore.codec import load_json_object
from fedcore.dp.distributed import DistributedDP
from fedcore.errors import IntegrityError
from fedcore.layout import Phase, check_id, cohort_seq
from fedcore.secagg.protocol import SecAggParams

MAX_MESSAGE_BYTES = 1 << 20
MAX_INT = 2**53  # JSON integers beyond a double's exact range are refused (and never a count)


class Mode(StrEnum):
    """How a cohort aggregates. Plaintext is an explicit debugging/measurement mode,
    never a fallback: a device or function configured for one refuses the other."""

    SECAGG = "secagg"
    PLAINTEXT = "plaintext"


MODES = tuple(m.value for m in Mode)

T = TypeVar("T")


def _load(blob: bytes, where: str) -> dict[str, Any]:
    if len(blob) > MAX_MESSAGE_BYTES:
        raise IntegrityError(f"{where}: message of {len(blob)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return load_json_object(blob, where=where, what="message")


def _req(doc: dict[str, Any], name: str, typ: type | tuple[type, ...], where: str) -> Any:
    if name not in doc:
        raise IntegrityError(f"{where}: missing field {name!r}")
    value = doc[name]
    if isinstance(value, bool) and typ in (int, float, (int, float)):
        raise IntegrityError(f"{where}: field {name!r} must be {typ}, got bool")
    if not isinstance(value, typ):
        raise IntegrityError(f"{where}: field {name!r} must be {typ}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise IntegrityError(f"{where}: field {name!r} is not finite")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise IntegrityError(f"{where}: field {name!r} is out of range ({value.bit_length()} bits)")
    return value


def dumps(msg: Any) -> bytes:
    return json.dumps(asdict(msg), sort_keys=True, separators=(",", ":")).encode()


def _ids(value: Any, where: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise IntegrityError(f"{where}: {what} must be a list")
    try:
        return [check_id(v, what) for v in value]
    except ValueError as exc:
        raise IntegrityError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class CheckIn:
    """ "I want to join a cohort": written by a device under ``checkins/{client}/{nonce}.json``."""

    client_id: str
    nonce: str
    created_at: float
    mode: str = "secagg"
    last_version: int = -1
    signature: str = ""  # Ed25519 over the rest (required in secagg mode)


def parse_checkin(blob: bytes, *, where: str) -> CheckIn:
    doc = _load(blob, where)
    try:
        msg = CheckIn(
            client_id=check_id(_req(doc, "client_id", str, where), "client id"),
            nonce=check_id(_req(doc, "nonce", str, where), "nonce"),
            created_at=float(_req(doc, "created_at", (int, float), where)),
            mode=_req(doc, "mode", str, where),
            last_version=_req(doc, "last_version", int, where),
            signature=str(doc.get("signature", "")),
        )
    except ValueError as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    if msg.mode not in MODES:
        raise IntegrityError(f"{where}: unknown mode {msg.mode!r}")
    return msg


@dataclass(frozen=True)
class CohortConfig:
    """Write-once description of a cohort: who is in it and what it trains from.

    ``members`` maps client id -> the nonce of the check-in it was formed from,
    so that a check-in is "taken" exactly when some open cohort names it.
    ``phase_s`` maps a phase name to its time limit in seconds, counted from
    the close of the previous phase (or from ``created_at`` for the first):
    the sweeper then closes the phase with whoever has written.

    Typed once, at the boundary (``parse_config``): ``secagg`` is present exactly
    when ``mode`` is ``Mode.SECAGG`` (and validated for the member count), ``dp``
    only with it. On the wire both sit under ``params`` (``to_doc``), so the
    objects in the bucket keep their shape.
    """

    cohort_id: str
    base_version: int
    members: dict[str, str]
    mode: Mode
    min_members: int
    created_at: float
    phase_s: dict[str, float]
    server_lr: float = 1.0
    secagg: SecAggParams | None = None
    dp: DistributedDP | None = None  # user-level distributed DP (secagg only)
    staleness_weight: str | None = None  # the FedBuff rule; None: the server's setting
    # Each member's enrolled Ed25519 public key (b64), pinned at formation (both modes),
    # so that neither the function nor the devices fetch identities per message.
    identities: dict[str, str] = field(default_factory=dict)

    def to_doc(self) -> dict[str, Any]:
        """The JSON object written to ``config.json`` (``parse_config``'s inverse)."""
        params: dict[str, Any] = {}
        if self.staleness_weight is not None:
            params["staleness_weight"] = self.staleness_weight
        if self.secagg is not None:
            params["secagg"] = asdict(self.secagg)
        if self.dp is not None:
            params["dp"] = self.dp.to_dict()
        return {
            "cohort_id": self.cohort_id,
            "base_version": self.base_version,
            "members": self.members,
            "mode": self.mode.value,
            "min_members": self.min_members,
            "created_at": self.created_at,
            "phase_s": self.phase_s,
            "server_lr": self.server_lr,
            "params": params,
            "identities": self.identities,
        }


def encode_config(cfg: CohortConfig) -> bytes:
    return json.dumps(cfg.to_doc(), sort_keys=True, separators=(",", ":")).encode()


def parse_config(blob: bytes, *, where: str) -> CohortConfig:
    doc = _load(blob, where)
    members = _req(doc, "members", dict, where)
    try:
        cid = _req(doc, "cohort_id", str, where)
        cohort_seq(cid)
        for client, nonce in members.items():
            check_id(client, "client id")
            check_id(nonce, "nonce")
    except (ValueError, TypeError) as exc:
        raise IntegrityError(f"{where}: {exc}") from None
    phase_s = _req(doc, "phase_s", dict, where)
    for phase, t in phase_s.items():
        if phase not in {p.value for p in Phase} or not isinstance(t, (int, float)) or t <= 0:
            raise IntegrityError(f"{where}: bad phase time limit {phase!r}: {t!r}")
    identities = _opt_dict(doc, "identities", where)
    if not all(isinstance(v, str) for v in identities.values()):
        raise IntegrityError(f"{where}: identities must map member ids to base64 strings")
    mode_name = _req(doc, "mode", str, where)
    if mode_name not in MODES:
        raise IntegrityError(f"{where}: unknown mode {mode_name!r}")
    mode = Mode(mode_name)
    params = _opt_dict(doc, "params", where)
    if unknown := sorted(set(params) - {"staleness_weight", "secagg", "dp"}):
        raise IntegrityError(f"{where}: unknown params {unknown}")
    staleness = params.get("staleness_weight")
    if staleness is not None and not isinstance(staleness, str):
        raise IntegrityError(f"{where}: params.staleness_weight must be a string")
    secagg = dp = None
    if mode is Mode.SECAGG:
        secagg = SecAggParams.from_dict(params.get("secagg"), where=where)
        secagg.validate(len(members), where=where)
        if "dp" in params:
            dp = DistributedDP.from_dict(params["dp"], where=where)
    elif "secagg" in params or "dp" in params:
        raise IntegrityError(f"{where}: secagg/dp parameters in a {mode.value} cohort")
    cfg = CohortConfig(
        cohort_id=cid,
        base_version=_req(doc, "base_version", int, where),
        members=dict(members),
        mode=mode,
        min_members=_req(doc, "min_members", int, where),
        created_at=float(_req(doc, "created_at", (int, float), where)),
        phase_s={k: float(v) for k, v in phase_s.items()},
        server_lr=float(_req(doc, "server_lr", (int, float), where)),
        secagg=secagg,
        dp=dp,
        staleness_weight=staleness,
        identities=dict(identities),
    )
    if cfg.base_version < 0:
        raise IntegrityError(f"{where}: negative base_version {cfg.base_version}")
    if not cfg.server_lr > 0:
        raise IntegrityError(f"{where}: server_lr {cfg.server_lr} must be positive")
    if not set(cfg.identities) <= set(cfg.members):
        raise IntegrityError(f"{where}: identities for non-members")
    if not 1 <= cfg.min_members <= max(1, len(cfg.members)):
        raise IntegrityError(
            f"{where}: min_members {cfg.min_members} invalid for {len(cfg.members)}"
        )
    return cfg


@dataclass(frozen=True)
class Manifest:
    """Write-once close of a phase: exactly these members count from here on."""

    cohort_id: str
    phase: str
    members: list[str]
    etags: dict[str, str]
    closed_by: str  # "all-members" or "deadline"
    closed_at: float
    sum_key: str = ""  # secagg input phase: the masked sum of exactly these members
    # secagg key/share phases: the one public value per member that unmasking needs
    # (s_pk, b64; self-mask commitment, hex), copied from the signature-verified
    # message at close, so a finalize reads n messages instead of 3n.
    verified: dict[str, str] = field(default_factory=dict)


def parse_manifest(blob: bytes, *, where: str) -> Manifest:
    doc = _load(blob, where)
    etags = _req(doc, "etags", dict, where)
    phase = _req(doc, "phase", str, where)
    if phase not in {p.value for p in Phase}:
        raise IntegrityError(f"{where}: unknown phase {phase!r}")
    return Manifest(
        cohort_id=_req(doc, "cohort_id", str, where),
        phase=phase,
        members=_ids(_req(doc, "members", list, where), where, "member"),
        etags={str(k): str(v) for k, v in etags.items()},
        closed_by=_req(doc, "closed_by", str, where),
        closed_at=float(_req(doc, "closed_at", (int, float), where)),
        sum_key=str(doc.get("sum_key", "")),
        verified={str(k): str(v) for k, v in _opt_dict(doc, "verified", where).items()},
    )


def _opt_dict(doc: dict[str, Any], name: str, where: str) -> dict[str, Any]:
    value = doc.get(name) or {}
    if not isinstance(value, dict):
        raise IntegrityError(f"{where}: {name} must be an object")
    return value


@dataclass(frozen=True)
class Result:
    """Write-once outcome of a cohort: applied as ``version``, or aborted with ``reason``."""

    cohort_id: str
    status: str  # "applied" | "aborted"
    version: int | None
    reason: str
    included: list[str]
    rejected: dict[str, str]
    finished_at: float
    phase_s: dict[str, float] = field(default_factory=dict)


def parse_result(blob: bytes, *, where: str) -> Result:
    doc = _load(blob, where)
    status = _req(doc, "status", str, where)
    if status not in ("applied", "aborted"):
        raise IntegrityError(f"{where}: unknown status {status!r}")
    version = doc.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise IntegrityError(f"{where}: version must be an integer or null")
    return Result(
        cohort_id=_req(doc, "cohort_id", str, where),
        status=status,
        version=version,
        reason=_req(doc, "reason", str, where),
        included=_ids(_req(doc, "included", list, where), where, "member"),
        rejected={str(k): str(v) for k, v in _req(doc, "rejected", dict, where).items()},
        finished_at=float(_req(doc, "finished_at", (int, float), where)),
        phase_s={
            str(k): _number(v, where, "phase_s")
            for k, v in _opt_dict(doc, "phase_s", where).items()
        },
    )


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IntegrityError(f"{where}: {what} values must be finite numbers, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Pointer:
    """``global/latest.json``: an accelerator for polling, never the source of truth."""

    version: int
    key: str
    sha256: str
    updated_at: float


def parse_pointer(blob: bytes, *, where: str) -> Pointer:
    doc = _load(blob, where)
    if _req(doc, "version", int, where) < 0:
        raise IntegrityError(f"{where}: negative version")
    return Pointer(
        version=_req(doc, "version", int, where),
        key=_req(doc, "key", str, where),
        sha256=_req(doc, "sha256", str, where),
        updated_at=float(_req(doc, "updated_at", (int, float), where)),
    )
