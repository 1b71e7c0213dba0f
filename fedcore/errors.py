"""One exception root for everything the core raises.

Callers (handlers, the device loop) catch these by name to decide between
"retry later", "treat the sender as a dropout" and "give up"; they never see
botocore's ``ClientError`` or safetensors' parse errors directly.
"""

from __future__ import annotations


class FedError(Exception):
    """Root of every error this package raises on purpose."""


class StorageError(FedError):
    """The object store failed in a way that is not a protocol outcome."""


class NotFoundError(StorageError):
    """The key does not exist (404)."""


class NotModifiedError(StorageError):
    """A conditional GET found the object unchanged (304): nothing to download."""


class AlreadyExistsError(StorageError):
    """A write-once put (``If-None-Match: *``) lost: someone created the key first."""


class ConflictError(StorageError):
    """A compare-and-swap put (``If-Match``) lost: the object changed since it was read."""


class ThrottledError(StorageError):
    """The store kept throttling (503 SlowDown) after every retry."""


class IntegrityError(FedError):
    """An object is malformed, oversized, inconsistent or lies about itself.

    The message always names the object and the reason, because the caller logs
    it verbatim and treats the sender as a dropout.
    """


class ProtocolError(FedError):
    """A message is well-formed but not allowed in the cohort's current state."""


class UnknownKeyError(FedError):
    """A key does not match any name in the bucket layout."""


class UnusableUpdateError(FedError):
    """This device's own update cannot be sent (training diverged to NaN or infinity).

    The device sits the cohort out (a dropout) instead of crashing or uploading garbage.
    """
