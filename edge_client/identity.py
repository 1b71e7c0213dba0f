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
    return crypto.load_or_create_ed25519(state_dir / "identity.ed25519")
