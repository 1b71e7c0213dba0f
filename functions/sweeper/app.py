"""Sweeper: on a schedule, close phases past their deadline and recover stuck cohorts."""

from __future__ import annotations

import time
import warnings
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import is_metrics_disabled
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.runtime import coordinator

logger = Logger(service="fl-sweeper")
metrics = Metrics(namespace="SecureFL", service="fl-sweeper")
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
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    started = time.perf_counter()
    try:
        counts = coordinator(_metric).sweep()
    finally:
        _metric("HandlerDuration", (time.perf_counter() - started) * 1000, "Milliseconds")
    if any(counts.values()):
        logger.info("sweep", extra=counts)
    return counts
