"""Aggregation function: S3 ObjectCreated events -> cohort protocol steps.

Thin by design: parse the notification, route each key to the coordinator,
log and emit metrics. Every step is idempotent, so Lambda's own retries of a
failed invocation (and S3's at-least-once delivery) are safe; a record that
failed is re-raised after the others ran, so that the retry happens.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.utilities.typing import LambdaContext

from fedcore.errors import StorageError
from fedcore.events import is_test_event, parse_records
from functions.runtime import coordinator

logger = Logger(service="fl-aggregator")
metrics = Metrics(namespace="SecureFL", service="fl-aggregator")
copy_config_to_registered_loggers(source_logger=logger, include={"fedcore"})
# With metrics disabled (tests, the local stack) nothing is recorded: no warning each time.
warnings.filterwarnings("ignore", message="No application metrics to publish")


def _metric(name: str, value: float, unit: str) -> None:
    # Powertools never clears metrics while disabled, so a long-lived local stack
    # would grow without bound: do not record them at all then.
    if is_metrics_disabled():
        return
    metrics.add_metric(name=name, unit=getattr(MetricUnit, unit, MetricUnit.Count), value=value)


@metrics.log_metrics
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    # Our own duration metric (beside Lambda's Duration) is tagged with the service
    # dimension like the protocol metrics, and covers failed invocations too.
    started = time.perf_counter()
    try:
        return _handle(event)
    finally:
        _metric("HandlerDuration", (time.perf_counter() - started) * 1000, "Milliseconds")


def _handle(event: dict[str, Any]) -> dict[str, Any]:
    if is_test_event(event):
        logger.info("s3:TestEvent received; notifications are wired")
        return {"handled": 0, "outcomes": {}}
    coord = coordinator(_metric)
    outcomes: dict[str, str] = {}
    failures: list[Exception] = []
    for rec in parse_records(event):
        if isinstance(rec, ValueError):
            logger.warning("malformed event record skipped", extra={"reason": str(rec)})
            continue
        if rec.bucket != coord.store.bucket:
            logger.warning(
                "event for another bucket skipped",
                extra={
                    "bucket": rec.bucket,
                    "key": rec.key,
                    "reason": f"for bucket {rec.bucket!r}, this function serves {coord.store.bucket!r}",
                },
            )
            continue
        if not rec.event_name.startswith("ObjectCreated"):
            logger.warning(
                "event record skipped",
                extra={
                    "key": rec.key,
                    "reason": f"{rec.event_name!r} is not an ObjectCreated event",
                },
            )
            continue
        try:
            outcomes[rec.key] = coord.on_object_created(rec.key)
        except StorageError as exc:  # transient: let Lambda retry the event
            logger.exception("storage error; the event will be retried", extra={"key": rec.key})
            failures.append(exc)
    if failures:
        raise failures[0]
    return {"handled": len(outcomes), "outcomes": outcomes}
