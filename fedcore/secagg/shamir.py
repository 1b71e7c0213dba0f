"""Shamir secret sharing over the prime field GF(2^521 - 1).

Security warning: the polynomial coefficients come from ``secrets`` (the OS
CSPRNG). Any t-1 shares reveal nothing about the secret; t shares determine it.

Secrets are byte strings of at most 64 bytes (X25519 private keys and 32-byte
mask seeds in practice); the field's prime 2^521 - 1 (a Mersenne prime) is
larger than any of them. Share x-coordinates are small positive integers
(a member's 1-based index in the cohort), never 0, which would be the secret.

Reconstruction checks consistency: given more than t shares, every extra
share must lie on the polynomial interpolated from the first t, otherwise
``InconsistentSharesError``; ``reconstruct_robust`` then searches for the
largest consistent subset (for one or two bad shares among a few dozen).
Reference: A. Shamir, "How to share a secret", CACM 22(11), 1979.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Mapping

from fedcore.errors import FedError

PRIME = 2**521 - 1
MAX_SECRET_BYTES = 64


class ThresholdNotMetError(FedError):
    """Fewer shares than the threshold: the secret is information-theoretically hidden."""


class InconsistentSharesError(FedError):
    """The shares do not lie on one polynomial of degree t-1: some share is wrong."""


def _encode(secret: bytes) -> int:
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"secret of {len(secret)} bytes exceeds {MAX_SECRET_BYTES}")
    # A leading 0x01 keeps leading zero bytes of the secret.
    return int.from_bytes(b"\x01" + secret, "big")


def _decode(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    if not raw or raw[0] != 1 or len(raw) - 1 > MAX_SECRET_BYTES:
        raise InconsistentSharesError("reconstructed value is not an encoded secret")
    return raw[1:]


def split(secret: bytes, *, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` at x-coordinates ``xs``; any ``threshold`` of them reconstruct it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("x-coordinates must be distinct and non-zero")
    coeffs = [_encode(secret)] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        shares[x] = acc
    return shares


def _batch_inverse(values: list[int]) -> list[int]:
    """Modular inverses of nonzero values with one exponentiation (Montgomery's trick)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = inv * prefix[i] % PRIME
        inv = inv * values[i] % PRIME
    return out


class _Interpolator:
    """The polynomial through ``points`` in barycentric form: O(t) per evaluation.

    Checking every extra share against t base shares was t^2 multiplications
    and t inversions per share; the weights are computed once instead.
    """

    def __init__(self, points: list[tuple[int, int]]) -> None:
        self.xs = [x for x, _ in points]
        self.ys = [y for _, y in points]
        dens = []
        for i, xi in enumerate(self.xs):
            d = 1
            for j, xj in enumerate(self.xs):
                if i != j:
                    d = d * (xi - xj) % PRIME
            dens.append(d)
        self.weights = _batch_inverse(dens)

    def at(self, x: int) -> int:
        if x in self.xs:
            return self.ys[self.xs.index(x)]
        diffs = [(x - xj) % PRIME for xj in self.xs]
        ell = 1
        for d in diffs:
            ell = ell * d % PRIME
        total = 0
        for w, y, inv in zip(self.weights, self.ys, _batch_inverse(diffs), strict=True):
            total = (total + w * y % PRIME * inv) % PRIME
        return ell * total % PRIME


def reconstruct(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares, checking any extra ones."""
    if len(shares) < threshold:
        raise ThresholdNotMetError(f"{len(shares)} shares < threshold {threshold}")
    points = sorted(shares.items())
    for x, y in points:
        if not (0 < x < PRIME and 0 <= y < PRIME):
            raise InconsistentSharesError(f"share at x={x} is out of the field")
    poly = _Interpolator(points[:threshold])
    for x, y in points[threshold:]:
        if poly.at(x) != y:
            raise InconsistentSharesError(f"share at x={x} is inconsistent with the others")
    return _decode(poly.at(0))


def reconstruct_robust(
    shares: Mapping[int, int], *, threshold: int, max_bad: int = 2
) -> tuple[bytes, list[int]]:
    """Reconstruct while tolerating up to ``max_bad`` wrong shares; returns (secret, bad xs).

    Needs at least ``threshold + 2*bad`` shares to be unambiguous; tries the
    subsets that drop the fewest shares first.
    """
    if len(shares) < threshold:
        raise ThresholdNotMetError(f"{len(shares)} shares < threshold {threshold}")
    xs = sorted(shares)
    for drop in range(0, max_bad + 1):
        if len(xs) - drop < threshold + drop:  # not enough redundancy to trust the result
            break
        for bad in itertools.combinations(xs, drop):
            subset = {x: shares[x] for x in xs if x not in bad}
            try:
                return reconstruct(subset, threshold=threshold), list(bad)
            except InconsistentSharesError:
                continue
    raise InconsistentSharesError(
        f"no consistent subset of {len(xs)} shares with threshold {threshold}"
    )


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(66, "big")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != 66:
        raise InconsistentSharesError(f"share of {len(raw)} bytes, expected 66")
    y = int.from_bytes(raw, "big")
    if y >= PRIME:
        raise InconsistentSharesError("share is out of the field")
    return y
