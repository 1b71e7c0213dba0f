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


class AccessDeniedError(StorageError):
    """The store refused this caller the operation (a device's gateway, by policy)."""


class IntegrityError(FedError):
    """An object is malformed, oversized, inconsistent or lies about itself.

    The message always names the object and the reason, because the caller logs
    it verbatim and treats the sender as a dropout.
    """


class NonFiniteModelError(FedError):
    """Applying a cohort would produce a version (or optimizer state) with NaN or infinity.

    Never committed: the cohort is aborted with this message as its reason.
    """


class ProtocolError(FedError):
    """A message is well-formed but not allowed in the cohort's current state."""


class UnknownKeyError(FedError):
    """A key does not match any name in the bucket layout."""


class UnusableUpdateError(FedError):
    """This device's own update cannot be sent (training diverged to NaN or infinity).

    The device sits the cohort out (a dropout) instead of crashing or uploading garbage.
    """


class BudgetExceededError(FedError):
    """Training or joining would spend more privacy than this device's budget allows.

    The device refuses (it stops training, or sits the cohort out) and says why;
    it never spends past its budget.
    """


class BudgetRaisedError(BudgetExceededError):
    """A run asks for a larger privacy budget than the one fixed at the ledger's first use.

    Granting it would let a restart re-open a spent budget, so it is refused
    until an operator resets the ledger on purpose.
    """


class LedgerUnreadableError(BudgetExceededError):
    """The privacy ledger on disk cannot be read: the device cannot know what it spent.

    Never reset silently: the device stops instead of guessing its spend.
    """
