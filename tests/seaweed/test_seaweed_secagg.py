"""Secure aggregation on SeaweedFS: one cohort of 10 with a dropout, events from the bridge.

Reuses the moto suite's fixture and helpers (``stack`` runs ``LocalStack`` with
``notifications=SeaweedFS`` here, every event delivered twice and shuffled).
"""

from __future__ import annotations

from typing import Any

from fedcore.storage import S3Store
from infra.seaweed import SeaweedFS
from tests.helpers import assert_consistent
from tests.integration.test_secagg import SAMPLES, check_applied, run_cohort, stack

__all__ = ["stack"]


def test_secure_cohort_with_one_dropout_applies_survivors_mean(
    stack: Any, store: S3Store, seaweed: SeaweedFS
) -> None:
    """GIVEN 10 devices of which one vanishes after sharing its keys WHEN the rounds run
    through the real handler on SeaweedFS events THEN the cohort applies a new version
    equal to the 9 survivors' weighted mean within the quantization bound."""
    clients = sorted(SAMPLES)
    dropped = clients[3]
    cfg, outcomes = run_cohort(store, 0, {dropped: "shares"})
    survivors = [c for c in clients if c != dropped]
    check_applied(store, cfg, survivors, 0)
    assert outcomes[dropped] == "dropped"
    assert all(outcomes[c] != "dropped" for c in survivors), outcomes
    stack.pump.drain()
    assert not stack.pump.listing and stack.pump.stats.events > 0
    assert stack.pump.stats.dead_letters == []
    assert_consistent(store, {cfg.cohort_id})
