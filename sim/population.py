"""How uneven the simulated population is: each device's speed and when it is reachable.

Real devices (phones, single-board computers, laptops doing other work) differ
by an order of magnitude in how long their local training takes, and come and
go: a phone is reachable while charging on Wi-Fi, then gone for hours. One
machine playing a thousand devices trains them all at its own speed and keeps
them all reachable, so a simulation of it says little about stragglers. This
module draws, per device, what the simulator's scheduler (``sim.worker``) then
honours; the protocol code never sees it:

- a **slowdown factor** ``>= 1``: the device's training takes that many times as
  long as the simulating machine needed for it. Log-normal with median 1 (a
  factor below 1 cannot be played faster than the machine computes it, so it
  counts as 1: about half the devices run at the machine's speed), times
  ``slow_factor`` for a ``slow_fraction`` of devices, the slow tail of old
  phones and busy laptops;
- an **availability** schedule: alternating online and offline periods, each
  exponential with its own mean (an alternating renewal process). While offline
  a device answers nothing: it does not check in, and a cohort it is in sees
  it drop out; it picks up where it was once back.

Draws come from a seeded, non-cryptographic generator keyed by (seed, device
index): a run is reproducible, and a device's draws do not depend on how many
workers play the population or which one plays it. They are not secrets; no
key, mask or noise is drawn here.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ALWAYS_ONLINE", "Availability", "Population", "describe"]

# Stream ids, so that changing one parameter leaves the other draws as they were.
_SPEED, _TAIL, _AVAILABILITY = 1, 2, 3


@dataclass(frozen=True)
class Population:
    """Parameters of the per-device draws; the defaults are a uniform population.

    ``speed_sigma``: sigma of the log-normal slowdown (natural log; 0: none).
    ``slow_fraction`` in [0, 1): share of devices slowed a further ``slow_factor`` (>= 1).
    ``online_mean_s``: mean seconds a device stays reachable (0: always online);
    ``offline_mean_s``: mean seconds it is then gone (> 0 when ``online_mean_s`` is).
    ``seed``: the draws' seed (independent of the worker's dropout generator).
    """

    speed_sigma: float = 0.0
    slow_fraction: float = 0.0
    slow_factor: float = 10.0
    online_mean_s: float = 0.0
    offline_mean_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.speed_sigma >= 0 and math.isfinite(self.speed_sigma)):
            raise ValueError("speed_sigma must be finite and >= 0")
        if not 0.0 <= self.slow_fraction < 1.0:
            raise ValueError("slow_fraction must be in [0, 1)")
        if not (self.slow_factor >= 1 and math.isfinite(self.slow_factor)):
            raise ValueError("slow_factor must be finite and >= 1")
        if not (self.online_mean_s >= 0 and math.isfinite(self.online_mean_s)):
            raise ValueError("online_mean_s must be finite and >= 0 (0: always online)")
        if self.online_mean_s > 0 and not (
            self.offline_mean_s > 0 and math.isfinite(self.offline_mean_s)
        ):
            raise ValueError("offline_mean_s must be finite and > 0")

    @property
    def uniform(self) -> bool:
        """Every device at the machine's speed and always online (the simulator as it was)."""
        return self.speed_sigma == 0 and self.slow_fraction == 0 and self.online_mean_s == 0

    @property
    def online_share(self) -> float:
        """Long-run fraction of the time a device is online."""
        if self.online_mean_s == 0:
            return 1.0
        return self.online_mean_s / (self.online_mean_s + self.offline_mean_s)

    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, index])

    def speed(self, index: int) -> float:
        """Device ``index``'s slowdown factor (>= 1; exactly 1.0 in a uniform population)."""
        factor = 1.0
        if self.speed_sigma > 0:
            z = float(self._rng(_SPEED, index).standard_normal())
            factor = max(1.0, math.exp(self.speed_sigma * z))
        if self.slow_fraction > 0 and float(self._rng(_TAIL, index).random()) < self.slow_fraction:
            factor *= self.slow_factor
        return factor

    def availability(self, index: int) -> Availability:
        """Device ``index``'s online/offline schedule, in seconds from the start of the run."""
        if self.online_mean_s == 0:
            return ALWAYS_ONLINE
        return Availability(
            self._rng(_AVAILABILITY, index), self.online_mean_s, self.offline_mean_s
        )


class Availability:
    """Alternating online and offline periods, exponential with the given means.

    The first period is online with the long-run probability ``on / (on + off)``;
    as the exponential is memoryless, its length has the same distribution as a
    whole period's, so the schedule is stationary from time 0. Periods are drawn
    lazily as ``online(t)`` asks about later times; ``t`` is seconds since the
    schedule's start (the worker's start).
    """

    def __init__(
        self, rng: np.random.Generator | None, online_mean_s: float, offline_mean_s: float
    ) -> None:
        self._rng = rng
        self._means = (online_mean_s, offline_mean_s)
        share = online_mean_s / (online_mean_s + offline_mean_s) if rng is not None else 1.0
        self._first_online = rng is None or float(rng.random()) < share
        self._ends: list[float] = []  # end of each period, the first one's state _first_online

    @property
    def always(self) -> bool:
        return self._rng is None

    def _extend(self, t: float) -> None:
        assert self._rng is not None
        while not self._ends or self._ends[-1] <= t:
            online = self._first_online == (len(self._ends) % 2 == 0)
            mean = self._means[0] if online else self._means[1]
            start = self._ends[-1] if self._ends else 0.0
            self._ends.append(start + float(self._rng.exponential(mean)))

    def online(self, t: float) -> bool:
        """Whether the device is reachable ``t`` seconds after the start."""
        if self._rng is None:
            return True
        self._extend(t)
        period = bisect.bisect_right(self._ends, t)
        return self._first_online == (period % 2 == 0)

    def next_change(self, t: float) -> float:
        """When the state at ``t`` next changes (inf for an always-online device)."""
        if self._rng is None:
            return math.inf
        self._extend(t)
        return self._ends[bisect.bisect_right(self._ends, t)]

    def online_time(self, until: float) -> float:
        """Seconds online in [0, until]."""
        if self._rng is None:
            return max(0.0, until)
        self._extend(until)
        total, start, online = 0.0, 0.0, self._first_online
        for end in self._ends:
            if online:
                total += max(0.0, min(end, until) - start)
            if end >= until:
                break
            start, online = end, not online
        return total


ALWAYS_ONLINE = Availability(None, 0.0, 0.0)


def describe(population: Population, devices: int) -> dict[str, float | int | bool]:
    """What a report records of a population of ``devices``: the parameters, and the
    slowdown factors' spread and the expected online share actually drawn."""
    speeds = np.array([population.speed(i) for i in range(devices)])
    return {
        "uniform": population.uniform,
        "speed_sigma": population.speed_sigma,
        "slow_fraction": population.slow_fraction,
        "slow_factor": population.slow_factor,
        "online_mean_s": population.online_mean_s,
        "offline_mean_s": population.offline_mean_s,
        "seed": population.seed,
        "speed_median": round(float(np.median(speeds)), 3),
        "speed_p90": round(float(np.quantile(speeds, 0.9)), 3),
        "speed_max": round(float(speeds.max()), 3),
        "devices_slowed": int((speeds > 1.0).sum()),
        "online_share": round(population.online_share, 3),
    }
