"""Uneven simulated populations (issue 16, item 4): the draws, and a worker that honours them.

The draws (``sim.population``) are pure and seeded; the scheduler tests drive one
simulator ``Worker`` with plaintext ``SyntheticDevice``s over the dict-backed bucket
of ``test_one_machine`` on a ``ManualClock``: nothing sleeps, a hold or an offline
period ends when the test advances the clock. Torch-free and fast.
"""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.clock import ManualClock
from fedcore.device import SyntheticDevice, Update, machine
from fedcore.layout import Kind
from fedcore.messages import CohortConfig, Pointer
from fedcore.participant import Participant
from sim.population import ALWAYS_ONLINE, Population, describe
from sim.worker import SimDevice, SimSettings, Worker, _ModelCache, _Slowed
from tests.unit.test_one_machine import KEY, DictStore, plain_config

TRAIN_S = 2.0  # what each synthetic training takes on the test's clock


# -- the draws -------------------------------------------------------------------------
def test_uniform_population_is_the_simulator_as_it_was() -> None:
    """
    GIVEN the default population
    THEN every device runs at the machine's speed and is always online
    """
    pop = Population()
    assert pop.uniform and pop.online_share == 1.0
    assert {pop.speed(i) for i in range(500)} == {1.0}
    assert all(pop.availability(i) is ALWAYS_ONLINE for i in range(500))
    assert ALWAYS_ONLINE.online(1e9) and ALWAYS_ONLINE.next_change(0.0) == float("inf")
    assert SimSettings().population == pop


def test_speed_draws_are_seeded_per_device_with_a_slow_tail() -> None:
    """
    GIVEN log-normal slowdowns (sigma 0.5) and a 10% tail ten times slower
    WHEN 4,000 devices draw their factors
    THEN the draws repeat for the same seed and index, differ for another seed, are at
         least 1 (about half exactly 1: the machine's speed), about 10% are in the tail,
         and the tail leaves the log-normal part of the other devices as it was
    """
    n = 4000
    pop = Population(speed_sigma=0.5, slow_fraction=0.1, slow_factor=10.0, seed=7)
    speeds = np.array([pop.speed(i) for i in range(n)])
    assert list(speeds[:50]) == [pop.speed(i) for i in range(50)]  # reproducible
    other = Population(speed_sigma=0.5, slow_fraction=0.1, slow_factor=10.0, seed=8)
    assert [other.speed(i) for i in range(50)] != list(speeds[:50])
    assert speeds.min() == 1.0
    assert 0.45 < np.mean(speeds == 1.0) < 0.55
    assert 0.08 < np.mean(speeds >= 10.0) < 0.12
    no_tail = Population(speed_sigma=0.5, seed=7)
    body = speeds < 10.0
    assert np.allclose(speeds[body], [no_tail.speed(i) for i in np.flatnonzero(body)])
    # log-normal above the floor: the 90th percentile of exp(0.5 z) is exp(0.5 * 1.2816)
    assert abs(np.quantile([no_tail.speed(i) for i in range(n)], 0.9) - 1.898) < 0.1
    summary = describe(pop, 200)
    assert summary["speed_median"] >= 1.0 and summary["speed_max"] >= 10.0
    assert not summary["uniform"]


def test_availability_alternates_with_the_configured_means() -> None:
    """
    GIVEN devices online 300 s and offline 100 s on average
    WHEN their schedules are read over a long horizon
    THEN each alternates at its change points, repeats for the same seed, and the
         population is online about 75% of the time
    """
    pop = Population(online_mean_s=300.0, offline_mean_s=100.0, seed=3)
    assert pop.online_share == 0.75
    horizon = 20_000.0
    shares = [pop.availability(i).online_time(horizon) / horizon for i in range(200)]
    assert 0.70 < float(np.mean(shares)) < 0.80
    sched, again = pop.availability(5), pop.availability(5)
    t = 0.0
    for _ in range(20):
        change = sched.next_change(t)
        assert change > t and again.online(t) == sched.online(t)
        assert sched.online(change) != sched.online(t)
        t = change
    first_online = [pop.availability(i).online(0.0) for i in range(400)]
    assert 0.65 < float(np.mean(first_online)) < 0.85  # stationary from time 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"speed_sigma": -1.0},
        {"slow_fraction": 1.0},
        {"slow_factor": 0.5},
        {"online_mean_s": -1.0},
        {"online_mean_s": 10.0, "offline_mean_s": 0.0},
    ],
)
def test_population_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Population(**kwargs)


