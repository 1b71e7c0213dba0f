"""The device's long-term Ed25519 key, kept in its state directory.

Created once (mode 0600, written atomically) and reused across restarts, so
the device keeps the identity it enrolled with. Losing it means re-enrolling
under a new client id: the bucket refuses a second key for the same id.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcore.secagg import crypto


def default_state_dir(client_id: str) -> Path:
    base = os.environ.get("FL_STATE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "s3fl" / "devices"
    return root / client_id


def load_or_create_signing_key(state_dir: Path) -> bytes:
    path = state_dir / "identity.ed25519"
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ValueError(
                f"{path}: expected a 32-byte Ed25519 private key, found {len(raw)} bytes"
            )
        return raw
    state_dir.mkdir(parents=True, exist_ok=True)
    private, _ = crypto.ed25519_keypair()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    os.replace(tmp, path)
    return private
