"""Many simulated devices in two worker processes, through the real stack.

Thirty devices (torch training on small MNIST shards, real SecAgg+ rounds)
are played by two workers against the moto server, with the real event pump
and aggregation handler; cohorts of ten must produce a consistent chain of
versions, and no device may sit in two cohorts at once.
"""

from __future__ import annotations

import pytest

from fedcore import layout
from fedcore.messages import parse_config
from fedcore.status import cohort_ids
from fedcore.storage import S3Store
from infra.simulate import run
from sim.simulation import StopRule
from sim.worker import SimSettings
from tests.helpers import assert_consistent

DEVICES, COHORT, VERSIONS = 30, 10, 2


@pytest.mark.parametrize("user_dp", [False, True], ids=["secagg", "secagg+user-dp"])
def test_thirty_devices_in_two_workers_advance_the_model(
    s3_endpoint: str, store: S3Store, user_dp: bool
) -> None:
    """
    GIVEN 30 simulated secure-aggregation devices in 2 worker processes, cohorts of 10
    WHEN they run until the global model reaches version 2
    THEN versions advance through applied cohorts of 10, the version chain is
         consistent, every check-in was taken by at most one cohort, and no
         device was in two cohorts at the same time; with user-level DP each
         version states its release's epsilon and the most any device has spent
    """
    settings = SimSettings(
        devices=DEVICES, workers=2, max_samples=20, epochs=1, batch_size=10,
        poll_s=0.1, checkin_check_s=5.0, until_version=VERSIONS, client_prefix="t",
    )  # fmt: skip
    server = {
        "cohort_size": COHORT,
        "min_cohort_size": COHORT,
        "round_deadline_s": 120.0,
        "short_round_s": 60.0,
        "secagg_weight_cap": 20,
    }
    if user_dp:
        server |= {"dp_user_noise": 1.0, "dp_user_clip": 1.0}
    report = run(
        settings, server, StopRule(max_versions=VERSIONS, max_s=300.0),
        endpoint_url=s3_endpoint, bucket=store.bucket, evaluate=False,
        pump_interval_s=0.1, sweep_interval_s=1.0, out=lambda line: None,
    )  # fmt: skip

    assert report["final_version"] >= VERSIONS
    assert [v["version"] for v in report["versions"]][:VERSIONS] == list(range(1, VERSIONS + 1))
    assert all(v["members"] == COHORT for v in report["versions"])
    assert report["cohorts"]["applied"] >= VERSIONS
    assert report["participations"]["outcomes"].get("completed", 0) >= VERSIONS * COHORT
    assert report["participations"]["overlapping"] == []
    assert report["pump"]["invocations"] > 0 and not report["pump"]["dead_letters"]
    assert report["cohorts_in_flight"]["max"] >= 1
    if user_dp:
        spent = [v["privacy"] for v in report["versions"]]
        assert all(p["noise_multiplier"] == 1.0 and p["user_epsilon"] > 0 for p in spent)
        assert all(p["user_epsilon_device_max"] >= p["user_epsilon"] for p in spent)
        assert spent[0]["devices_with_spend"] == COHORT
        assert COHORT <= spent[1]["devices_with_spend"] <= 2 * COHORT
    else:
        assert all("privacy" not in v for v in report["versions"])

    metas = assert_consistent(store)
    assert len(metas) - 1 >= VERSIONS
    taken: dict[tuple[str, str], str] = {}
    for cid in cohort_ids(store):
        cfg = parse_config(store.get(layout.config_key(cid)).body, where=cid)
        assert cfg.mode == "secagg"
        for client, nonce in cfg.members.items():
            assert (client, nonce) not in taken, f"check-in {nonce} of {client} taken twice"
            taken[(client, nonce)] = cid
