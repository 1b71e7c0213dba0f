"""One secure cohort, played to its end by the device machine (a blocking call for tests).

The protocol lives in ``fedcore.device`` (machine, crypto, runner); this module
keeps the call the integration and hostile-input tests make, and re-exports the
names the tests and benchmarks import from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from fedcore.device import (
    DROP_POINTS,
    NO_DROP,
    DropAt,
    DropPoint,
    Outcome,
    Polling,
    SecureRound,
    Update,
    flatten_weighted,
    run_cohort,
)
from fedcore.messages import CohortConfig
from fedcore.participant import Participant

__all__ = ["DROP_POINTS", "SecureRound", "flatten_weighted", "run_secure_cohort"]


def run_secure_cohort(
    participant: Participant,
    cfg: CohortConfig,
    train: Callable[[], tuple[Mapping[str, np.ndarray], int]],
    *,
    drop_at: str | None = None,
    poll_s: float = 0.5,
    slack_s: float = 30.0,
    should_stop: Callable[[], bool] = lambda: False,
) -> Outcome:
    """Play ``cfg`` from its first round; how it ended for this device.

    ``train`` returns (delta, num_samples) and runs after the shares are out,
    so each phase's time limit (``slack_s`` beyond the cohort's phase limits)
    has to cover training. ``drop_at`` makes the device vanish at that point
    of every cohort (dropout experiments). The device's lines go to the
    ``fedcore.device.LINES`` logger.
    """
    if drop_at is not None and drop_at not in DROP_POINTS:
        raise ValueError(f"drop_at must be one of {DROP_POINTS}")
    state = run_cohort(
        participant, cfg, lambda cfg: Update(*train()),
        drop=NO_DROP if drop_at is None else DropAt(DropPoint(drop_at)),
        polling=Polling(phase_s=poll_s), slack_s=slack_s, should_stop=should_stop,
    )  # fmt: skip
    assert state.outcome is not None  # run_cohort returns at the first Leave
    return state.outcome
