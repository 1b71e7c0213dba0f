"""Local training and evaluation on the device (plain SGD with momentum)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# MNIST's mean and standard deviation, as in PyTorch's MNIST example.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    max_grad_norm: float = 0.0  # clip each step's gradient norm (0: off); guards divergence
    # The model's nonlinearity while training (SimpleCNN: "relu" or "tanh"); None keeps the
    # model's own. DP-SGD runs use tanh (edge_client.__main__), see edge_client.model.
    activation: str | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"invalid training settings {self}")


@dataclass(frozen=True)
class TrainResult:
    num_samples: int
    loss: float  # mean training loss over the last epoch
    steps: int


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
) -> TrainResult:
    """E epochs of minibatch SGD over this device's shard."""
    if len(x) == 0:
        raise ValueError("empty training shard")
    xs, ys = to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    apply_activation(model, settings)
    model.train()
    steps = 0
    epoch_loss = math.nan
    for epoch in range(settings.epochs):
        order = torch.randperm(len(xs), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(xs), settings.batch_size):
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
        epoch_loss = total / count
        if progress:
            progress(
                f"epoch {epoch + 1}/{settings.epochs}: loss {epoch_loss:.4f} ({count} samples)"
            )
    return TrainResult(len(xs), epoch_loss, steps)


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
