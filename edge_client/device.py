"""The device loop: poll, check in, wait for a cohort, train, upload, repeat.

The protocol itself is ``fedcore.device``'s machine; this module adds what needs
torch (training, DP-SGD) and the device's privacy ledger, and drives the machine.

Every step is a read or a write-once put of this device's own objects, so
Ctrl-C or a crash at any point leaves nothing half-written: on restart the
device simply checks in again (an unused check-in expires; an unfinished
cohort counts it as a dropout).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from edge_client.model import build, to_numpy
from edge_client.privacy import (
    BudgetExhausted,
    PrivacyState,
    SampleDPSettings,
    steps_per_participation,
    train_local_dp,
)
from edge_client.train import TrainSettings, train_local, warm_up
from fedcore.device import (
    LINES,
    DropPoint,
    Polling,
    RandomDrop,
    Runner,
    Settings,
    Update,
    drive,
    machine,
)
from fedcore.dp.amplification import booked_rate, booked_rdp, draw_checkin
from fedcore.errors import UnusableUpdateError
from fedcore.messages import CohortConfig, Mode
from fedcore.modelspec import num_parameters
from fedcore.participant import Participant

lines = logging.getLogger(LINES)


@dataclass(frozen=True)
class LoopSettings:
    max_rounds: int = 0  # 0: no limit
    until_version: int = 0  # stop once the global model reaches this version (0: never)
    poll_s: float = 1.0
    max_poll_s: float = 10.0
    wait_for_new_version: bool = True  # do not train twice from the same base
    cohort_timeout_s: float = 600.0
    drop_prob: float = 0.0  # chance per cohort of vanishing at ``drop_at`` (dropout experiments)
    drop_at: str = "inputs"
    # The fewest inputs a secure cohort may complete with for this device to take part
    # (``fedcore.device.machine.DEVICE_MIN_SURVIVORS``: two would reveal one member to the other).
    min_survivors: int = machine.DEVICE_MIN_SURVIVORS


@dataclass(frozen=True)
class UserDPRequirement:
    """What this device demands of a cohort's user-level DP, and its own cap."""

    target_epsilon: float = 10.0  # total user-level epsilon this device will spend
    delta: float = 1e-5
    min_noise: float = 0.0  # refuse cohorts with a smaller noise multiplier
    max_clip: float = math.inf  # refuse cohorts with a larger clip
    # Random check-in (fedcore.dp.amplification): the chance, per cohort, that this device's
    # update goes into the sum (zeros otherwise). 1.0: always, no amplification booked.
    checkin_p: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.checkin_p <= 1:
            raise ValueError(f"checkin_p must be in (0, 1] (got {self.checkin_p})")


@dataclass(frozen=True)
class DevicePrivacy:
    state_dir: Path
    sample: SampleDPSettings | None = None
    user: UserDPRequirement | None = None


def say(client_id: str, msg: str) -> None:
    """One of the device's lines (``log_to_terminal`` shows them as before: time, id, text)."""
    lines.info(msg, extra={"client_id": client_id})


