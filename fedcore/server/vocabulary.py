"""The words the coordinator's modules share: phases, what a step returns, how a cohort aborts.

Every step of the coordinator (an event handled, a phase closed, a cohort
finalized) ends in one of a few outcomes; the aggregation function returns them
per key and the tests compare them, so they are a ``StrEnum`` whose values are the
words that were logged before (``Outcome.CLOSED == "closed"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from fedcore.errors import FedError, ProtocolError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Mode
from fedcore.secagg.protocol import SecAggParams

PHASES: dict[Mode, tuple[Phase, ...]] = {
    Mode.PLAINTEXT: (Phase.INPUTS,),
    Mode.SECAGG: (Phase.KEYS, Phase.SHARES, Phase.INPUTS, Phase.UNMASK),
}


class Outcome(StrEnum):
    """What one coordinator step did (the function returns it per key; tests compare it)."""

    IGNORED = "ignored"  # a key outside the bucket layout
    FORMED = "formed"  # a check-in completed at least one cohort
    WAITING = "waiting"  # counted; the cohort or the phase waits for more
    NOOP = "noop"  # nothing left to do (a redelivered event, a finished cohort)
    REJECTED = "rejected"  # an object from a non-member, for an unknown cohort, of the wrong mode
    EARLY = "early"  # an object before its phase opened (not counted)
    LATE = "late"  # an object after its phase closed without it (not counted)
    CLOSED = "closed"  # this step wrote the phase's manifest
    APPLIED = "applied"  # this step applied the cohort and recorded the result
    ABORTED = "aborted"  # this step recorded the cohort's abort


class CohortAborted(FedError):
    """The cohort cannot complete: too few valid members, or its sum cannot be unmasked.

    Raised where that is found (a phase closing short, the mean computations) and
    caught in one place, ``Coordinator``, which records the abort; ``rejected``
    names the members whose objects were refused, and why.
    """

    def __init__(self, reason: str, rejected: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected: dict[str, str] = dict(rejected or {})


def no_metrics(name: str, value: float, unit: str) -> None:
    return None


def phase_kind(phase: Phase, mode: Mode) -> Kind:
    """The per-member object kind that a phase collects."""
    if phase is Phase.INPUTS:
        return Kind.PLAIN if mode is Mode.PLAINTEXT else Kind.MASKED
    return {Phase.KEYS: Kind.KEYS, Phase.SHARES: Kind.SHARES, Phase.UNMASK: Kind.UNMASK}[phase]


def kind_phase(kind: Kind, mode: Mode) -> Phase | None:
    """The phase of ``mode`` that collects ``kind`` (None: that kind is not used in the mode)."""
    for phase in PHASES[mode]:
        if phase_kind(phase, mode) is kind:
            return phase
    return None


def secagg_params(cfg: CohortConfig) -> SecAggParams:
    """A secure cohort's parameters (``parse_config`` guarantees them for secagg cohorts)."""
    if cfg.secagg is None:
        raise ProtocolError(f"{cfg.cohort_id}: a {cfg.mode.value} cohort has no secagg parameters")
    return cfg.secagg