# -- the scheduler ---------------------------------------------------------------------
class Trainer:
    """Synthetic training that takes ``TRAIN_S`` on ``clock`` and records its time box."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.budgets: dict[str, float | None] = {}

    def device(self, client: str) -> SyntheticDevice:
        trainer = self

        class Timed(SyntheticDevice):
            def train_update(self, cfg: CohortConfig, *, budget_s: float | None = None) -> Update:
                trainer.budgets[client] = budget_s
                trainer.clock.advance(TRAIN_S)
                return Update({"w": np.ones(3, np.float32)}, num_samples=5, loss=0.5)

        return Timed(lambda cfg: None)  # type: ignore[arg-type,return-value]


def make_worker(
    population: Population, clock: ManualClock, n: int = 2
) -> tuple[Worker, list[SimDevice], DictStore, Trainer, list[dict[str, Any]]]:
    store = DictStore()
    settings = SimSettings(
        devices=n, workers=1, mode="plaintext", client_prefix="t", population=population
    )
    trainer = Trainer(clock)
    devices = [
        SimDevice(
            i,
            c,
            np.arange(1),
            Participant(store, c, mode="plaintext", signing_key=KEY),
            trainer.device(c),
        )  # type: ignore[arg-type]
        for i, c in enumerate(settings.client_id(i) for i in range(n))
    ]
    events: list[dict[str, Any]] = []
    worker = Worker(
        store, settings, devices, models=_ModelCache(store), report=events.append,  # type: ignore[arg-type]
        clock=clock,
    )  # fmt: skip
    worker.view.pointer = Pointer(0, "global/v0", "", time.time())
    return worker, devices, store, trainer, events


def form_cohort(worker: Worker, devices: list[SimDevice]) -> CohortConfig:
    """Every device's check-in taken by one plaintext cohort (as the worker's view would read)."""
    nonces = {d.client_id: d.state.ticket.nonce for d in devices}  # type: ignore[union-attr]
    cfg = plain_config(list(nonces), nonces)
    for client, nonce in nonces.items():
        worker.view.taken[(client, nonce)] = cfg
    return cfg


def uploaded(store: DictStore, cfg: CohortConfig, d: SimDevice) -> bool:
    return layout.member_key(cfg.cohort_id, Kind.PLAIN, d.client_id) in store.objects


def seed_where(pred: Any, **kwargs: float) -> Population:
    """The first population (by seed) whose draws satisfy ``pred``: fixed, not random."""
    for seed in range(1000):
        pop = Population(seed=seed, **kwargs)  # type: ignore[arg-type]
        if pred(pop):
            return pop
    raise AssertionError("no seed fits")  # pragma: no cover


def test_slow_device_trains_a_smaller_box_and_its_update_is_held() -> None:
    # GIVEN a device at the machine's speed and one four times slower, in one cohort
    pop = seed_where(
        lambda p: p.speed(0) == 1.0 and p.speed(1) == 4.0, slow_fraction=0.5, slow_factor=4.0
    )
    clock = ManualClock(1000.0)
    worker, (fast, slow), store, trainer, events = make_worker(pop, clock)
    assert (fast.speed, slow.speed) == (1.0, 4.0)
    assert isinstance(slow.runner.local, _Slowed) and fast.runner.local is fast.local  # type: ignore[union-attr]
    worker.tick()
    cfg = form_cohort(worker, [fast, slow])

    # WHEN the worker trains both (each training takes TRAIN_S on the clock)
    worker.tick()  # join; the fast device trains
    worker.tick()  # the slow device trains
    assert set(trainer.budgets) == {fast.client_id, slow.client_id}

    # THEN the slow device got a quarter of the time box, the fast one uploaded at once,
    # and the slow one's update waits until four times its training time has passed
    ratio = trainer.budgets[fast.client_id] / trainer.budgets[slow.client_id]  # type: ignore[operator]
    assert ratio == pytest.approx(4.0, rel=0.01)
    assert uploaded(store, cfg, fast) and not uploaded(store, cfg, slow)
    assert slow.runner.train_s == pytest.approx(4 * TRAIN_S)  # type: ignore[union-attr]
    clock.advance(4 * TRAIN_S - TRAIN_S - 0.5)
    worker.tick()
    assert not uploaded(store, cfg, slow) and slow.stage is machine.Stage.TRAIN
    clock.advance(0.5)
    assert worker.tick() >= 1
    assert uploaded(store, cfg, slow)
    assert [e["outcome"] for e in events] == ["completed", "completed"]
    assert worker.stats.held_s == pytest.approx(3 * TRAIN_S)


class Schedule:
    """A fixed availability schedule: online outside the given [start, end) windows."""

    always = False

    def __init__(self, *offline: tuple[float, float]) -> None:
        self.offline = offline

    def online(self, t: float) -> bool:
        return not any(a <= t < b for a, b in self.offline)


def test_offline_device_neither_checks_in_nor_trains_until_it_is_back() -> None:
    # GIVEN two devices; the second is offline for the first 100 s
    clock = ManualClock(1000.0)
    worker, (a, b), store, trainer, _ = make_worker(Population(), clock)
    b.schedule = Schedule((0.0, 100.0))  # type: ignore[assignment]

    # WHEN the worker passes over them
    worker.tick()

    # THEN only the online device checked in; the other does once it is back
    assert a.stage is machine.Stage.CHECKED_IN and b.stage is not machine.Stage.CHECKED_IN
    clock.advance(100.0)
    worker.tick()
    assert b.stage is machine.Stage.CHECKED_IN

    # AND GIVEN both in a cohort, queued to train, the first goes offline before its turn
    cfg = form_cohort(worker, [a, b])
    worker._step(a)
    worker._step(b)
    assert len(worker._train_queue) == 2
    now = clock() - worker.started
    a.schedule = Schedule((now, now + 50.0))  # type: ignore[assignment]
    for _ in range(3):
        worker.tick()
    # THEN the online one trained and uploaded; the offline one waits in the queue
    assert uploaded(store, cfg, b) and not uploaded(store, cfg, a)
    assert a.client_id not in trainer.budgets and worker.stats.offline_skips >= 1
    assert worker.tick() == 0  # nothing to do until the clock moves
    clock.advance(50.0)
    worker.tick()
    assert uploaded(store, cfg, a)


def test_uniform_population_holds_nothing_and_draws_nothing_from_the_worker_rng() -> None:
    # GIVEN the default (uniform) population
    clock = ManualClock(1000.0)
    worker, devices, store, _, events = make_worker(Population(), clock)

    # THEN no device is wrapped or scheduled, and the worker's own generator (dropouts,
    # back-off jitter) is where a fresh one with the run's seed starts
    assert all(d.speed == 1.0 and d.schedule is ALWAYS_ONLINE for d in devices)
    assert all(d.runner.local is d.local for d in devices)  # type: ignore[union-attr]
    assert worker.rng.getstate() == random.Random(worker.s.seed).getstate()

    # AND WHEN a cohort trains, every update uploads as soon as it is trained
    worker.tick()
    cfg = form_cohort(worker, devices)
    worker.tick()
    while worker._train_queue:
        worker._train_next()
    assert all(uploaded(store, cfg, d) for d in devices)
    assert [e["outcome"] for e in events] == ["completed", "completed"]
    assert not worker._held and worker.stats.held_s == 0.0
    assert all(d.runner.train_s == TRAIN_S for d in devices)  # type: ignore[union-attr]


def test_a_freed_slot_goes_to_the_device_idle_longest() -> None:
    """
    GIVEN six devices in one worker, at most two online, a new version after each cohort
    WHEN three cohorts of two complete one after the other
    THEN each cohort has devices that had not taken part yet: a device whose cohort just
         ended does not take its freed slot straight back (it used to, when the new
         version was visible in the step that ended its cohort, so a small population
         rotated through its first few devices)
    """
    clock = ManualClock(1000.0)
    worker, devices, _, _, events = make_worker(Population(), clock, n=6)
    worker._cap = 2  # max_active=2 in one worker
    cohorts = []
    for version in range(1, 4):
        for _ in range(3):
            clock.advance(1.0)
            worker.tick()
        members = [d for d in devices if d.stage is machine.Stage.CHECKED_IN]
        cohorts.append(sorted(d.client_id for d in members))
        form_cohort(worker, members)
        worker.view.pointer = Pointer(version, f"global/v{version}", "", time.time())
        for _ in range(4):
            clock.advance(1.0)
            worker.tick()
    assert cohorts == [["t-0000", "t-0001"], ["t-0002", "t-0003"], ["t-0004", "t-0005"]]
    assert [e["outcome"] for e in events] == ["completed"] * 6
