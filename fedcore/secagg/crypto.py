"""Key agreement, key derivation, share encryption, signatures and mask PRGs.

Security warnings first:
- Every secret (private keys, mask seeds, nonces) comes from ``cryptography``
  or ``os.urandom``; numpy's and Python's ``random`` generators are never used
  for anything secret.
- Every derived key binds its purpose, the cohort and both member ids into
  HKDF's ``info``, so a key (or mask) from one cohort or pair is useless in
  another; share ciphertexts bind cohort, sender and receiver as AES-GCM
  associated data, so a ciphertext moved to another mailbox fails to decrypt.
- Signatures are Ed25519 over a domain-separated canonical encoding.

Masks are AES-128-CTR keystreams (a PRG running at 12 GB/s here), read as
little-endian uint32; ``expand_mask`` and ``add_masks`` share the one
seed-to-cipher mapping, ``_mask_cipher``. AES-128 matches the ~128-bit
security of X25519 that every pairwise seed already rests on, and is 1.3x
faster than AES-256: at n = 100 a device expands 35 masks, which is most of
its secure-aggregation cost (benchmarks/secagg.py).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.errors import IntegrityError

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def unb64(text: Any, *, what: str, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise IntegrityError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise IntegrityError(f"{what} is not valid base64") from None
    if size is not None and len(raw) != size:
        raise IntegrityError(f"{what} has {len(raw)} bytes, expected {size}")
    return raw


# -- X25519 -----------------------------------------------------------------


def x25519_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw 32-byte X25519 keys."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes(_RAW, _RAW_PRIV, _NOENC), sk.public_key().public_bytes(_RAW, _RAW_PUB)


def x25519_public(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUB)


def agree(private: bytes, peer_public: bytes) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # all-zero shared secret from a low-order point
        raise IntegrityError(f"key agreement failed: {exc}") from None


def _hkdf(secret: bytes, *, purpose: str, cohort_id: str, a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    info = f"fedcore/secagg/v1/{purpose}|{cohort_id}|{lo}|{hi}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=cohort_id.encode(), info=info).derive(
        secret
    )


def pair_mask_seed(
    private: bytes, peer_public: bytes, *, cohort_id: str, me: str, peer: str
) -> bytes:
    """The seed both members of a pair derive for their shared mask (symmetric in the pair)."""
    return _hkdf(agree(private, peer_public), purpose="mask", cohort_id=cohort_id, a=me, b=peer)


def pair_sign(me: str, peer: str) -> int:
    """+1 if ``me`` sorts before ``peer``: the pair's masks then cancel in the sum."""
    if me == peer:
        raise ValueError("a member has no mask with itself")
    return 1 if me < peer else -1


# -- share encryption (AES-GCM) ---------------------------------------------


def _share_key(private: bytes, peer_public: bytes, cohort_id: str, me: str, peer: str) -> bytes:
    return _hkdf(agree(private, peer_public), purpose="share", cohort_id=cohort_id, a=me, b=peer)


def _aad(cohort_id: str, sender: str, receiver: str) -> bytes:
    return f"fedcore/secagg/v1/share|{cohort_id}|{sender}->{receiver}".encode()


def encrypt_share(
    plaintext: bytes,
    *,
    private: bytes,
    peer_public: bytes,
    cohort_id: str,
    sender: str,
    receiver: str,
) -> bytes:
    nonce = os.urandom(12)
    key = _share_key(private, peer_public, cohort_id, sender, receiver)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(cohort_id, sender, receiver))


def decrypt_share(
    blob: bytes, *, private: bytes, peer_public: bytes, cohort_id: str, sender: str, receiver: str
) -> bytes:
    if len(blob) < 12 + 16:
        raise IntegrityError(f"share {sender}->{receiver}: ciphertext too short")
    key = _share_key(private, peer_public, cohort_id, sender, receiver)
    try:
        return AESGCM(key).decrypt(blob[:12], blob[12:], _aad(cohort_id, sender, receiver))
    except InvalidTag:
        raise IntegrityError(
            f"share {sender}->{receiver} in {cohort_id}: authentication failed"
        ) from None


