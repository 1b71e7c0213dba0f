"""The plaintext cohort protocol on SeaweedFS: real handlers, events from its webhook bridge.

The scenario is the moto suite's; this directory's conftest swaps the server and
the event source, so the ``stack_factory`` imported here runs ``LocalStack`` with
``notifications=SeaweedFS``: its pump lists nothing and only pushes what the
bridge delivers.
"""

from __future__ import annotations

from typing import Any

from fedcore.storage import S3Store
from infra.seaweed import SeaweedFS
from infra.stack import LocalStack
from tests.integration import test_protocol as moto_suite
from tests.integration.test_protocol import (
    stack_factory,
    test_duplicated_shuffled_events_and_concurrent_cohorts,
)

# Run as is on SeaweedFS: 4 concurrent cohorts for 3 rounds, each bridged event twice.
__all__ = ["stack_factory", "test_duplicated_shuffled_events_and_concurrent_cohorts"]


def test_webhook_events_alone_drive_a_cohort_to_a_new_version(
    stack_factory: Any, store: S3Store, seaweed: SeaweedFS
) -> None:
    """GIVEN a stack whose pump does not list and whose sweeper never runs WHEN 3 devices
    check in and upload THEN the moto suite's weighted-mean scenario passes unchanged:
    every step was triggered by an S3 event bridged from SeaweedFS's webhook."""
    stacks: list[LocalStack] = []

    def events_only(**kw: Any) -> LocalStack:
        st = stack_factory(sweep_interval_s=3600.0, **kw)
        stacks.append(st)
        return st

    delivered = seaweed.bridge.stats.delivered
    moto_suite.test_cohort_applies_weighted_mean(events_only, store)
    (st,) = stacks
    assert st.pump is not None and not st.pump.listing and st.sweeps == 0
    # 3 check-ins, the config, 3 uploads, the inputs manifest and the result at least,
    # each pushed by the bridge (the pump's own listing is off).
    assert st.pump.stats.events >= 9
    assert seaweed.bridge.stats.delivered > delivered
    assert st.pump.stats.dead_letters == []
