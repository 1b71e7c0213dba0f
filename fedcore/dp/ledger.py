"""The one privacy ledger: what a device has spent, what it may spend, and each device's
spend composed over published releases. Torch-free, so the device, the demo and the
simulator all compose privacy with this code.

SECURITY: a budget only protects anyone if it cannot be re-opened. The target epsilon
and delta are therefore fixed in the ledger file at its first use; a later run that asks
for a larger epsilon or delta is refused (``BudgetRaisedError``) until an operator resets
the ledger on purpose (``DeviceLedger.reset``), and an unreadable ledger stops the device
(``LedgerUnreadableError``) instead of starting from zero.

Two budgets per device, kept in ``<state dir>/privacy.json`` and written atomically after
every participation:

* sample level: every DP-SGD run this device has done (noise multiplier, Poisson
  sampling rate, steps), composed with PLD accounting (``fedcore.dp.pld``, Google's
  ``dp_accounting``), which governs: the noise is calibrated with it and the budget is
  checked against it. The RDP epsilon of the same history (``fedcore.dp.rdp``, the
  numbers of Opacus' RDP accountant) is kept beside it as a cross-check; PLD states the
  smaller epsilon for the same noise, so the device adds less noise for its target.
  Before checking in, the device projects the epsilon after one more participation and
  refuses to train past its target.
* user level: the worst-case RDP of each cohort release its masked, noised update went
  into (assuming only the cohort's minimum survived), amplified where the device's own
  random check-in coin justifies it (``fedcore.dp.amplification``). The device refuses a
  cohort whose release would take it past its user-level target. The same releases
  without amplification are kept beside it (``user_epsilon_unamplified``): the spend if
  the coins were ever learnt. This stays RDP: the releases carry distributed Skellam
  noise, which ``dp_accounting``'s PLD does not cover.

RDP composes by addition at each order (Mironov 2017, "Rényi Differential Privacy",
proposition 1); the conversion to (epsilon, delta) is ``rdp.epsilon``.

``privacy.json`` from before PLD (no ``sample_epsilon_rdp``) loads unchanged: the history
is recomputed under both accountants, and a noise multiplier calibrated with RDP is kept
(PLD only finds it spends less).

``ReleaseTally`` composes what published versions state instead (their survivors'
noise): the guarantee a release carries, per member device, which the demo and the
many-device simulator report.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from fedcore.dp import pld, rdp
from fedcore.errors import (
    BudgetExceededError,
    BudgetRaisedError,
    IntegrityError,
    LedgerUnreadableError,
)

STATE_FILE = "privacy.json"
RESET_FLAG = "--reset-privacy-ledger"  # named in refusals, so an operator knows the way out
SAMPLE_ACCOUNTANT = "pld"  # the accountant sample-level budgets are held to; RDP cross-checks
_SLACK = 1.0001  # calibration lands within 0.5% above the target; bisection noise, not spend


@dataclass(frozen=True)
class Budget:
    """An (epsilon, delta) target: epsilon > 0, 0 < delta < 1."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise ValueError(f"need epsilon > 0 and 0 < delta < 1 (got {self})")

    def admits(self, other: Budget) -> bool:
        """Whether ``other`` is at most this budget: (eps', delta')-DP with eps' <= eps and
        delta' <= delta implies (eps, delta)-DP, so a stricter run keeps the promise."""
        return other.epsilon <= self.epsilon and other.delta <= self.delta

    def to_dict(self) -> dict[str, float]:
        return {"epsilon": self.epsilon, "delta": self.delta}

    @classmethod
    def from_dict(cls, doc: object) -> Budget | None:
        if doc is None:
            return None
        if not isinstance(doc, Mapping):
            raise TypeError(f"a budget is an object, got {type(doc).__name__}")
        return cls(float(doc["epsilon"]), float(doc["delta"]))