# -- Ed25519 signatures ------------------------------------------------------


def ed25519_keypair() -> tuple[bytes, bytes]:
    sk = Ed25519PrivateKey.generate()
    return sk.private_bytes(_RAW, _RAW_PRIV, _NOENC), sk.public_key().public_bytes(_RAW, _RAW_PUB)


def ed25519_public(private: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, _RAW_PUB)


def canonical(domain: str, body: dict[str, Any]) -> bytes:
    """What gets signed: a domain tag and the message without its signature, canonical JSON."""
    doc = {k: v for k, v in body.items() if k != "signature"}
    return domain.encode() + b"\n" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(private: bytes, domain: str, body: dict[str, Any]) -> str:
    return b64(Ed25519PrivateKey.from_private_bytes(private).sign(canonical(domain, body)))


def verify(public: bytes, domain: str, body: dict[str, Any], *, where: str) -> None:
    sig = unb64(body.get("signature"), what=f"{where}: signature", size=64)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(sig, canonical(domain, body))
    except InvalidSignature:
        raise IntegrityError(f"{where}: bad signature") from None


# -- mask expansion ----------------------------------------------------------


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of the mask keystream under ``seed`` (32 bytes)."""
    enc = _mask_cipher(seed).encryptor()
    # CTR's finalize() adds nothing; skipping the concatenation and reusing one
    # zero plaintext per length makes this 5x faster (benchmarks/secagg.py).
    return np.frombuffer(enc.update(_zeros(4 * length)), dtype="<u4")


def _mask_cipher(seed: bytes) -> Cipher[modes.CTR]:
    """AES-128-CTR keyed by the seed's first half, counting from its second half.

    Each seed is used for exactly one mask (seeds are derived per cohort and
    pair, or drawn fresh per cohort), so deriving the counter block from the
    seed is safe; a 1.2M-word mask uses 300k of its 2^128 counter values.
    """
    if len(seed) != 32:
        raise ValueError("mask seed must be 32 bytes")
    return Cipher(algorithms.AES128(seed[:16]), modes.CTR(seed[16:]))


@functools.lru_cache(maxsize=4)
def _zeros(size: int) -> bytes:
    return bytes(size)


MASK_CHUNK_WORDS = 1 << 16  # 256 KiB of keystream per step: stays in the CPU cache


def add_masks(y: np.ndarray, terms: list[tuple[int, bytes]]) -> np.ndarray:
    """y += sum(sign * expand_mask(seed, len(y))) mod 2^32, in place; returns y.

    The same keystreams as ``expand_mask``, generated chunk by chunk (one
    AES-CTR encryptor per seed keeps its counter) and folded into ``y`` while
    the chunk is still in cache: 2-3x faster than expanding whole masks and
    adding them, with no full-length temporaries.
    """
    if y.dtype != np.uint32 or y.ndim != 1:
        raise ValueError("masks apply to a 1-D uint32 vector")
    encs = [(sign, _mask_cipher(seed).encryptor()) for sign, seed in terms]
    buf = bytearray(4 * MASK_CHUNK_WORDS + 15)  # update_into wants block_size - 1 spare bytes
    for start in range(0, y.size, MASK_CHUNK_WORDS):
        part = y[start : start + MASK_CHUNK_WORDS]
        zeros = _zeros(4 * part.size)
        ks = np.frombuffer(buf, dtype="<u4", count=part.size)
        for sign, enc in encs:
            enc.update_into(zeros, buf)
            if sign > 0:
                part += ks
            else:
                part -= ks
    return y


def load_or_create_ed25519(path: Path) -> bytes:
    """The raw 32-byte Ed25519 private key in ``path``, created (0600, atomically) if absent.

    One key file format for the device's identity and the operator's certifying key: a
    half-written file must never be read back as a key, hence the rename.
    """
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != 32:
            raise ValueError(
                f"{path}: expected a 32-byte Ed25519 private key, found {len(raw)} bytes"
            )
        return raw
    path.parent.mkdir(parents=True, exist_ok=True)
    private, _ = ed25519_keypair()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    os.replace(tmp, path)
    return private
