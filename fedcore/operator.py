"""The operator's signing key and the certificates it makes (run outside AWS).

Security warnings first: the operator's Ed25519 private key lives in one local
file (mode 0600) on the operator's machine. It is never uploaded to the
bucket, never put in the template or a function's environment, and never
handed to a device: devices get only its public key (``public_text``), with
their enrollment token. Anyone who holds the private key can certify any
identity, so the file is the root of the device PKI.

A certificate (``fedcore.secagg.protocol.encode_certificate``) binds a client
id to its identity key; the operator writes it write-once to
``clients/{id}/certificate.json`` with its own credentials (the gateway's and
the function's IAM roles cannot write it). A device checks every peer's
certificate before it uses that peer's keys (``fedcore.device.secure``), so a
compromised function or gateway can overwrite ``identity.json`` or pin
another key in a config and still not swap an identity.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedcore import layout
from fedcore.errors import AlreadyExistsError, IntegrityError
from fedcore.secagg import crypto
from fedcore.secagg.protocol import Certificate, encode_certificate, parse_certificate
from fedcore.storage import ObjectStore

log = logging.getLogger(__name__)

KEY_FILE = "operator.ed25519"


def default_operator_dir() -> Path:
    """``$FL_OPERATOR_DIR``, else ``~/.config/s3fl/operator`` (outside any bucket or stack)."""
    base = os.environ.get("FL_OPERATOR_DIR")
    return Path(base) if base else Path.home() / ".config" / "s3fl" / "operator"


def load_or_create_operator_key(directory: Path) -> bytes:
    """The operator's raw 32-byte Ed25519 private key, created (0600, atomically) if absent."""
    path = directory / KEY_FILE
    created = not path.exists()
    private = crypto.load_or_create_ed25519(path)
    if created:
        log.info("operator key created", extra={"path": str(path)})
    return private


def public_text(operator_sk: bytes) -> str:
    """The operator's public key as devices are given it (base64 of the raw 32 bytes)."""
    return crypto.b64(crypto.ed25519_public(operator_sk))


def parse_public(text: str) -> bytes:
    """An operator public key from ``public_text``'s form; ``IntegrityError`` if malformed."""
    return crypto.unb64(text.strip(), what="operator public key", size=32)


def certify(
    store: ObjectStore,
    operator_sk: bytes,
    client_id: str,
    identity: bytes,
    *,
    now: float | None = None,
) -> str:
    """Write the operator's certificate of ``client_id``'s key ``identity``; returns its key.

    Write-once: a second call for the same key is a no-op, and a certificate that
    already names another key is refused (``IntegrityError``): an id is certified
    for one key only, so a stolen id cannot be re-certified by mistake.
    """
    key = layout.certificate_key(client_id)
    if len(identity) != 32:
        raise ValueError("an identity key is 32 raw bytes")
    cert = Certificate(client_id, identity, time.time() if now is None else now)
    try:
        store.put_new(key, encode_certificate(cert, operator_sk), content_type="application/json")
    except AlreadyExistsError:
        existing = parse_certificate(
            store.get(key).body,
            operator_key=crypto.ed25519_public(operator_sk),
            client_id=client_id,
            where=key,
        )
        if existing.ed25519 != identity:
            raise IntegrityError(
                f"{key}: {client_id} is already certified for another key"
            ) from None
        return key
    log.info("identity certified", extra={"client_id": client_id, "key": key})
    return key
