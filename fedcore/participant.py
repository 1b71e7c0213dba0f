"""The device's side of the cohort protocol, without any training (torch-free).

``edge_client`` wraps this with PyTorch; tests and the many-devices simulation
drive it directly with synthetic updates. Everything a device does is a read,
or a write-once put of its own objects, so a device that restarts simply
re-reads where it stands.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from fedcore import layout
from fedcore.codec import UpdateMeta, encode_update
from fedcore.errors import (
    AccessDeniedError,
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    NotModifiedError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import (
    MODES,
    CheckIn,
    CohortConfig,
    Manifest,
    Mode,
    Pointer,
    Result,
    dumps,
    parse_config,
    parse_manifest,
    parse_pointer,
    parse_result,
)
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_CHECKIN,
    encode_identity,
    parse_identity,
    sign_update,
)
from fedcore.storage import ObjectStore
from fedcore.versions import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ticket:
    """A pending check-in, and where to start looking for the cohort that takes it."""

    nonce: str
    key: str
    cursor: str | None
    created_at: float


class Participant:
    """One device's view of the bucket.

    ``signing_key`` is the device's long-term Ed25519 private key (raw 32
    bytes); it signs everything the device publishes, plaintext updates
    included (a device without one can only read: results, the model).
    ``mode`` must match the server's: a device never falls back from secure
    aggregation to plaintext. ``operator_key`` is the operator's
    Ed25519 public key that certifies every member's identity.
    """

    def __init__(
        self,
        store: ObjectStore,
        client_id: str,
        *,
        mode: str = "secagg",
        signing_key: bytes | None = None,
        operator_key: bytes | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if mode == "secagg" and signing_key is None:
            raise ValueError("secure aggregation needs the device's Ed25519 signing key")
        self.store = store
        self.client_id = layout.check_id(client_id, "client id")
        self.mode = mode
        self.signing_key = signing_key
        # The operator's Ed25519 public key: with it, a secure round uses a peer's keys only
        # after checking the operator's certificate of the peer's identity
        # (``SecureRound.check_certificates``). None trusts the identities the function
        # pins in configs, as before certificates (tests and benchmarks that build
        # devices directly); the device program and the simulator always pass one.
        self.operator_key = operator_key
        self.certified: dict[str, bytes] = {}  # client id -> certified identity key (checked)
        self._pointer_etag: str | None = None
        self._pointer: Pointer | None = None

    # -- enrollment ----------------------------------------------------------
    def enroll(self) -> bool:
        """Publish this device's public key (write-once); True if this call enrolled it.

        An existing identity with a different key means another device claims
        this id: refuse rather than sign with a key nobody will accept.
        """
        if self.signing_key is None:
            raise ValueError("no signing key to enroll")
        public = crypto.ed25519_public(self.signing_key)
        key = layout.identity_key(self.client_id)
        try:
            self.store.put_new(
                key,
                encode_identity(self.client_id, public, time.time()),
                content_type="application/json",
            )
            return True
        except AlreadyExistsError:
            existing = parse_identity(self.store.get(key).body, client_id=self.client_id, where=key)
            if existing.ed25519 != public:
                raise IntegrityError(
                    f"{key}: enrolled with a different key; is another device using id {self.client_id!r}?"
                ) from None
            return False

    # -- polling the global model -----------------------------------------
    def poll_latest(self) -> tuple[Pointer, bool]:
        """The newest pointer and whether it changed since the last poll (conditional GET)."""
        try:
            obj = self.store.get(layout.LATEST_KEY, if_none_match=self._pointer_etag)
        except NotModifiedError:
            assert self._pointer is not None
            return self._pointer, False
        self._pointer = parse_pointer(obj.body, where=layout.LATEST_KEY)
        self._pointer_etag = obj.etag
        return self._pointer, True

    def fetch_model(self, version: int) -> dict[str, np.ndarray]:
        params, _, _ = load_model(self.store, version)
        return params

    # -- check-in and cohort discovery --------------------------------------
    def check_in(self, last_version: int) -> Ticket:
        # List cohorts *before* writing the check-in: any cohort that takes it
        # is formed after the write, so it sorts after this cursor.
        prefixes = self.store.list_prefixes(layout.COHORTS_PREFIX)
        cursor = prefixes[-1] + "~" if prefixes else None
        nonce = secrets.token_hex(8)
        key = layout.checkin_key(self.client_id, nonce)
        msg = CheckIn(self.client_id, nonce, time.time(), self.mode, last_version)
        if self.signing_key is not None:
            doc = {k: v for k, v in asdict(msg).items() if k != "signature"}
            msg = replace(msg, signature=crypto.sign(self.signing_key, DOMAIN_CHECKIN, doc))
        self.store.put_new(key, dumps(msg), content_type="application/json")
        log.info("checked in", extra={"client_id": self.client_id, "key": key})
        return Ticket(nonce, key, cursor, msg.created_at)

    def find_cohort(self, ticket: Ticket) -> tuple[CohortConfig | None, Ticket]:
        """The cohort naming this check-in, if one was formed; advances the cursor."""
        cursor = ticket.cursor
        settled = True  # advance the cursor only past cohorts whose config was readable
        for prefix in self.store.list_prefixes(layout.COHORTS_PREFIX, start_after=ticket.cursor):
            key = prefix + "config.json"
            try:
                cfg = parse_config(self.store.get(key).body, where=key)
            except NotFoundError:
                settled = False  # being written right now (or a stray prefix): look again
                continue
            except AccessDeniedError:
                pass  # the gateway shows a config only to the cohort's members: not ours
            except IntegrityError as exc:
                log.warning(
                    "unreadable cohort config skipped", extra={"key": key, "reason": str(exc)}
                )
            else:
                if cfg.members.get(self.client_id) == ticket.nonce:
                    return cfg, ticket
            if settled:
                cursor = prefix + "~"
        return None, Ticket(ticket.nonce, ticket.key, cursor, ticket.created_at)

    def checkin_pending(self, ticket: Ticket) -> bool:
        """False once formation took (deleted) the check-in, or the sweeper expired it."""
        return self.store.head(ticket.key) is not None

    def wait_for_cohort(
        self,
        ticket: Ticket,
        *,
        timeout_s: float,
        poll_s: float = 0.5,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> CohortConfig | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not should_stop():
            cfg, ticket = self.find_cohort(ticket)
            if cfg is not None:
                return cfg
            time.sleep(poll_s)
        return None

    # -- the input round -----------------------------------------------------
    def upload_plain(
        self,
        cfg: CohortConfig,
        delta: dict[str, np.ndarray],
        *,
        num_samples: int,
        loss: float,
        train_s: float | None = None,
    ) -> str:
        """Upload a plaintext update (explicit plaintext mode only), signed; ``train_s``, the
        seconds local training took, sizes later cohorts' deadlines (None: not reported).

        The metadata carries the digest of the float32 tensors and this device's Ed25519
        signature over both (``sign_update``), as a masked upload does: the function counts
        the update only if the key the cohort config pins for this member verifies it.
        """
        if cfg.mode is not Mode.PLAINTEXT:
            raise ValueError(f"cohort {cfg.cohort_id} runs {cfg.mode.value!r}, not plaintext")
        if self.signing_key is None:
            raise ValueError("a plaintext upload is signed: the device needs its signing key")
        tensors = {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}
        meta = sign_update(
            UpdateMeta(
                cfg.cohort_id, self.client_id, cfg.base_version, num_samples, float(loss),
                cfg.mode, None if train_s is None else round(float(train_s), 3),
            ),
            tensors,
            self.signing_key,
        )  # fmt: skip
        key = layout.member_key(cfg.cohort_id, Kind.PLAIN, self.client_id)
        self.store.put_new(
            key, encode_update(tensors, meta), content_type="application/octet-stream"
        )
        log.info(
            "update uploaded",
            extra={
                "client_id": self.client_id,
                "cohort_id": cfg.cohort_id,
                "version": cfg.base_version,
            },
        )
        return key

    def manifest(self, cohort_id: str, phase: Phase) -> Manifest | None:
        """The phase's write-once manifest, None while the phase is open.

        Parsed, not yet checked: whether it names this cohort, this phase and only
        members is ``fedcore.device.machine.manifest_fault``'s call.
        """
        key = layout.state_key(cohort_id, phase)
        try:
            return parse_manifest(self.store.get(key).body, where=key)
        except NotFoundError:
            return None

    def result(self, cohort_id: str) -> Result | None:
        key = layout.state_key(cohort_id, Phase.RESULT)
        try:
            return parse_result(self.store.get(key).body, where=key)
        except NotFoundError:
            return None
