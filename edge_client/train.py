"""Local training and evaluation on the device (Adam by default, or SGD with momentum)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_client.defaults import OPTIMIZERS

# MNIST's mean and standard deviation, as in PyTorch's MNIST example.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.0  # SGD's momentum; Adam keeps its own moments (momentum must be 0)
    seed: int = 0
    max_grad_norm: float = 0.0  # clip each step's gradient norm (0: off); guards divergence
    # The model's nonlinearity while training (SimpleCNN: "relu" or "tanh"); None keeps the
    # model's own. DP-SGD runs use tanh (edge_client.__main__), see edge_client.model.
    activation: str | None = None
    optimizer: str = "adam"  # one of OPTIMIZERS; DP-SGD always runs SGD

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"invalid training settings {self}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; one of {OPTIMIZERS}")
        if self.optimizer == "adam" and self.momentum:
            raise ValueError("momentum is SGD's; Adam keeps its own moments (use --momentum 0)")


def local_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """A fresh optimizer per participation (no state crosses versions).

    Adam is the default because a time-boxed participation may run only tens of steps:
    replaying the 4-device demo's schedule (two cohorts of 2 from the same base, the
    second applied stale, a third from v2), 25 steps of batch 32 per member reached
    0.938 after three versions with Adam (lr 0.002) against 0.897 with SGD (lr 0.05,
    momentum 0.9), 60 steps 0.964 against 0.924 (mean of 3 seeds,
    benchmarks/short_rounds.py).
    """
    if settings.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=settings.lr)
    return torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)


@dataclass(frozen=True)
class TrainResult:
    num_samples: int  # distinct samples processed (the shard, unless the time box cut it)
    loss: float  # mean training loss over the last epoch
    steps: int
    cut_short: bool = False  # the time box stopped training before its planned steps


class StepTimer:
    """Whether one more step fits in ``budget_s`` (None: always), from the steps so far.

    The budget counts from the timer's creation, which the trainers do on entry: the
    set-up before the first step (the optimizer, Opacus' wrapping, a cold process's
    first imports: 3-6 s on a loaded machine) spends the same deadline as the steps.
    The step time is the mean over the steps run, timed from the first one, so set-up
    does not inflate it. At least one step always runs; after that a step runs only if
    the time used so far plus the mean step time stays within the budget. ``clock`` is
    injectable so a test can make steps "take" any time without sleeping.
    """

    def __init__(self, budget_s: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget_s, self.clock = budget_s, clock
        self.start = clock()
        self.first_step: float | None = None
        self.steps = 0

    def another(self) -> bool:
        now = self.clock()
        if self.first_step is None:
            self.first_step = now
        if self.budget_s is None or self.steps == 0:
            return True
        step_s = (now - self.first_step) / self.steps
        return now - self.start + step_s <= self.budget_s

    def ran(self) -> None:
        self.steps += 1


def warm_up() -> None:
    """Pay a cold process's one-time costs of training before any deadline runs: the
    first ``torch.optim`` optimizer imports torch's compiler stack (3 s idle, 6 s on a
    loaded 2-core machine), which would otherwise eat the first cohort's time box."""
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.sum().backward()
    opt.step()


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) float32 in [0, 1] -> normalised (N, 1, 28, 28)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).unsqueeze(1)
    return (t - MNIST_MEAN) / MNIST_STD


def apply_activation(model: nn.Module, settings: TrainSettings) -> None:
    """Switch the model to ``settings.activation`` (if set); parameters are untouched."""
    if settings.activation is None:
        return
    if not hasattr(model, "activation"):
        raise ValueError(f"{type(model).__name__} has no selectable activation")
    model.activation = settings.activation


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    progress: Callable[[str], None] | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """E epochs of minibatch SGD over this device's shard, or as many steps as fit in
    ``budget_s`` seconds (at least one): a slow device still contributes what it managed
    before the inputs deadline instead of missing it. The result's ``num_samples`` (the
    update's weight) counts the samples actually processed."""
    if len(x) == 0:
        raise ValueError("empty training shard")
    timer = StepTimer(budget_s, clock)
    xs, ys = to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(settings.seed)
    opt = local_optimizer(model, settings)
    apply_activation(model, settings)
    model.train()
    steps = seen = 0
    epoch_loss = math.nan
    cut = False
    for epoch in range(settings.epochs):
        order = torch.randperm(len(xs), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(xs), settings.batch_size):
            if not timer.another():
                cut = True
                break
            idx = order[start : start + settings.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
            steps += 1
            timer.ran()
        seen += count
        if count:
            epoch_loss = total / count
        if progress:
            progress(
                f"epoch {epoch + 1}/{settings.epochs}: loss {epoch_loss:.4f} ({count} samples)"
                + (f", cut short after {steps} steps to meet the deadline" if cut else "")
            )
        if cut:
            break
    return TrainResult(min(len(xs), seen), epoch_loss, steps, cut)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the given examples."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(x), batch_size):
        xb = to_tensor(x[start : start + batch_size])
        yb = torch.from_numpy(np.asarray(y[start : start + batch_size], dtype=np.int64))
        out = model(xb)
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    return correct / len(x), loss_sum / len(x)
