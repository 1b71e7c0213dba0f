"""Fault injection for dropout experiments: the hook the runner asks before a drop point.

The protocol code has no drop branches: a request whose ``vanish_point`` is set
(``fedcore.device.machine``) is first put to the runner's ``DropHook``; if it
says so, the runner answers ``Vanished(point)`` instead of performing the
request, and the machine leaves the cohort as ``dropped``, exactly as a device
that lost power there would (nothing more of it reaches the bucket).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedcore.device.machine import DropPoint


class DropHook(Protocol):
    def vanishes(self, cohort_id: str, point: DropPoint) -> bool:
        """True to make the device vanish from ``cohort_id`` at ``point``."""
        ...


class NoDrop:
    """Never vanish (every real device)."""

    def vanishes(self, cohort_id: str, point: DropPoint) -> bool:
        return False


NO_DROP = NoDrop()


@dataclass(frozen=True)
class DropAt:
    """Vanish from every cohort at ``point`` (tests: a chosen member drops at a chosen round)."""

    point: DropPoint

    def vanishes(self, cohort_id: str, point: DropPoint) -> bool:
        return point is self.point


class RandomDrop:
    """Vanish at ``point`` from a cohort with probability ``prob``, drawn once per cohort.

    The draw happens the first time the cohort reaches any drop point (before it
    advertises keys), so each secure cohort costs one draw of ``uniform``.
    """

    def __init__(
        self, point: DropPoint, prob: float, uniform: Callable[[], float] = random.random
    ) -> None:
        if not 0.0 <= prob <= 1.0:
            raise ValueError("drop probability must be in [0, 1]")
        self.point = point
        self.prob = prob
        self._uniform = uniform
        self._drawn: tuple[str, bool] | None = None  # (cohort id, drops there): the current one

    def vanishes(self, cohort_id: str, point: DropPoint) -> bool:
        if self._drawn is None or self._drawn[0] != cohort_id:
            self._drawn = (cohort_id, self._uniform() < self.prob)
        return self._drawn[1] and point is self.point
