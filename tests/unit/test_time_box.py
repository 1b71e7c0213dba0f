"""Time-boxed local training: as many steps as fit before the inputs deadline.

The training loops take an injected clock; here a forward pass "takes" one second on
it, so the box is crossed exactly without sleeping.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edge_client.train import StepTimer, TrainSettings, train_local


class Slow(nn.Module):
    """A linear model whose every forward pass moves the fake clock by ``step_s``."""

    def __init__(self, clock: list[float], step_s: float) -> None:
        super().__init__()
        self.flat, self.fc = nn.Flatten(), nn.Linear(28 * 28, 10)
        self.clock, self.step_s = clock, step_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.step_s
        return self.fc(self.flat(x))


def shard(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


def test_training_stops_when_the_next_step_would_not_fit_and_weighs_what_it_processed() -> None:
    """GIVEN 1 s steps and a 3.5 s budget THEN 3 steps run (a 4th would end at 4 s), the
    weight is the 12 samples processed, and the result says it was cut short."""
    now = [0.0]
    x, y = shard()
    settings = TrainSettings(epochs=2, batch_size=4)
    res = train_local(Slow(now, 1.0), x, y, settings, budget_s=3.5, clock=lambda: now[0])
    assert (res.steps, res.num_samples, res.cut_short) == (3, 12, True)


def test_at_least_one_step_and_no_box_trains_everything() -> None:
    """GIVEN a budget already spent THEN one step still runs; GIVEN no budget THEN every
    epoch runs and the weight is the shard, as before."""
    now = [0.0]
    x, y = shard()
    settings = TrainSettings(epochs=2, batch_size=4)
    res = train_local(Slow(now, 1.0), x, y, settings, budget_s=0.0, clock=lambda: now[0])
    assert (res.steps, res.num_samples, res.cut_short) == (1, 4, True)
    res = train_local(Slow(now, 1.0), x, y, settings, clock=lambda: now[0])
    assert (res.steps, res.num_samples, res.cut_short) == (20, 40, False)
    # A box that fits a whole epoch but not two: the weight is the shard, once.
    res = train_local(Slow(now, 1.0), x, y, settings, budget_s=14.0, clock=lambda: now[0])
    assert (res.steps, res.num_samples, res.cut_short) == (14, 40, True)


def test_step_timer_uses_the_mean_step_time() -> None:
    now = [0.0]
    timer = StepTimer(10.0, lambda: now[0])
    assert timer.another()  # the first step always runs
    for took in (1.0, 5.0):
        now[0] += took
        timer.ran()
    assert timer.another()  # 6 s used + a 3 s mean step = 9 s <= 10 s
    now[0] += 2.0
    timer.ran()
    assert not timer.another()  # 8 s used + a 2.67 s mean step > 10 s
    assert StepTimer(None, lambda: now[0]).another()


def test_set_up_before_the_first_step_spends_the_box_but_not_the_step_time() -> None:
    """GIVEN 4 s of set-up (a cold process's first optimizer import) before 1 s steps in a
    10 s box THEN 6 steps run, ending at 10 s; without counting the set-up 10 would run,
    ending at 14 s, past the deadline (the demo's first cohorts under load), and with the
    set-up in the step mean only 5 would."""
    now = [0.0]
    timer = StepTimer(10.0, lambda: now[0])
    now[0] += 4.0  # set-up
    steps = 0
    while timer.another():
        now[0] += 1.0
        timer.ran()
        steps += 1
    assert steps == 6


def test_the_device_counts_the_model_download_against_the_box(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIVEN a 10 s box and a base model whose download takes 4 s THEN the trainer is
    handed the 6 s left."""
    from edge_client import device as device_mod

    now = [100.0]
    handed: list[float | None] = []

    def fake_train(model: object, x: object, y: object, settings: object, **kw: object) -> object:
        handed.append(kw["budget_s"])  # type: ignore[arg-type]
        raise StopIteration

    monkeypatch.setattr(device_mod.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(device_mod, "train_local", fake_train)
    monkeypatch.setattr(device_mod, "build", lambda base: None)

    class Slow:
        def fetch_model(self, version: int) -> dict:
            now[0] += 4.0
            return {}

    dev = object.__new__(device_mod.Device)
    dev.p, dev.privacy, dev.budget = Slow(), None, None  # type: ignore[assignment]
    dev.x = dev.y = np.zeros(1)
    dev.train, dev.log = TrainSettings(), lambda msg: None  # type: ignore[assignment]
    with pytest.raises(StopIteration):
        dev.train_update(SimpleNamespace(base_version=0), budget_s=10.0)  # type: ignore[arg-type]
    assert handed == [6.0]