class SampleTerms(Protocol):
    """What the ledger needs of a device's DP-SGD settings (``SampleDPSettings``)."""

    @property
    def target_epsilon(self) -> float: ...

    @property
    def delta(self) -> float: ...

    @property
    def planned_rounds(self) -> int: ...


def calibrate_noise(target: float, delta: float, q: float, steps: int) -> float:
    """The smallest noise multiplier (to 0.5%) whose ``steps`` sampled-Gaussian steps at
    rate ``q`` stay within ``target`` epsilon at ``delta`` under RDP accounting; bisection
    on a log scale. The RDP cross-check: the device plans with PLD
    (``fedcore.dp.pld.calibrate_noise``), which needs less noise for the same target.

    Raises ``ValueError`` when no multiplier up to 1e4 reaches the target.
    """

    def eps(sigma: float) -> float:
        curve = rdp.sampled_gaussian(q=q, sigma=sigma, steps=steps)
        return rdp.epsilon(rdp.ORDERS, curve, delta)[0]

    lo, hi = 0.1, 1.0
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"cannot reach epsilon {target} in {steps} steps")
    while hi / lo > 1.005:
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if eps(mid) > target else (lo, mid)
    return hi


def _read_rdp_ledger(doc: object) -> rdp.Ledger | None:
    """An RDP ledger as ``_rdp_ledger_doc`` wrote it; None when absent."""
    if not doc:
        return None
    if not isinstance(doc, Mapping):
        raise TypeError(f"an RDP ledger is an object, got {type(doc).__name__}")
    return rdp.Ledger(
        [float(o) for o in doc.get("orders", rdp.INTEGER_ORDERS)],
        [float(r) for r in doc.get("rdp", [])],
        int(doc.get("events", 0)),
    )


def _rdp_ledger_doc(ledger: rdp.Ledger) -> dict[str, object]:
    return {"orders": ledger.orders, "rdp": ledger.rdp, "events": ledger.events}


def _fix(kind: str, stored: Budget | None, asked: Budget) -> Budget:
    """The budget to hold this run to: ``asked`` if the stored one admits it; refuse more."""
    if stored is None or stored.admits(asked):
        return stored or asked
    raise BudgetRaisedError(
        f"{kind} privacy budget was fixed at first use to epsilon {stored.epsilon} "
        f"(delta {stored.delta}) in {STATE_FILE}; this run asks for epsilon {asked.epsilon} "
        f"(delta {asked.delta}). A restart may not raise the budget: run with a budget no "
        f"larger than the fixed one, or reset the ledger explicitly ({RESET_FLAG}), which "
        f"starts the device's privacy accounting over."
    )


