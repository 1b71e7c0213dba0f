"""The device's privacy: DP-SGD training (Opacus) and budgets that survive restarts.

Two budgets, kept in ``<state dir>/privacy.json`` and written atomically
after every participation:

* sample-level: the RDP of every DP-SGD run this device has done (noise
  multiplier, sampling rate, steps), composed with ``fedcore.dp.rdp`` (the
  same numbers as Opacus' RDP accountant). Before checking in, the device
  projects the epsilon after one more participation and refuses to train
  past its target.
* user-level: the worst-case RDP of each cohort release its masked, noised
  update went into (assuming only the cohort's minimum survived). The device
  refuses a cohort whose release would take it past its user-level target.

The noise multiplier is calibrated once, for ``planned_rounds`` participations
reaching exactly the target, and kept in the file, so a restart does not
change it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_client.train import TrainResult, TrainSettings, apply_activation, to_tensor
from fedcore.dp import rdp

STATE_FILE = "privacy.json"


class BudgetExhausted(Exception):
    """Training or joining would spend more privacy than the device allows."""


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
    """(sampling rate q, steps) of one participation: Poisson batches of expected size B."""
    q = min(1.0, settings.batch_size / n)
    return q, settings.epochs * math.ceil(n / settings.batch_size)


def calibrate_noise(target: float, delta: float, q: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.5%) whose ``steps`` steps stay within ``target``."""

    def eps(sigma: float) -> float:
        return rdp.epsilon(rdp.ORDERS, rdp.sampled_gaussian(q=q, sigma=sigma, steps=steps), delta)[
            0
        ]

    lo, hi = 0.1, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"cannot reach epsilon {target} in {steps} steps")
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


@dataclass
class PrivacyState:
    """What ``privacy.json`` holds."""

    sample_history: list[list[float]] = field(default_factory=list)  # [sigma, q, steps]
    sample_sigma: float | None = None
    sample_delta: float = 1e-5
    user_ledger: rdp.Ledger = field(default_factory=rdp.Ledger)
    user_delta: float = 1e-5

    # -- persistence -------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: Path) -> PrivacyState:
        path = state_dir / STATE_FILE
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text())
            ledger = doc.get("user_ledger") or {}
            return cls(
                sample_history=[
                    [float(a), float(b), float(c)] for a, b, c in doc["sample_history"]
                ],
                sample_sigma=doc.get("sample_sigma"),
                sample_delta=float(doc.get("sample_delta", 1e-5)),
                user_ledger=rdp.Ledger(
                    [float(o) for o in ledger.get("orders", rdp.INTEGER_ORDERS)],
                    [float(r) for r in ledger.get("rdp", [])],
                    int(ledger.get("events", 0)),
                ),
                user_delta=float(doc.get("user_delta", 1e-5)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            # Never reset a budget silently: a device that cannot read what it spent stops.
            raise BudgetExhausted(
                f"{path} is unreadable ({exc}); refusing to guess the spend"
            ) from exc

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "sample_history": self.sample_history,
            "sample_sigma": self.sample_sigma,
            "sample_delta": self.sample_delta,
            "sample_epsilon": self.sample_epsilon(),
            "user_ledger": {
                "orders": self.user_ledger.orders,
                "rdp": self.user_ledger.rdp,
                "events": self.user_ledger.events,
            },
            "user_delta": self.user_delta,
            "user_epsilon": self.user_epsilon(),
        }
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, state_dir / STATE_FILE)  # a crash leaves the old or the new file

    # -- sample level ---------------------------------------------------------------
    def _sample_rdp(self, extra: list[float] | None = None) -> list[float]:
        total = [0.0] * len(rdp.ORDERS)
        for sigma, q, steps in self.sample_history + ([extra] if extra else []):
            part = rdp.sampled_gaussian(q=q, sigma=sigma, steps=int(steps))
            total = [a + b for a, b in zip(total, part, strict=True)]
        return total

    def sample_epsilon(self, extra: list[float] | None = None) -> float:
        if not self.sample_history and not extra:
            return 0.0
        return rdp.epsilon(rdp.ORDERS, self._sample_rdp(extra), self.sample_delta)[0]

    def plan_sample(self, dp: SampleDPSettings, q: float, steps: int) -> float:
        """The noise multiplier for the next participation; raises if it would overspend."""
        self.sample_delta = dp.delta
        if self.sample_sigma is None:
            self.sample_sigma = calibrate_noise(
                dp.target_epsilon, dp.delta, q, steps * dp.planned_rounds
            )
        spent = self.sample_epsilon()
        after = self.sample_epsilon([self.sample_sigma, q, steps])
        if after > dp.target_epsilon * 1.0001:
            raise BudgetExhausted(
                f"sample-level privacy budget: spent epsilon {spent:.3f} in "
                f"{len(self.sample_history)} participations; one more would reach {after:.3f} "
                f"> target {dp.target_epsilon} (delta {dp.delta}). This device stops training."
            )
        return self.sample_sigma

    # -- user level -----------------------------------------------------------------
    def user_epsilon(self, extra: list[float] | None = None) -> float:
        ledger = self.user_ledger.plus(extra) if extra else self.user_ledger
        if ledger.events == 0:
            return 0.0
        return ledger.epsilon(self.user_delta)

    def check_user(self, worst_rdp: list[float], target: float, delta: float) -> None:
        self.user_delta = delta
        after = self.user_epsilon(worst_rdp)
        if after > target:
            raise BudgetExhausted(
                f"user-level privacy budget: spent epsilon {self.user_epsilon():.3f} in "
                f"{self.user_ledger.events} releases; this cohort's release could bring it to "
                f"{after:.3f} > target {target} (delta {delta}). This device stops joining."
            )


def train_local_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "ghost",
) -> TrainResult:
    """DP-SGD with Opacus: Poisson-sampled batches, per-sample clipping, Gaussian noise.

    ``ghost`` is Opacus' fast gradient clipping (norms without materialising
    per-sample gradients where a layer supports it: the 1.2M-parameter fc1
    here); ``hooks`` materialises every per-sample gradient.
    """
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    apply_activation(model, settings)  # before Opacus wraps the module
    data = TensorDataset(to_tensor(x), torch.from_numpy(np.asarray(y, dtype=np.int64)))
    gen = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(data, batch_size=settings.batch_size, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    criterion = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: its secure mode swaps torch's RNG for a
        # CSPRNG (torchcsprng), which is not installable here; the noise is still Gaussian.
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
        )
    if grad_sample_mode == "ghost":
        private_model, opt, criterion, loader = out
    else:
        private_model, opt, loader = out
    private_model.train()
    with warnings.catch_warnings():
        # Opacus' fast clipping trips a harmless torch hook warning on every backward.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _dp_epochs(private_model, opt, criterion, loader, settings, len(x))


def _dp_epochs(
    model: nn.Module, opt: Any, criterion: Any, loader: Any, settings: TrainSettings, n: int
) -> TrainResult:
    steps, total, count = 0, 0.0, 0
    for _ in range(settings.epochs):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(xb) == 0:  # Poisson sampling can draw an empty batch
                continue
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.item()) * len(xb)
            count += len(xb)
    return TrainResult(n, total / max(1, count), steps)
