"""Server-side parameters, read from the environment the template sets.

Each field of ``ServerSettings`` declares its environment variable once
(``setting(default, "ENV_NAME")``); ``from_env``, the local stack
(``infra.stack``) and the SAM template's Parameters are derived from or
tested against that declaration (``tests/infra/test_settings_template.py``),
so a new setting cannot reach one of them and miss another.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, TypeVar, get_type_hints

from fedcore.messages import MODES
from fedcore.server.apply import STALENESS_WEIGHTS
from fedcore.server.optimizers import OptimizerConfig, ServerOptimizer

T = TypeVar("T")

# How an environment string becomes a field's value; any other field type (an Enum, say)
# is called with the string itself.
_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, str: str}


def setting(default: T, env: str) -> T:
    """A ``ServerSettings`` field with its default and the environment variable it is read
    from (the same name is the Lambda environment variable in template.yaml)."""
    return field(default=default, metadata={"env": env})


@dataclass(frozen=True)
class ServerSettings:
    """Cohort formation, deadlines and the FedBuff apply rule.

    ``cohort_size`` check-ins form a cohort at once; after ``checkin_wait_s``
    the sweeper forms a smaller one from at least ``min_cohort_size``.
    ``round_deadline_s`` bounds each phase; ``stuck_after_s`` is how long a
    closed phase may wait for its finalizer before the sweeper redoes it.
    """

    cohort_size: int = setting(10, "COHORT_SIZE")
    # Fewest check-ins that form a cohort at a deadline, and fewest survivors the function
    # unmasks for: with 2, each survivor could subtract its own update from the sum.
    min_cohort_size: int = setting(3, "MIN_COHORT_SIZE")
    round_deadline_s: float = setting(600.0, "ROUND_DEADLINE_S")
    checkin_wait_s: float = setting(60.0, "CHECKIN_WAIT_S")
    checkin_ttl_s: float = setting(3600.0, "CHECKIN_TTL_S")
    # Check-in URLs the gateway signs per device per minute (0: no limit). An honest device
    # checks in once per cohort it joins; each check-in costs an aggregator invocation.
    checkins_per_minute: int = setting(6, "CHECKINS_PER_MINUTE")
    stuck_after_s: float = setting(120.0, "STUCK_AFTER_S")
    server_lr: float = setting(1.0, "SERVER_LR")
    staleness_weight: str = setting("inverse_sqrt", "STALENESS_WEIGHT")
    # Server update rule on the staleness-weighted cohort mean (fedcore/server/optimizers.py);
    # its learning rate is server_lr. fedavg is the plain FedBuff step and keeps no state.
    # (RUF009: the default is a StrEnum member, immutable like the str defaults.)
    server_optimizer: ServerOptimizer = setting(ServerOptimizer.FEDAVG, "SERVER_OPTIMIZER")  # noqa: RUF009
    server_momentum: float = setting(0.9, "SERVER_MOMENTUM")  # FedAvgM
    server_beta1: float = setting(0.9, "SERVER_BETA1")  # FedAdam, FedYogi, FedAdagrad
    server_beta2: float = setting(0.99, "SERVER_BETA2")  # FedAdam, FedYogi
    server_tau: float = setting(1e-3, "SERVER_TAU")  # adaptivity floor of FedAdam/Yogi/Adagrad
    mode: str = setting("secagg", "AGGREGATION_MODE")
    read_concurrency: int = setting(4, "READ_CONCURRENCY")
    # Time limit of the key, share and unmask rounds.
    short_round_s: float = setting(60.0, "SHORT_ROUND_S")
    # Quantization range [-clip, clip] of weight * delta.
    secagg_clip: float = setting(1.0, "SECAGG_CLIP")
    # Neighbours per member; 0: from secagg_max_dropout; >= n-1: all pairs.
    secagg_degree: int = setting(0, "SECAGG_DEGREE")
    # Dropout rate the default degree is sized for.
    secagg_max_dropout: float = setting(0.1, "SECAGG_MAX_DROPOUT")
    # Neighbours of a member that may collude with a malicious server: t > (k+1+this)/2.
    # Devices refuse a t below their own floor (default 1), so lowering it needs both sides.
    secagg_colluders: int = setting(1, "SECAGG_COLLUDERS")
    # User-level DP noise multiplier z (0: off); needs secagg.
    dp_user_noise: float = setting(0.0, "DP_USER_NOISE")
    # L2 bound C of each member's delta under user-level DP.
    dp_user_clip: float = setting(1.0, "DP_USER_CLIP")
    dp_delta: float = setting(1e-5, "DP_DELTA")
    # Sample count that maps to FedAvg weight 1 (larger counts are capped); plaintext
    # caps each member's weight at the same count.
    secagg_weight_cap: int = setting(10_000, "SECAGG_WEIGHT_CAP")
    # Plaintext: L2 bound of each member's delta, applied by the function. 0: the bound
    # secure mode gives, SECAGG_CLIP * sqrt(number of parameters) (every coordinate
    # within the clip).
    plaintext_clip: float = setting(0.0, "PLAINTEXT_CLIP")
    # Adaptive inputs deadline: this many times the slowest of the recent cohorts' 90th
    # percentile of reported training seconds (0: always round_deadline_s), read from the
    # last deadline_window versions' metrics, within [deadline_min_s, deadline_max_s].
    deadline_margin: float = setting(0.0, "DEADLINE_MARGIN")
    deadline_min_s: float = setting(10.0, "DEADLINE_MIN_S")
    deadline_max_s: float = setting(1800.0, "DEADLINE_MAX_S")
    deadline_window: int = setting(5, "DEADLINE_WINDOW")

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_optimizer", ServerOptimizer(self.server_optimizer))
        if self.cohort_size < 1 or not 1 <= self.min_cohort_size <= self.cohort_size:
            raise ValueError(
                f"need 1 <= min_cohort_size ({self.min_cohort_size}) <= cohort_size ({self.cohort_size})"
            )
        if self.checkins_per_minute < 0:
            raise ValueError("checkins_per_minute must be >= 0 (0: no limit)")
        if self.staleness_weight not in STALENESS_WEIGHTS:
            raise ValueError(f"staleness_weight must be one of {sorted(STALENESS_WEIGHTS)}")
        if self.secagg_colluders < 0:
            raise ValueError("secagg_colluders must be >= 0")
        if not 0.0 <= self.secagg_max_dropout < 0.5:
            raise ValueError("secagg_max_dropout must be in [0, 0.5)")
        if not (self.plaintext_clip >= 0 and math.isfinite(self.plaintext_clip)):
            raise ValueError("plaintext_clip must be finite and >= 0 (0: from secagg_clip)")
        if self.dp_user_noise < 0 or self.dp_user_clip <= 0 or not 0 < self.dp_delta < 1:
            raise ValueError("need dp_user_noise >= 0, dp_user_clip > 0 and 0 < dp_delta < 1")
        if self.dp_user_noise > 0 and self.mode != "secagg":
            raise ValueError(
                "user-level distributed DP adds noise under the masks: it needs AGGREGATION_MODE=secagg"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if (
            self.server_lr <= 0
            or self.round_deadline_s <= 0
            or self.read_concurrency < 1
            or self.short_round_s <= 0
        ):
            raise ValueError("server_lr, round_deadline_s and read_concurrency must be positive")
        if (
            self.deadline_margin < 0
            or not 0 < self.deadline_min_s <= self.deadline_max_s
            or self.deadline_window < 1
        ):
            raise ValueError(
                "need deadline_margin >= 0, 0 < deadline_min_s <= deadline_max_s and "
                "deadline_window >= 1"
            )
        self.optimizer  # noqa: B018  (validates the server optimizer's hyperparameters)

    @property
    def optimizer(self) -> OptimizerConfig:
        """The server update rule with its hyperparameters and ``server_lr``."""
        return OptimizerConfig(
            kind=self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            tau=self.server_tau,
        )

    @classmethod
    def env_names(cls) -> dict[str, str]:
        """Field name -> environment variable, in declaration order."""
        return {f.name: f.metadata["env"] for f in fields(cls)}

    @classmethod
    def parse_env_value(cls, name: str, raw: str) -> Any:
        """The value of field ``name`` from its environment string; a ValueError that names
        the variable if the string is not of the field's type."""
        kind = _field_types()[name]
        try:
            return _PARSERS.get(kind, kind)(raw)
        except ValueError as exc:
            env = cls.env_names()[name]
            raise ValueError(f"{env}={raw!r} is not a valid {kind.__name__}") from exc

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServerSettings:
        """Settings from ``env`` (default ``os.environ``); unset variables keep the defaults."""
        e = os.environ if env is None else env
        return cls(
            **{
                name: cls.parse_env_value(name, e[var])
                for name, var in cls.env_names().items()
                if var in e
            }
        )

    @classmethod
    def env_for(cls, overrides: Mapping[str, Any]) -> dict[str, str]:
        """The environment that sets ``overrides`` (field name -> value) and nothing else.

        Raises ValueError for a key that is no field, and for values that do not parse or
        break a rule in ``__post_init__`` (checked as the functions will read them)."""
        names = cls.env_names()
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown server settings {unknown}; known: {sorted(names)}")
        env = {names[k]: str(v) for k, v in overrides.items()}
        cls.from_env(env)
        return env


@cache
def _field_types() -> dict[str, type]:
    """Field name -> type, resolved once (the annotations are strings in this module)."""
    return get_type_hints(ServerSettings)
