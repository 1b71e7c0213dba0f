"""The device loop: poll, check in, wait for a cohort, train, upload, repeat.

Every step is a read or a write-once put of this device's own objects, so
Ctrl-C or a crash at any point leaves nothing half-written: on restart the
device simply checks in again (an unused check-in expires; an unfinished
cohort counts it as a dropout).
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from edge_client.train import TrainSettings, train_local
from fedcore.errors import IntegrityError, NotFoundError, StorageError, UnusableUpdateError
from fedcore.messages import CohortConfig, Mode
from fedcore.modelspec import num_parameters
from fedcore.participant import Participant
from fedcore.secure_round import SecureRound, run_secure_cohort


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


@dataclass(frozen=True)
class UserDPRequirement:
    """What this device demands of a cohort's user-level DP, and its own cap."""

    target_epsilon: float = 10.0  # total user-level epsilon this device will spend
    delta: float = 1e-5
    min_noise: float = 0.0  # refuse cohorts with a smaller noise multiplier
    max_clip: float = math.inf  # refuse cohorts with a larger clip


@dataclass(frozen=True)
class DevicePrivacy:
    state_dir: Path
    sample: SampleDPSettings | None = None
    user: UserDPRequirement | None = None


def say(client_id: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {client_id}: {msg}", file=sys.stderr, flush=True)


class Device:
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
        self.x, self.y = x, y
        self.train = train
        self.loop = loop
        self.log = log or (lambda m: say(participant.client_id, m))
        self.stop = stop or threading.Event()
        self.rounds = 0
        self._last_base = -1
        self._loss = float("nan")

    def _sleep(self, delay: float) -> None:
        self.stop.wait(
            delay * random.uniform(0.5, 1.5)
        )  # jitter: devices must not poll in lockstep

    def _wait_for_version(self) -> int | None:
        """Poll the pointer (conditional GET) until there is something new to train on."""
        delay = self.loop.poll_s
        waited_msg = False
        while not self.stop.is_set():
            try:
                pointer, changed = self.p.poll_latest()
            except NotFoundError:
                self.log("no global model yet (bucket not seeded); waiting")
                self._sleep(delay)
                delay = min(delay * 2, self.loop.max_poll_s)
                continue
            except (StorageError, IntegrityError) as exc:
                # A malformed pointer is someone else's fault; the next write may fix it.
                self.log(f"cannot read the pointer ({exc}); backing off")
                self._sleep(delay)
                delay = min(delay * 2, self.loop.max_poll_s)
                continue
            if self.loop.until_version and pointer.version >= self.loop.until_version:
                self.log(f"global model reached version {pointer.version}; done")
                return None
            if not self.loop.wait_for_new_version or pointer.version > self._last_base:
                return pointer.version
            if not waited_msg:
                self.log(f"waiting for a version newer than {self._last_base}")
                waited_msg = True
            delay = self.loop.poll_s if changed else min(delay * 1.5, self.loop.max_poll_s)
            self._sleep(delay)
        return None

    def run_once(self) -> bool:
        """One participation; False when the loop should end."""
        latest = self._wait_for_version()
        if latest is None:
            return False
        if not self._sample_budget_allows():
            return False
        ticket = self.p.check_in(latest)
        self.log(f"checked in at version {latest}; waiting for a cohort")
        cfg = None
        deadline = time.monotonic() + self.loop.cohort_timeout_s
        while cfg is None and not self.stop.is_set() and time.monotonic() < deadline:
            cfg = self.p.wait_for_cohort(
                ticket,
                timeout_s=self.loop.poll_s * 5,
                poll_s=self.loop.poll_s / 2,
                should_stop=self.stop.is_set,
            )
            if cfg is None and not self.p.checkin_pending(ticket):
                cfg, ticket = self.p.find_cohort(ticket)
                if cfg is None:
                    self.log("check-in expired without a cohort; checking in again")
                    return True
        if cfg is None:
            return not self.stop.is_set()
        self.log(
            f"joined {cfg.cohort_id} ({len(cfg.members)} members, base version {cfg.base_version}, {cfg.mode.value})"
        )
        if cfg.mode != self.p.mode:
            self.log(
                f"refusing {cfg.cohort_id}: it runs {cfg.mode.value!r} but this device runs {self.p.mode!r}"
            )
            self._last_base = cfg.base_version
            return True
        if (refusal := self._user_dp_refusal(cfg)) is not None:
            self.log(refusal)
            return False
        if cfg.mode is Mode.SECAGG:
            drop = self.loop.drop_at if random.random() < self.loop.drop_prob else None
            outcome = run_secure_cohort(
                self.p, cfg, lambda: self._train(cfg), drop_at=drop, poll_s=self.loop.poll_s / 2,
                should_stop=self.stop.is_set, say=self.log, on_uploaded=self._book_release,
            )  # fmt: skip
            self.log(f"{cfg.cohort_id}: {outcome}")
        else:
            try:
                delta, n = self._train(cfg)
            except (UnusableUpdateError, IntegrityError) as exc:  # diverged, or a corrupt base
                self.log(f"{cfg.cohort_id}: {exc}")
                self._last_base = cfg.base_version
                return True
            self.p.upload_plain(cfg, delta, num_samples=n, loss=self._loss)
            self.log(f"uploaded update to {cfg.cohort_id} (plaintext)")
        self._last_base = cfg.base_version
        self.rounds += 1
        return not (self.loop.max_rounds and self.rounds >= self.loop.max_rounds)

    # -- privacy ------------------------------------------------------------------
    def _sample_budget_allows(self) -> bool:
        if self.privacy is None or self.privacy.sample is None or self.budget is None:
            return True
        q, steps = steps_per_participation(len(self.x), self.train)
        try:
            self._dp_plan = (self.budget.plan_sample(self.privacy.sample, q, steps), q)
        except BudgetExhausted as exc:
            self.log(f"refusing to train: {exc}")
            return False
        return True

    def _user_dp_refusal(self, cfg: CohortConfig) -> str | None:
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
        try:
            self.budget.check_user(
                dp.worst_case_rdp(cfg.min_members, num_parameters()),
                want.target_epsilon,
                want.delta,
            )
        except BudgetExhausted as exc:
            return f"refusing {cfg.cohort_id}: {exc}"
        return None

    def _book_release(self, rnd: SecureRound) -> None:
        """The masked, noised update is out: its release's worst case is spent."""
        if self.privacy is None or self.budget is None or rnd.privacy_rdp is None:
            return
        self.budget.user_ledger = self.budget.user_ledger.plus(rnd.privacy_rdp)
        self.budget.save(self.privacy.state_dir)
        self.log(f"user-level epsilon spent: {self.budget.user_epsilon():.3f}")

    def _train(self, cfg: CohortConfig) -> tuple[dict[str, np.ndarray], int]:
        base = self.p.fetch_model(cfg.base_version)
        model = build(base)
        t0 = time.monotonic()
        sample = self.privacy.sample if self.privacy else None
        if sample is not None and self.budget is not None and self._dp_plan is not None:
            sigma, q = self._dp_plan
            result = train_local_dp(
                model, self.x, self.y, self.train, noise_multiplier=sigma,
                max_grad_norm=sample.max_grad_norm, grad_sample_mode=sample.grad_sample_mode,
            )  # fmt: skip
            self.budget.sample_history.append([sigma, q, float(result.steps)])
            self.budget.save(self.privacy.state_dir)  # type: ignore[union-attr]
            self.log(
                f"DP-SGD (noise {sigma:.3f}, clip {sample.max_grad_norm}): "
                f"sample-level epsilon spent {self.budget.sample_epsilon():.3f} "
                f"of {sample.target_epsilon} (delta {sample.delta})"
            )
        else:
            result = train_local(model, self.x, self.y, self.train, progress=self.log)
        self._loss = result.loss
        self.log(
            f"trained {result.num_samples} samples in {time.monotonic() - t0:.1f}s, loss {result.loss:.4f}"
        )
        delta = {k: v - base[k] for k, v in to_numpy(model).items()}
        if not all(np.isfinite(v).all() for v in delta.values()):
            raise UnusableUpdateError(
                f"training from version {cfg.base_version} diverged (loss {result.loss:.4g}); "
                "sitting this cohort out"
            )
        return delta, result.num_samples

    def run(self) -> int:
        torch.manual_seed(self.train.seed)
        while not self.stop.is_set() and self.run_once():
            pass
        return self.rounds
