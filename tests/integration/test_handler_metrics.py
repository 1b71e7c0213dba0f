"""The metrics the handlers publish (powertools, CloudWatch embedded metric format).

Real handlers, real S3 events and the moto server, metrics enabled: the EMF lines printed to
stdout are what CloudWatch would turn into the SecureFL metrics that template.yaml's
dashboard plots (tests/infra checks the dashboard against the code's metric names; this
checks that the code really emits them, with the dimensions the dashboard expects).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.events import build_record, scheduled_event
from fedcore.layout import Phase
from fedcore.messages import CohortConfig
from fedcore.storage import S3Store
from fedcore.versions import read_pointer, seed
from infra.pump import LocalContext
from tests.helpers import TINY, delta_for, participant

# metric -> (unit, dimension "service" of the function that emits it in this scenario)
EXPECTED = {
    "CohortsFormed": ("Count", "fl-aggregator"),
    "CohortsAborted": ("Count", "fl-sweeper"),
    "CohortsApplied": ("Count", "fl-aggregator"),
    "Dropouts": ("Count", "fl-aggregator"),
    "Staleness": ("Count", "fl-aggregator"),
    "BytesRead": ("Bytes", "fl-aggregator"),
    "InputsPhaseSeconds": ("Seconds", "fl-aggregator"),
    "AggregateSeconds": ("Seconds", "fl-aggregator"),
}


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    """A plaintext deployment whose phases are overdue at once (so one sweep closes them)."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    monkeypatch.setenv("BUCKET", store.bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("COHORT_SIZE", "3")
    monkeypatch.setenv("MIN_COHORT_SIZE", "2")
    monkeypatch.setenv("AGGREGATION_MODE", "plaintext")
    monkeypatch.setenv("ROUND_DEADLINE_S", "0.001")
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    return store


def record_for(store: S3Store, key: str) -> dict[str, Any]:
    """The S3 ObjectCreated record AWS would deliver for ``key`` (as the local pump builds)."""
    info = store.head(key)
    assert info is not None, key
    return build_record(bucket=store.bucket, key=key, size=info.size, etag=info.etag, sequencer=1)


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _emf(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]


def _metrics_by_name(blobs: list[dict[str, Any]]) -> dict[str, list[tuple[str, str, list]]]:
    """metric name -> [(unit, service, values)] per blob, checking each blob's EMF structure
    (powertools prints a list when one invocation records a metric more than once)."""
    out: dict[str, list[tuple[str, str, list]]] = defaultdict(list)
    for blob in blobs:
        (directive,) = blob["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == "SecureFL"
        assert directive["Dimensions"] == [["service"]]  # what the dashboard queries by
        for m in directive["Metrics"]:
            value = blob[m["Name"]]
            out[m["Name"]].append((m["Unit"], blob["service"], _as_list(value)))
    return out


def test_a_cohort_lifecycle_emits_every_dashboard_metric(
    env: S3Store, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN six devices (cohort size 3, minimum 2) and metrics enabled
    WHEN two cohorts form, two of three members of one upload, one of the other, and the
    sweeper closes both overdue input phases
    THEN the aggregator and the sweeper print EMF metrics for formation, the abort (one
    upload < minimum), the applied cohort (dropouts 1, staleness 0, bytes read, phase and
    aggregation seconds) and every invocation's duration, under the right service."""
    from functions.aggregator.app import handler as aggregator
    from functions.sweeper.app import handler as sweeper

    capsys.readouterr()
    devices = {c: participant(env, c) for c in "abcdef"}  # enrolled: plaintext signs too
    tickets = {c: p.check_in(0) for c, p in devices.items()}
    out = aggregator({"Records": [record_for(env, tickets["f"].key)]}, LocalContext("aggregator"))
    assert out["outcomes"] == {tickets["f"].key: "formed"}
    cohorts: dict[str, list[tuple[str, CohortConfig]]] = defaultdict(list)
    for c, p in devices.items():
        cfg, _ = p.find_cohort(tickets[c])
        assert cfg is not None, f"{c} is in no cohort"
        cohorts[cfg.cohort_id].append((c, cfg))
    (full, members_full), (short, members_short) = sorted(cohorts.items())
    # Cohort 1: two of three upload (one dropout). Cohort 2: one upload, below the minimum.
    for c, cfg in members_full[:2] + members_short[:1]:
        key = devices[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
        assert aggregator({"Records": [record_for(env, key)]}, LocalContext("aggregator"))
    counts = sweeper(scheduled_event(), LocalContext("sweeper"))
    assert counts["closed"] == 2
    assert json.loads(env.get(layout.state_key(short, Phase.RESULT)).body)["status"] == "aborted"
    # The sweeper's manifest write is an S3 event for the aggregator, which finalizes.
    manifest = layout.state_key(full, Phase.INPUTS)
    out = aggregator({"Records": [record_for(env, manifest)]}, LocalContext("aggregator"))
    assert out["outcomes"] == {manifest: "applied"}
    assert read_pointer(env)[0].version == 1

    metrics = _metrics_by_name(_emf(capsys.readouterr().out))
    for name, (unit, service) in EXPECTED.items():
        assert name in metrics, f"{name} not emitted; got {sorted(metrics)}"
        assert {(u, s) for u, s, _ in metrics[name]} == {(unit, service)}, metrics[name]

    def values(name: str) -> list[float]:
        return [x for *_, v in metrics[name] for x in v]

    assert [v for *_, v in metrics["CohortsFormed"]] == [[1.0, 1.0]]  # one invocation, two
    assert values("CohortsAborted") == [1.0] and values("CohortsApplied") == [1.0]
    assert values("Dropouts") == [1.0] and values("Staleness") == [0.0]
    assert values("BytesRead") and all(v > 0 for v in values("BytesRead"))
    assert all(v >= 0 for v in values("InputsPhaseSeconds") + values("AggregateSeconds"))
    # One HandlerDuration per invocation: 1 formation + 3 uploads + 1 finalize, and 1 sweep.
    durations = metrics["HandlerDuration"]
    assert {u for u, *_ in durations} == {"Milliseconds"}
    assert sorted(s for _, s, _ in durations) == ["fl-aggregator"] * 5 + ["fl-sweeper"]
    assert all(x > 0 for *_, v in durations for x in v)
