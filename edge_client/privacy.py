"""The device's DP-SGD (Opacus), and the names its budget code imports.

The ledger itself (composition, epsilon, budgets fixed at first use, the state file)
is torch-free and lives in ``fedcore.dp.ledger``, shared with the demo and the
simulator; this module keeps what needs torch.

SECURITY: DP-SGD's Poisson sampling and Gaussian noise are drawn from generators keyed
from the OS CSPRNG on every run, never from ``--seed`` or torch's global generator. A
noise stream anyone can regenerate can be subtracted from the update, and the privacy
guarantee with it; devices left at the same seed would also add identical noise, which
averaging does not reduce.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.train import StepTimer, TrainResult, TrainSettings, apply_activation, to_tensor
from fedcore.dp.ledger import STATE_FILE, calibrate_noise
from fedcore.dp.ledger import DeviceLedger as PrivacyState
from fedcore.errors import BudgetExceededError

# The device code catches its refusals under this name; the error is the core's.
BudgetExhausted = BudgetExceededError

__all__ = [
    "STATE_FILE",
    "BudgetExhausted",
    "PrivacyState",
    "SampleDPSettings",
    "calibrate_noise",
    "secret_generator",
    "steps_per_participation",
    "train_local_dp",
]


@dataclass(frozen=True)
class SampleDPSettings:
    target_epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    planned_rounds: int = 10  # participations the noise multiplier is calibrated for
    grad_sample_mode: str = "ghost"  # Opacus fast gradient clipping; "hooks": per-sample grads

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and 0 < self.delta < 1 and self.max_grad_norm > 0):
            raise ValueError("need target_epsilon > 0, 0 < delta < 1, max_grad_norm > 0")
        if self.planned_rounds < 1 or self.grad_sample_mode not in ("ghost", "hooks"):
            raise ValueError("planned_rounds >= 1 and grad_sample_mode in {ghost, hooks}")


def steps_per_participation(n: int, settings: TrainSettings) -> tuple[float, int]:
    """(sampling rate q, steps) of one participation over ``n`` examples, exactly as the DP
    loader of ``train_local_dp`` samples them.

    Opacus' ``DPDataLoader`` does not sample at B/n: it includes each example with
    probability q = 1/len(loader) = 1/ceil(n/B) (expected batch n/ceil(n/B) <= B), and
    its sampler runs int(1/q) batches per epoch (one fewer than ceil(n/B) where the
    float 1/q rounds down, at 93 batches for one). The accountant must book this q and
    these steps: this function is the one place both come from, the device passes its q
    to the ledger, and ``train_local_dp`` refuses a loader whose rate differs.
    """
    if n < 1:
        raise ValueError("need at least one example")
    q = 1 / math.ceil(n / settings.batch_size)
    return q, settings.epochs * int(1 / q)


def secret_generator() -> torch.Generator:
    """A CPU torch generator seeded with 64 fresh bits from the OS CSPRNG (``os.urandom``).

    SECURITY: the seed is secret and new on every call, so nobody (the device's own
    ``--seed`` included) can regenerate the stream. torch's generator is Mersenne
    Twister, not a CSPRNG: its 64-bit seed is the secret (brute force costs a DP-SGD
    noise draw per guess, 2^64 guesses), and no raw output is published, only noised
    sums. Opacus' ``secure_mode`` would draw from a CSPRNG per sample and harden the
    noise's floating-point representation (Mironov 2012), but it needs ``torchcsprng``,
    which does not install with this torch.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def train_local_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "ghost",
    sample_rate: float | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """DP-SGD with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise.

    The optimizer is SGD with ``settings.lr`` and ``settings.momentum`` whatever
    ``settings.optimizer`` says (the CLIs refuse another one under DP-SGD).

    ``budget_s`` time-boxes it like ``train_local`` (at least one step); the result's
    ``steps`` are the noised steps that ran, which the accountant books (the budget
    check before training used the planned maximum, ``steps_per_participation``).

    ``sample_rate`` is the q the ledger booked for this run (``steps_per_participation``;
    derived the same way when None). Raises ``ValueError`` if Opacus' DP loader would
    sample at another rate: the accounting would then describe a different mechanism.

    SECURITY: the sampling and the noise come from fresh ``secret_generator()``s, not
    from ``settings.seed`` nor torch's global generator (which the device seeds from
    ``--seed``): two runs with the same seed add independent noise.

    ``ghost`` is Opacus' fast gradient clipping (norms without materialising
    per-sample gradients where a layer supports it: the 1.2M-parameter fc1
    here); ``hooks`` materialises every per-sample gradient.
    """
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    timer = StepTimer(budget_s, clock)  # Opacus' set-up spends the time box too
    data = TensorDataset(to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64)))
    # Poisson sampling is part of the mechanism (amplification by sampling assumes the
    # batches are secret): Opacus' DP loader samples with this loader's generator, at
    # rate 1/len(loader). Check that rate against the booked one before touching anything.
    loader = DataLoader(data, batch_size=settings.batch_size, generator=secret_generator())
    booked = steps_per_participation(len(x), settings)[0] if sample_rate is None else sample_rate
    _check_rate(1 / len(loader), booked)
    apply_activation(model, settings)  # before Opacus wraps the module
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: it needs torchcsprng, which is not
        # installable here. The noise and the sampling come from secret_generator()s.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant="rdp", secure_mode=False)
        out = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            criterion=criterion,
            grad_sample_mode=grad_sample_mode,
            poisson_sampling=True,
            noise_generator=secret_generator(),
        )
    if grad_sample_mode == "ghost":
        private_model, opt, criterion, loader = out
    else:
        private_model, opt, loader = out
    _check_rate(loader.sample_rate, booked)  # what Opacus' DP loader really does
    private_model.train()
    with warnings.catch_warnings():
        # Opacus' fast clipping trips a harmless torch hook warning on every backward.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _dp_epochs(private_model, opt, criterion, loader, settings, len(x), timer)


def _check_rate(loader_rate: float, booked: float) -> None:
    if not math.isclose(loader_rate, booked, rel_tol=1e-12):
        raise ValueError(
            f"the DP loader samples at q={loader_rate} but the accountant booked "
            f"q={booked}: derive both from steps_per_participation"
        )


def _dp_epochs(
    model: nn.Module,
    opt: Any,
    criterion: Any,
    loader: Any,
    settings: TrainSettings,
    n: int,
    timer: StepTimer,
) -> TrainResult:
    steps, total, count, seen, cut = 0, 0.0, 0, 0, False
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if not timer.another():
                cut = True
                break
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            opt.step()
            steps += 1
            timer.ran()
            total += float(loss.item()) * len(xb)
            count += len(xb)
        seen += count
        if cut:
            break
    return TrainResult(min(n, seen) if cut else n, total / max(1, count), steps, cut)
