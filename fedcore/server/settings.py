"""Server-side parameters, read from the environment the template sets."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedcore.messages import MODES
from fedcore.server.apply import STALENESS_WEIGHTS


@dataclass(frozen=True)
class ServerSettings:
    """Cohort formation, deadlines and the FedBuff apply rule.

    ``cohort_size`` check-ins form a cohort at once; after ``checkin_wait_s``
    the sweeper forms a smaller one from at least ``min_cohort_size``.
    ``round_deadline_s`` bounds each phase; ``stuck_after_s`` is how long a
    closed phase may wait for its finalizer before the sweeper redoes it.
    """

    cohort_size: int = 10
    min_cohort_size: int = 2
    round_deadline_s: float = 600.0
    checkin_wait_s: float = 60.0
    checkin_ttl_s: float = 3600.0
    stuck_after_s: float = 120.0
    server_lr: float = 1.0
    staleness_weight: str = "inverse_sqrt"
    mode: str = "secagg"
    read_concurrency: int = 4
    short_round_s: float = 60.0  # time limit of the key, share and unmask rounds
    secagg_clip: float = 1.0  # quantization range [-clip, clip] of weight * delta
    secagg_degree: int = 0  # neighbours per member; 0: from secagg_max_dropout; >= n-1: all pairs
    secagg_max_dropout: float = 0.1  # dropout rate the default degree is sized for
    dp_user_noise: float = 0.0  # user-level DP noise multiplier z (0: off); needs secagg
    dp_user_clip: float = 1.0  # L2 bound C of each member's delta under user-level DP
    dp_delta: float = 1e-5
    secagg_weight_cap: int = (
        10_000  # sample count that maps to FedAvg weight 1 (larger counts are capped)
    )

    def __post_init__(self) -> None:
        if self.cohort_size < 1 or not 1 <= self.min_cohort_size <= self.cohort_size:
            raise ValueError(
                f"need 1 <= min_cohort_size ({self.min_cohort_size}) <= cohort_size ({self.cohort_size})"
            )
        if self.staleness_weight not in STALENESS_WEIGHTS:
            raise ValueError(f"staleness_weight must be one of {sorted(STALENESS_WEIGHTS)}")
        if not 0.0 <= self.secagg_max_dropout < 0.5:
            raise ValueError("secagg_max_dropout must be in [0, 0.5)")
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

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ServerSettings:
        e = os.environ if env is None else env
        d = cls()
        return cls(
            cohort_size=int(e.get("COHORT_SIZE", d.cohort_size)),
            min_cohort_size=int(e.get("MIN_COHORT_SIZE", d.min_cohort_size)),
            round_deadline_s=float(e.get("ROUND_DEADLINE_S", d.round_deadline_s)),
            checkin_wait_s=float(e.get("CHECKIN_WAIT_S", d.checkin_wait_s)),
            checkin_ttl_s=float(e.get("CHECKIN_TTL_S", d.checkin_ttl_s)),
            stuck_after_s=float(e.get("STUCK_AFTER_S", d.stuck_after_s)),
            server_lr=float(e.get("SERVER_LR", d.server_lr)),
            staleness_weight=e.get("STALENESS_WEIGHT", d.staleness_weight),
            mode=e.get("AGGREGATION_MODE", d.mode),
            read_concurrency=int(e.get("READ_CONCURRENCY", d.read_concurrency)),
            short_round_s=float(e.get("SHORT_ROUND_S", d.short_round_s)),
            secagg_clip=float(e.get("SECAGG_CLIP", d.secagg_clip)),
            secagg_degree=int(e.get("SECAGG_DEGREE", d.secagg_degree)),
            secagg_weight_cap=int(e.get("SECAGG_WEIGHT_CAP", d.secagg_weight_cap)),
            secagg_max_dropout=float(e.get("SECAGG_MAX_DROPOUT", d.secagg_max_dropout)),
            dp_user_noise=float(e.get("DP_USER_NOISE", d.dp_user_noise)),
            dp_user_clip=float(e.get("DP_USER_CLIP", d.dp_user_clip)),
            dp_delta=float(e.get("DP_DELTA", d.dp_delta)),
        )
