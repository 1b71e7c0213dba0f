"""Aggregation function: S3 ObjectCreated events -> cohort protocol steps.

Thin by design: parse the notification, route each key to the coordinator,
log and emit metrics. Every step is idempotent, so Lambda's own retries of a
failed invocation (and S3's at-least-once delivery) are safe; a record that
failed is re-raised after the others ran, so that the retry happens.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from fedcore.errors import StorageError
from fedcore.events import is_test_event, parse_records
from functions.metrics import HandlerMetrics
from functions.runtime import coordinator

logger = Logger(service="fl-aggregator")
metrics = HandlerMetrics(service="fl-aggregator")
copy_config_to_registered_loggers(source_logger=logger, include={"fedcore"})


@metrics.handler
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    if is_test_event(event):
        logger.info("s3:TestEvent received; notifications are wired")
        return {"handled": 0, "outcomes": {}}
    coord = coordinator(metrics)
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
