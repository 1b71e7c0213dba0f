"""The bucket layout of DESIGN.md section 3: every object key, in one place.

Both sides build keys here and the aggregation function parses them here, so a
key a device writes and the key the function expects can never drift apart.
Identifiers are restricted to a safe alphabet so that a hostile client id can
never escape its prefix (no ``/``, no ``..``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

LATEST_KEY = "global/latest.json"
GLOBAL_PREFIX = "global/"
CHECKINS_PREFIX = "checkins/"
COHORTS_PREFIX = "cohorts/"
CLIENTS_PREFIX = "clients/"

_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_ID_RE = re.compile(rf"^{_ID}$")
_COHORT_RE = re.compile(r"^c(\d{8})$")


class Phase(StrEnum):
    """Phase manifests a cohort may have, in protocol order.

    Plaintext cohorts skip KEYS, SHARES and UNMASK: the lifecycle is the same,
    the masking rounds are simply absent.
    """

    KEYS = "keys"  # U1: members who advertised keys
    SHARES = "shares"  # U2: members who distributed shares
    INPUTS = "inputs"  # U3: members whose (masked) update is counted
    UNMASK = "unmask"  # U4: members who revealed shares
    RESULT = "result"  # applied (names the version) or aborted


class Kind(StrEnum):
    LATEST = "latest"
    MODEL = "model"
    OPTIMIZER = "optimizer"  # server optimizer state a version names (functions only)
    IDENTITY = "identity"
    CERTIFICATE = "certificate"  # the operator's signature over a client's identity key
    CHECKIN = "checkin"
    CONFIG = "config"
    KEYS = "keys"
    SHARES = "shares"
    MASKED = "masked"
    PLAIN = "plain"
    UNMASK = "unmask"
    CONSISTENCY = "consistency"  # round 3b: a survivor's signature over the input set U3
    STATE = "state"
    SUM = "sum"  # the masked sum of a cohort's inputs (reveals nothing without the unmask round)


@dataclass(frozen=True)
class ParsedKey:
    kind: Kind
    key: str
    version: int | None = None
    client_id: str | None = None
    cohort_id: str | None = None
    nonce: str | None = None
    phase: Phase | None = None


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe identifier, else raise ``ValueError``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9_.-], not starting with . or -"
        )
    return value


def cohort_id(seq: int) -> str:
    if seq < 0 or seq > 99_999_999:
        raise ValueError(f"cohort sequence {seq} out of range")
    return f"c{seq:08d}"


def is_cohort_id(value: str) -> bool:
    return bool(_COHORT_RE.fullmatch(value))


def cohort_seq(cid: str) -> int:
    m = _COHORT_RE.fullmatch(cid)
    if not m:
        raise ValueError(f"invalid cohort id {cid!r}")
    return int(m.group(1))


def model_key(version: int) -> str:
    if version < 0:
        raise ValueError(f"negative version {version}")
    return f"global/v{version:08d}/model.safetensors"


def optimizer_key(version: int, cid: str, digest: str) -> str:
    """Where the server optimizer state after ``version`` lives (write-once).

    Keyed by the applying cohort and a digest of the state's bytes, not by the version
    alone: an apply that loses the race for ``version`` may already have written its
    state, and a winner's write-once put at the same key would then fail. The committed
    model names exactly one such key (and its sha256); any other is an orphan of a lost
    race and is never read.
    """
    if version < 1:
        raise ValueError(f"optimizer state belongs to a version >= 1, got {version}")
    cohort_seq(cid)
    if not re.fullmatch(r"[0-9a-f]{16}", digest):
        raise ValueError("optimizer state digest must be 16 hex digits")
    return f"global/v{version:08d}/optimizer-{cid}-{digest}.safetensors"


def identity_key(client_id: str) -> str:
    return f"{CLIENTS_PREFIX}{check_id(client_id, 'client id')}/identity.json"


def certificate_key(client_id: str) -> str:
    """Where the operator's certificate of ``client_id``'s identity key lives (operator-written)."""
    return f"{CLIENTS_PREFIX}{check_id(client_id, 'client id')}/certificate.json"


def checkin_prefix(client_id: str) -> str:
    return f"{CHECKINS_PREFIX}{check_id(client_id, 'client id')}/"


def checkin_key(client_id: str, nonce: str) -> str:
    return f"{checkin_prefix(client_id)}{check_id(nonce, 'nonce')}.json"


def cohort_prefix(cid: str) -> str:
    cohort_seq(cid)
    return f"{COHORTS_PREFIX}{cid}/"


def config_key(cid: str) -> str:
    return f"{cohort_prefix(cid)}config.json"


def member_prefix(cid: str, kind: Kind) -> str:
    """Folder of one per-member round (keys, shares, masked, plain, consistency, unmask)."""
    if kind not in _MEMBER_KINDS:
        raise ValueError(f"{kind} is not a per-member round")
    return f"{cohort_prefix(cid)}{kind.value}/"


def member_key(cid: str, kind: Kind, client_id: str) -> str:
    return f"{member_prefix(cid, kind)}{check_id(client_id, 'client id')}{_MEMBER_KINDS[kind]}"


def state_key(cid: str, phase: Phase) -> str:
    return f"{cohort_prefix(cid)}state/{phase.value}.json"


def sum_key(cid: str, digest: str) -> str:
    """Where a masked sum lives; ``digest`` names the member set it sums."""
    if not re.fullmatch(r"[0-9a-f]{16}", digest):
        raise ValueError("sum digest must be 16 hex digits")
    return f"{cohort_prefix(cid)}state/sum-{digest}.safetensors"


_MEMBER_KINDS = {
    Kind.KEYS: ".json",
    Kind.SHARES: ".json",
    Kind.MASKED: ".safetensors",
    Kind.PLAIN: ".safetensors",
    Kind.UNMASK: ".json",
    Kind.CONSISTENCY: ".json",
}

_PATTERNS: list[tuple[re.Pattern[str], Kind]] = [
    (re.compile(r"^global/latest\.json$"), Kind.LATEST),
    (re.compile(r"^global/v(?P<version>\d{8})/model\.safetensors$"), Kind.MODEL),
    (
        re.compile(
            r"^global/v(?P<version>\d{8})/optimizer-(?P<cohort>c\d{8})-[0-9a-f]{16}\.safetensors$"
        ),
        Kind.OPTIMIZER,
    ),
    (re.compile(rf"^clients/(?P<client>{_ID})/identity\.json$"), Kind.IDENTITY),
    (re.compile(rf"^clients/(?P<client>{_ID})/certificate\.json$"), Kind.CERTIFICATE),
    (re.compile(rf"^checkins/(?P<client>{_ID})/(?P<nonce>{_ID})\.json$"), Kind.CHECKIN),
    (re.compile(r"^cohorts/(?P<cohort>c\d{8})/config\.json$"), Kind.CONFIG),
    (
        re.compile(r"^cohorts/(?P<cohort>c\d{8})/state/(?P<phase>[a-z]+)\.json$"),
        Kind.STATE,
    ),
    (re.compile(r"^cohorts/(?P<cohort>c\d{8})/state/sum-[0-9a-f]{16}\.safetensors$"), Kind.SUM),
] + [
    (
        re.compile(
            rf"^cohorts/(?P<cohort>c\d{{8}})/{kind.value}/(?P<client>{_ID}){re.escape(suffix)}$"
        ),
        kind,
    )
    for kind, suffix in _MEMBER_KINDS.items()
]


def parse_key(key: str) -> ParsedKey:
    """Classify a key of the layout, or raise ``UnknownKeyError``.

    The aggregation function routes every event through this, so anything not
    in the layout (including path tricks) is refused before any I/O.
    """
    from fedcore.errors import UnknownKeyError

    for pattern, kind in _PATTERNS:
        m = pattern.fullmatch(key)
        if not m:
            continue
        groups = m.groupdict()
        phase = None
        if "phase" in groups:
            try:
                phase = Phase(groups["phase"])
            except ValueError:
                raise UnknownKeyError(f"{key}: unknown phase {groups['phase']!r}") from None
        client = groups.get("client")
        return ParsedKey(
            kind=kind,
            key=key,
            version=int(groups["version"]) if "version" in groups else None,
            client_id=client,
            cohort_id=groups.get("cohort"),
            nonce=groups.get("nonce"),
            phase=phase,
        )
    raise UnknownKeyError(f"{key}: not a key of the bucket layout")
