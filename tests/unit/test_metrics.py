"""The handlers' metric sink: powertools validates every unit, and names come from one module."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aws_lambda_powertools.metrics import MetricUnitError

from fedcore import metrics as names
from fedcore.layout import Phase
from functions.metrics import HandlerMetrics


def _emf(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"_aws"')]


def _values(blob: dict[str, Any], name: str) -> list[float]:
    """A metric's points (powertools prints a list when it may hold several)."""
    value = blob[name]
    return value if isinstance(value, list) else [value]


@pytest.fixture(params=["true", "false"], ids=["metrics-disabled", "metrics-enabled"])
def sink(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> HandlerMetrics:
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", request.param)
    return HandlerMetrics(service="fl-test")


@pytest.mark.parametrize("unit", ["Cuont", "count", "Second", "ms", ""])
def test_a_mistyped_unit_raises(
    sink: HandlerMetrics, unit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN the sink, metrics enabled or not (the tests and the local stack run disabled)
    WHEN a data point names a unit CloudWatch does not have
    THEN powertools' MetricUnitError is raised, instead of the point becoming a Count."""
    with pytest.raises(MetricUnitError, match="Invalid metric unit"):
        sink(names.COHORTS_FORMED, 1, unit)
    capsys.readouterr()


def test_the_units_the_code_uses_are_accepted_and_published(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN metrics enabled
    WHEN one invocation records a point in each unit the coordinator and handlers use,
    by unit name or by CloudWatch's spelling of it
    THEN one EMF blob carries each with its CloudWatch unit, in namespace SecureFL, tagged
    with the sink's service, and the invocation's HandlerDuration in Milliseconds."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    sink = HandlerMetrics(service="fl-test")

    @sink.handler
    def handler(event: dict[str, Any], context: Any) -> str:
        sink(names.COHORTS_FORMED, 1, "Count")
        sink(names.BYTES_READ, 10, "Bytes")
        sink(names.AGGREGATE_SECONDS, 0.5, "Seconds")
        sink(names.STALENESS, 2, "Count")
        sink(names.PHASE_SECONDS[Phase.INPUTS], 3.0, "Seconds")
        sink("RatePoint", 4.0, "Count/Second")  # CloudWatch's spelling of CountPerSecond
        return "ok"

    capsys.readouterr()
    assert handler({}, None) == "ok"
    (blob,) = _emf(capsys.readouterr().out)
    (directive,) = blob["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == names.NAMESPACE and blob["service"] == "fl-test"
    units = {m["Name"]: m["Unit"] for m in directive["Metrics"]}
    assert units == {
        "CohortsFormed": "Count",
        "BytesRead": "Bytes",
        "AggregateSeconds": "Seconds",
        "Staleness": "Count",
        "InputsPhaseSeconds": "Seconds",
        "RatePoint": "Count/Second",
        "HandlerDuration": "Milliseconds",
    }
    assert _values(blob, "BytesRead") == [10.0]
    assert all(v > 0 for v in _values(blob, "HandlerDuration"))


def test_a_failed_invocation_still_publishes_its_duration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN metrics enabled WHEN the handler raises THEN the error propagates (Lambda
    retries the event) and the invocation's HandlerDuration is published all the same."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    sink = HandlerMetrics(service="fl-test")

    @sink.handler
    def handler(event: dict[str, Any], context: Any) -> None:
        raise RuntimeError("storage down")

    capsys.readouterr()
    with pytest.raises(RuntimeError, match="storage down"):
        handler({}, None)
    (blob,) = _emf(capsys.readouterr().out)
    assert [m["Name"] for m in blob["_aws"]["CloudWatchMetrics"][0]["Metrics"]] == [
        names.HANDLER_DURATION
    ]


def test_disabled_metrics_record_nothing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN metrics disabled (the local stack runs for hours) WHEN points are recorded
    THEN nothing is kept in powertools' shared metric set and nothing is printed."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    sink = HandlerMetrics(service="fl-test")

    @sink.handler
    def handler(event: dict[str, Any], context: Any) -> None:
        sink(names.COHORTS_FORMED, 1, "Count")
        assert not sink._metrics.metric_set

    handler({}, None)
    assert _emf(capsys.readouterr().out) == []


def test_the_names_are_one_declaration_each() -> None:
    """GIVEN fedcore.metrics WHEN its names are listed THEN every timed phase has a name of
    the coordinator's f"{phase}PhaseSeconds" shape and ALL_METRICS holds every constant."""
    assert dict(names.PHASE_SECONDS) == {
        Phase.KEYS: "KeysPhaseSeconds",
        Phase.SHARES: "SharesPhaseSeconds",
        Phase.INPUTS: "InputsPhaseSeconds",
        Phase.UNMASK: "UnmaskPhaseSeconds",
    }
    constants = {
        v for k, v in vars(names).items() if k.isupper() and isinstance(v, str) and k != "NAMESPACE"
    }
    assert constants | set(names.PHASE_SECONDS.values()) == names.ALL_METRICS
