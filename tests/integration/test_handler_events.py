"""The real Lambda handlers with AWS-shaped S3 events (built by the local pump)."""

from __future__ import annotations

import json

import pytest
from aws_lambda_powertools.utilities.parser.models import S3Model

from fedcore import layout
from fedcore.events import build_event, build_record, parse_records, scheduled_event
from fedcore.storage import S3Store
from infra.pump import LocalContext
from tests.helpers import function_env, participant


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    function_env(
        monkeypatch,
        store,
        s3_endpoint,
        COHORT_SIZE="2",
        MIN_COHORT_SIZE="2",
        AGGREGATION_MODE="plaintext",
    )
    return store


def check_in_enrolled(store: S3Store, clients: tuple[str, ...]) -> list[str]:
    """Signed check-ins of enrolled devices (the only kind a cohort admits); their keys."""
    return [participant(store, c).check_in(0).key for c in clients]


def record_for(store: S3Store, key: str, seq: int = 1) -> dict:
    info = store.head(key)
    assert info is not None
    return build_record(bucket=store.bucket, key=key, size=info.size, etag=info.etag, sequencer=seq)


def test_pump_records_are_accepted_by_powertools_parser(env: S3Store) -> None:
    """GIVEN a record built by the pump for a key with a space and a plus THEN powertools'
    S3Model accepts it and our parser recovers the exact key (AWS encodes with quote_plus)."""
    key = "checkins/dev 1+x/ab.json"
    env.put(key, b"{}")
    event = build_event([record_for(env, key)])
    parsed = S3Model(**event)
    assert parsed.Records[0].s3.object.key == "checkins/dev+1%2Bx/ab.json"
    [rec] = list(parse_records(event))
    assert rec.key == key


def test_aggregator_forms_a_cohort_from_checkin_events(env: S3Store) -> None:
    """GIVEN two check-ins (cohort size 2) WHEN the handler gets the second's event
    THEN it writes the cohort config naming both, and deletes the consumed check-ins."""
    from functions.aggregator.app import handler

    keys = check_in_enrolled(env, ("a", "b"))
    key = keys[-1]
    out = handler(build_event([record_for(env, key)]), LocalContext("aggregator"))
    assert out["outcomes"] == {key: "formed"}
    cfg = json.loads(env.get(layout.config_key(layout.cohort_id(1))).body)
    nonces = {k.split("/")[1]: k.split("/")[2].removesuffix(".json") for k in keys}
    assert cfg["members"] == nonces and cfg["mode"] == "plaintext"
    assert list(env.list(layout.CHECKINS_PREFIX)) == []
    # The same event again (S3 delivers at least once) forms nothing new.
    assert (
        handler(build_event([record_for(env, layout.config_key("c00000001"))]), LocalContext("x"))[
            "handled"
        ]
        == 1
    )
    assert env.list_prefixes(layout.COHORTS_PREFIX) == ["cohorts/c00000001/"]


def test_test_event_and_malformed_records_are_harmless(
    env: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN s3:TestEvent, a record of another source, a record without s3, and a key outside
    the layout THEN the handler logs each and fails nothing."""
    from functions.aggregator.app import handler

    ctx = LocalContext("aggregator")
    assert (
        handler({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": env.bucket}, ctx)[
            "handled"
        ]
        == 0
    )
    env.put("cohorts/c00000001/evil/x.txt", b"x")
    bad = {
        "Records": [
            {"eventSource": "aws:sqs"},
            {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"},
            record_for(env, "cohorts/c00000001/evil/x.txt"),
        ]
    }
    out = handler(bad, ctx)
    assert out["outcomes"] == {"cohorts/c00000001/evil/x.txt": "ignored"}
    reasons = " ".join(str(getattr(r, "reason", "")) + r.getMessage() for r in caplog.records)
    assert "malformed event record" in reasons and "not aws:s3" in reasons
    assert "outside the layout" in reasons and "cohorts/c00000001/evil/x.txt" in reasons
    assert handler({"unexpected": True}, ctx)["handled"] == 0


def test_sweeper_handler_with_scheduled_event(env: S3Store) -> None:
    from functions.sweeper.app import handler

    out = handler(scheduled_event(), LocalContext("sweeper"))
    assert set(out) == {"closed", "finalized", "formed", "expired"}


def test_handler_emits_emf_metrics(
    env: S3Store, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN metrics enabled WHEN two check-ins form a cohort THEN a CohortsFormed EMF metric is printed."""
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "false")
    from functions.aggregator.app import handler

    keys = check_in_enrolled(env, ("a", "b"))
    handler(build_event([record_for(env, keys[-1])]), LocalContext("aggregator"))
    emf = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    assert any(m.get("CohortsFormed") == [1.0] or m.get("CohortsFormed") == 1.0 for m in emf), emf