@dataclass
class DeviceLedger:
    """What ``privacy.json`` holds: the spend at both levels and the budgets fixed at first
    use. ``load``, mutate through ``plan_sample``/``record_sample``/``check_user``/
    ``record_release``, then ``save``."""

    sample_history: list[list[float]] = field(default_factory=list)  # [sigma, q, steps]
    sample_sigma: float | None = None  # calibrated once, so a restart keeps the same noise
    sample_delta: float = 1e-5
    user_ledger: rdp.Ledger = field(default_factory=rdp.Ledger)  # booked: amplified if justified
    user_delta: float = 1e-5
    sample_budget: Budget | None = None  # fixed at first use
    user_budget: Budget | None = None  # fixed at first use
    # The same releases without amplification; None: as booked (a file from before it).
    user_unamplified: rdp.Ledger | None = None

    # -- persistence -------------------------------------------------------------
    @classmethod
    def load(cls, state_dir: Path) -> DeviceLedger:
        """The ledger in ``state_dir``, or an empty one if there is none yet.

        Raises ``LedgerUnreadableError`` if the file exists but cannot be parsed.
        """
        path = state_dir / STATE_FILE
        if not path.exists():
            return cls()
        try:
            doc = json.loads(path.read_text())
            return cls(
                sample_history=[
                    [float(a), float(b), float(c)] for a, b, c in doc["sample_history"]
                ],
                sample_sigma=doc.get("sample_sigma"),
                sample_delta=float(doc.get("sample_delta", 1e-5)),
                user_ledger=_read_rdp_ledger(doc.get("user_ledger")) or rdp.Ledger(),
                user_delta=float(doc.get("user_delta", 1e-5)),
                sample_budget=Budget.from_dict(doc.get("sample_budget")),
                user_budget=Budget.from_dict(doc.get("user_budget")),
                user_unamplified=_read_rdp_ledger(doc.get("user_ledger_unamplified")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Never reset a budget silently: a device that cannot read what it spent stops.
            raise LedgerUnreadableError(
                f"{path} is unreadable ({exc}); refusing to guess the spend"
            ) from exc

    def save(self, state_dir: Path) -> None:
        """Write atomically: a crash leaves the old file or the new one, never half of it."""
        state_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "sample_history": self.sample_history,
            "sample_sigma": self.sample_sigma,
            "sample_delta": self.sample_delta,
            "sample_accountant": SAMPLE_ACCOUNTANT,
            "sample_epsilon": self.sample_epsilon(),  # the governing (PLD) epsilon
            "sample_epsilon_rdp": self.sample_epsilon_rdp(),  # the RDP cross-check
            "sample_budget": self.sample_budget.to_dict() if self.sample_budget else None,
            "user_ledger": _rdp_ledger_doc(self.user_ledger),
            "user_delta": self.user_delta,
            "user_epsilon": self.user_epsilon(),
            "user_ledger_unamplified": _rdp_ledger_doc(self.unamplified()),
            "user_epsilon_unamplified": self.user_epsilon_unamplified(),
            "user_budget": self.user_budget.to_dict() if self.user_budget else None,
        }
        tmp = state_dir / (STATE_FILE + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(doc, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_dir / STATE_FILE)

    @staticmethod
    def reset(state_dir: Path) -> Path | None:
        """Start the privacy accounting over, on an operator's explicit request.

        The old ledger is not deleted: it is renamed to ``privacy.json.reset-<UTC time>``
        beside the new one, so what was spent stays on record. Returns that path, or None
        when there was no ledger.
        """
        path = state_dir / STATE_FILE
        if not path.exists():
            return None
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        kept = path.with_name(f"{STATE_FILE}.reset-{stamp}")
        n = 1
        while kept.exists():  # never overwrite an earlier record
            n += 1
            kept = path.with_name(f"{STATE_FILE}.reset-{stamp}-{n}")
        os.replace(path, kept)
        return kept

    # -- sample level ---------------------------------------------------------------
    def _sample_rdp(self, extra: list[float] | None = None) -> list[float]:
        total = [0.0] * len(rdp.ORDERS)
        for sigma, q, steps in self.sample_history + ([extra] if extra else []):
            part = rdp.sampled_gaussian(q=q, sigma=sigma, steps=int(steps))
            total = [a + b for a, b in zip(total, part, strict=True)]
        return total

    def sample_epsilon(self, extra: list[float] | None = None) -> float:
        """Sample-level epsilon spent (at ``sample_delta``) under PLD accounting, the one
        the budget is held to, with ``extra`` [sigma, q, steps] as if one more
        participation had run. Needs ``dp_accounting`` once there is a history."""
        runs = self.sample_history + ([extra] if extra else [])
        if not runs:
            return 0.0
        return pld.composed_epsilon(runs, delta=self.sample_delta)

    def sample_epsilon_rdp(self, extra: list[float] | None = None) -> float:
        """The same spend under RDP accounting: the cross-check (at least the PLD epsilon
        up to discretisation; it is what a ledger reported before PLD)."""
        if not self.sample_history and not extra:
            return 0.0
        return rdp.epsilon(rdp.ORDERS, self._sample_rdp(extra), self.sample_delta)[0]

    def describe_sample(self) -> str:
        """The sample-level spend under both accountants, for a device's log line."""
        name = SAMPLE_ACCOUNTANT.upper()
        return (
            f"sample-level epsilon spent {self.sample_epsilon():.3f} ({name}; "
            f"RDP {self.sample_epsilon_rdp():.3f}) at delta {self.sample_delta:g}"
        )

    def plan_sample(self, dp: SampleTerms, q: float, steps: int) -> float:
        """The noise multiplier for the next participation of ``steps`` steps at rate ``q``.

        ``q`` must be the DP loader's true sampling rate (``edge_client.privacy.
        steps_per_participation``, which ``train_local_dp`` checks its loader against).
        The first call fixes the sample-level budget and calibrates the noise for
        ``dp.planned_rounds`` participations with PLD accounting. Raises
        ``BudgetRaisedError`` if ``dp`` asks for more than the fixed budget,
        ``BudgetExceededError`` if one more participation would overspend.
        """
        asked = Budget(dp.target_epsilon, dp.delta)
        self.sample_budget = _fix("sample-level", self.sample_budget, asked)
        self.sample_delta = asked.delta
        if self.sample_sigma is None:
            self.sample_sigma = pld.calibrate_noise(
                target_epsilon=asked.epsilon,
                delta=asked.delta,
                q=q,
                steps=steps * dp.planned_rounds,
            )
        spent = self.sample_epsilon()
        after = self.sample_epsilon([self.sample_sigma, q, steps])
        if after > asked.epsilon * _SLACK:
            by_rdp = self.sample_epsilon_rdp([self.sample_sigma, q, steps])
            raise BudgetExceededError(
                f"sample-level privacy budget: spent epsilon {spent:.3f} in "
                f"{len(self.sample_history)} participations; one more would reach {after:.3f} "
                f"> target {asked.epsilon} (delta {asked.delta}; "
                f"{SAMPLE_ACCOUNTANT.upper()} accounting, RDP would say {by_rdp:.3f}). "
                "This device stops training."
            )
        return self.sample_sigma

    def record_sample(self, sigma: float, q: float, steps: int) -> None:
        """Book a DP-SGD run that happened (its actual step count)."""
        self.sample_history.append([float(sigma), float(q), float(steps)])

    # -- user level -----------------------------------------------------------------
    def user_epsilon(self, extra: list[float] | None = None) -> float:
        """User-level epsilon spent (at ``user_delta``), with ``extra`` an RDP curve on the
        ledger's orders as if one more release had happened."""
        ledger = self.user_ledger.plus(extra) if extra else self.user_ledger
        if ledger.events == 0:
            return 0.0
        return ledger.epsilon(self.user_delta)

    def check_user(self, worst_rdp: list[float], target: float, delta: float) -> None:
        """Refuse a release of RDP ``worst_rdp`` that would take the device past ``target``.

        The first call fixes the user-level budget. Raises ``BudgetRaisedError`` for a
        larger (target, delta) than the fixed one, ``BudgetExceededError`` to overspend.
        """
        asked = Budget(target, delta)
        self.user_budget = _fix("user-level", self.user_budget, asked)
        self.user_delta = asked.delta
        after = self.user_epsilon(worst_rdp)
        if after > asked.epsilon:
            raise BudgetExceededError(
                f"user-level privacy budget: spent epsilon {self.user_epsilon():.3f} in "
                f"{self.user_ledger.events} releases; this cohort's release could bring it to "
                f"{after:.3f} > target {asked.epsilon} (delta {asked.delta}). "
                "This device stops joining."
            )

    def record_release(
        self, worst_rdp: Sequence[float], *, unamplified: Sequence[float] | None = None
    ) -> None:
        """Book a release this device's noised update went into (its worst case):
        ``worst_rdp`` as booked (amplified where justified), ``unamplified`` the same
        release without amplification (None: the same curve)."""
        before = self.unamplified()
        self.user_ledger = self.user_ledger.plus(list(worst_rdp))
        self.user_unamplified = before.plus(list(unamplified or worst_rdp))

    def unamplified(self) -> rdp.Ledger:
        """The user-level releases without amplification (a ledger from before amplification
        booked none: its ``user_ledger`` is that)."""
        if self.user_unamplified is not None:
            return self.user_unamplified
        return rdp.Ledger(list(self.user_ledger.orders), list(self.user_ledger.rdp),
                          self.user_ledger.events)  # fmt: skip

    def user_epsilon_unamplified(self) -> float:
        """User-level epsilon of the same releases were every coin known (at ``user_delta``):
        what the device would have spent without random check-ins. At least ``user_epsilon``."""
        ledger = self.unamplified()
        return ledger.epsilon(self.user_delta) if ledger.events else 0.0


# ------------------------------------------------------------------------- releases
@dataclass(frozen=True)
class Release:
    """One published version's user-level guarantee, as its metadata states it
    (``DistributedDP.release``: the survivors' noise, composed per member)."""

    orders: tuple[float, ...]
    rdp: tuple[float, ...]
    delta: float
    epsilon: float
    stated: Mapping[str, object]  # the metadata's whole ``user_level`` object

    @classmethod
    def from_metrics(cls, privacy: object, *, where: str = "release") -> Release | None:
        """Parse a version's ``metrics["privacy"]``; None when it has no user-level DP.

        Raises ``IntegrityError`` (naming ``where``) for malformed accounting, which is
        read from the bucket and never trusted blindly.
        """
        user = privacy.get("user_level") if isinstance(privacy, Mapping) else None
        if not user:
            return None
        try:
            if not isinstance(user, Mapping):
                raise TypeError(f"user_level is a {type(user).__name__}")
            orders = tuple(float(o) for o in user["rdp_orders"])
            curve = tuple(float(r) for r in user["rdp"])
            release = cls(orders, curve, float(user["delta"]), float(user["epsilon"]), user)
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"{where}: malformed user-level privacy ({exc!r})") from exc
        if len(orders) != len(curve) or not orders or not 0 < release.delta < 1:
            raise IntegrityError(f"{where}: user-level privacy orders, curve or delta invalid")
        return release


class ReleaseTally:
    """User-level spend composed over published releases: each member device's (the
    releases it was in) and that of a device in every release (an upper bound)."""

    def __init__(self) -> None:
        self.ledgers: dict[str, rdp.Ledger] = {}
        self.epsilons: dict[str, float] = {}  # each at the delta of its latest release
        self.every: rdp.Ledger | None = None
        self.last: Release | None = None

    def add(
        self, privacy: object, members: Iterable[str] = (), *, where: str = "release"
    ) -> Release | None:
        """Compose one version's release into its members' ledgers; None (and nothing
        composed) when the version carries no user-level DP."""
        release = Release.from_metrics(privacy, where=where)
        if release is None:
            return None
        self.every = self._plus(self.every, release, where)
        for m in members:
            self.ledgers[m] = self._plus(self.ledgers.get(m), release, where)
            self.epsilons[m] = self.ledgers[m].epsilon(release.delta)
        self.last = release
        return release

    @staticmethod
    def _plus(ledger: rdp.Ledger | None, release: Release, where: str) -> rdp.Ledger:
        ledger = ledger or rdp.Ledger(orders=list(release.orders))
        if ledger.orders != list(release.orders):
            raise IntegrityError(f"{where}: user-level RDP orders differ from earlier releases")
        return ledger.plus(release.rdp)

    def every_release_epsilon(self, delta: float) -> float:
        """Epsilon of a device that was a member of every release so far (0 before any)."""
        return self.every.epsilon(delta) if self.every else 0.0

    def device_spread(self) -> tuple[float, float, int]:
        """(max, median, count) of the per-device epsilons; the median is the upper one."""
        spent = sorted(self.epsilons.values())
        if not spent:
            return 0.0, 0.0, 0
        return spent[-1], spent[len(spent) // 2], len(spent)