def log_to_terminal(stream: TextIO | None = None) -> None:
    """Show the device's lines on stderr as ``[HH:MM:SS] client-id: text`` (the CLI's view)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "[%(asctime)s] %(client_id)s: %(message)s", "%H:%M:%S", defaults={"client_id": "-"}
        )
    )
    logger = logging.getLogger(LINES)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class Device:
    """One device: ``fedcore.device``'s machine, driven in a blocking loop, with torch training.

    The loop only performs the machine's actions (``fedcore.device.drive``): it
    polls and sleeps with jitter, and answers the machine's questions to the
    device itself (``LocalDevice``: train, sample- and user-level DP terms).
    """

    def __init__(
        self,
        participant: Participant,
        x: np.ndarray,
        y: np.ndarray,
        train: TrainSettings,
        loop: LoopSettings,
        *,
        log: Callable[[str], None] | None = None,
        stop: threading.Event | None = None,
        privacy: DevicePrivacy | None = None,
    ) -> None:
        self.p = participant
        self.privacy = privacy
        self.budget = PrivacyState.load(privacy.state_dir) if privacy else None
        self._dp_plan: tuple[float, float] | None = None  # (noise multiplier, sampling rate)
        # The open cohort's id and the rate its release is booked at (random check-in).
        self._checkin: tuple[str, float] | None = None
        self._dimension: int | None = None  # the model's parameter count, once fetched
        self.x, self.y = x, y
        self.train = train
        self.loop = loop
        self.log = log or (lambda m: say(participant.client_id, m))
        self.stop = stop or threading.Event()
        self.rounds = 0
        self.train_seconds = 0.0  # of the last local training

    def _sleep(self, delay: float) -> None:
        self.stop.wait(
            delay * random.uniform(0.5, 1.5)
        )  # jitter: devices must not poll in lockstep

    def settings(self) -> Settings:
        """This device's terms for the protocol machine."""
        return Settings(
            self.p.client_id, Mode(self.p.mode), until_version=self.loop.until_version,
            max_rounds=self.loop.max_rounds, wait_for_new_version=self.loop.wait_for_new_version,
            cohort_timeout_s=self.loop.cohort_timeout_s, min_survivors=self.loop.min_survivors,
        )  # fmt: skip

    def runner(self) -> Runner:
        """Performs the machine's actions for this device (blocking, jittered, stoppable)."""
        poll = self.loop.poll_s
        return Runner(
            self.p, self, drop=RandomDrop(DropPoint(self.loop.drop_at), self.loop.drop_prob),
            polling=Polling(
                pointer_s=poll, max_pointer_s=self.loop.max_poll_s, cohort_s=poll / 2,
                checkin_check_s=poll * 5, phase_s=poll / 2,
            ),
            sleep=self._sleep, should_stop=self.stop.is_set,
        )  # fmt: skip

    def run(self) -> int:
        """Participate until the machine is done (or ``stop`` is set); the participations."""
        torch.manual_seed(self.train.seed)
        warm_up()  # before the first check-in: no cohort's time box pays a cold start
        state, actions = machine.start(self.settings())
        self.rounds = drive(self.runner(), state, actions).rounds
        return self.rounds

    # -- privacy ------------------------------------------------------------------
    def sample_budget_refusal(self) -> str | None:
        """Why the sample-level budget refuses one more participation; plans its noise if not."""
        if self.privacy is None or self.privacy.sample is None or self.budget is None:
            return None
        q, steps = steps_per_participation(len(self.x), self.train)
        try:
            self._dp_plan = (self.budget.plan_sample(self.privacy.sample, q, steps), q)
        except BudgetExhausted as exc:
            return f"refusing to train: {exc}"
        return None

    def user_dp_refusal(self, cfg: CohortConfig) -> str | None:
        """Why this device will not join ``cfg`` under its user-level DP terms, if it will not."""
        want = self.privacy.user if self.privacy else None
        if want is None or self.budget is None:
            return None
        if (dp := cfg.dp) is None:
            return f"refusing {cfg.cohort_id}: it has no user-level DP and this device requires it"
        if dp.noise_multiplier < want.min_noise or dp.clip > want.max_clip:
            return (
                f"refusing {cfg.cohort_id}: noise {dp.noise_multiplier} / clip {dp.clip} is weaker "
                f"than this device's minimum noise {want.min_noise} / maximum clip {want.max_clip}"
            )
        # Amplification only where the coin stays hidden (booked_rate: masked, noised sums).
        rate = booked_rate(
            want.checkin_p, secure=cfg.mode is Mode.SECAGG, distributed_dp=cfg.dp is not None
        )
        worst = dp.worst_case_rdp(cfg.min_members, self.model_dimension(cfg.base_version))
        try:
            self.budget.check_user(booked_rdp(worst, rate), want.target_epsilon, want.delta)
        except BudgetExhausted as exc:
            return f"refusing {cfg.cohort_id}: {exc}"
        self._checkin = (cfg.cohort_id, rate)
        if rate < 1:
            self.log(
                f"{cfg.cohort_id}: random check-in, this device's update goes in with "
                f"probability {rate:g}; booking the amplified release"
            )
        return None

    def _rate(self, cfg: CohortConfig) -> float:
        """The check-in rate admitted for ``cfg`` (1.0: always contribute, unamplified)."""
        if self._checkin is None or self._checkin[0] != cfg.cohort_id:
            return 1.0
        return self._checkin[1]

    def book_release(self, rdp: Sequence[float]) -> None:
        """The masked, noised update is out: its release's worst case is spent, amplified
        at the rate admitted for this cohort. The same curve is booked whichever way the
        coin fell, so the spend (and when the budget runs out) never reveals it."""
        if self.privacy is None or self.budget is None:
            return
        rate = self._checkin[1] if self._checkin is not None else 1.0
        self._checkin = None
        self.budget.record_release(booked_rdp(rdp, rate), unamplified=list(rdp))
        self.budget.save(self.privacy.state_dir)
        extra = ""
        if rate < 1:
            extra = f" (without random check-ins: {self.budget.user_epsilon_unamplified():.3f})"
        self.log(f"user-level epsilon spent: {self.budget.user_epsilon():.3f}{extra}")

    def model_dimension(self, version: int) -> int:
        """The parameter count of the model this federation trains (every version has
        the schema version 0 was seeded with), fetched once: a release's sensitivity
        after quantization grows with it, so the device books the model it trains."""
        if self._dimension is None:
            self._dimension = num_parameters(
                {k: v.shape for k, v in self.p.fetch_model(version).items()}
            )
        return self._dimension

    def train_update(self, cfg: CohortConfig, *, budget_s: float | None = None) -> Update:
        """Train from ``cfg``'s base version (UnusableUpdateError if it diverged), as many
        steps as fit in ``budget_s`` (the machine's time box before the inputs deadline)."""
        t0 = time.monotonic()
        base = self.p.fetch_model(cfg.base_version)
        model = build(base)
        if budget_s is not None:  # the download and the model's set-up spend the box too
            budget_s = max(0.0, budget_s - (time.monotonic() - t0))
        sample = self.privacy.sample if self.privacy else None
        if sample is not None and self.budget is not None and self._dp_plan is not None:
            sigma, q = self._dp_plan
            result = train_local_dp(
                model, self.x, self.y, self.train, noise_multiplier=sigma,
                max_grad_norm=sample.max_grad_norm, grad_sample_mode=sample.grad_sample_mode,
                budget_s=budget_s,
            )  # fmt: skip
            # Book the noised steps that ran (a time box may cut them short); the budget
            # check before training planned the full participation.
            self.budget.sample_history.append([sigma, q, float(result.steps)])
            self.budget.save(self.privacy.state_dir)  # type: ignore[union-attr]
            self.log(
                f"DP-SGD (noise {sigma:.3f}, clip {sample.max_grad_norm}): "
                f"sample-level epsilon spent {self.budget.sample_epsilon():.3f} "
                f"of {sample.target_epsilon} (delta {sample.delta})"
            )
        else:
            result = train_local(
                model, self.x, self.y, self.train, progress=self.log, budget_s=budget_s
            )
        took = time.monotonic() - t0
        self.train_seconds = took
        if result.cut_short:
            self.log(
                f"cut local training short after {result.steps} steps ({result.num_samples} of "
                f"{len(self.x)} samples) to meet {cfg.cohort_id}'s inputs deadline"
            )
        self.log(f"trained {result.num_samples} samples in {took:.1f}s, loss {result.loss:.4f}")
        delta = {k: v - base[k] for k, v in to_numpy(model).items()}
        if not all(np.isfinite(v).all() for v in delta.values()):
            raise UnusableUpdateError(
                f"training from version {cfg.base_version} diverged (loss {result.loss:.4g}); "
                "sitting this cohort out"
            )
        # Random check-in: the coin is drawn now, after the cohort's membership is fixed and
        # after training (which runs either way: its time is visible). Tails: zeros go in,
        # clipped, noised and masked like any update. Not logged: the coin is a secret.
        if (rate := self._rate(cfg)) < 1 and not draw_checkin(rate):
            delta = {k: np.zeros_like(v) for k, v in delta.items()}
        return Update(delta, result.num_samples, result.loss)
