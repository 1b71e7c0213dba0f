"""Sweeper: on a schedule, close phases past their deadline and recover stuck cohorts."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.utilities.typing import LambdaContext

from functions.metrics import HandlerMetrics
from functions.runtime import coordinator

logger = Logger(service="fl-sweeper")
metrics = HandlerMetrics(service="fl-sweeper")
copy_config_to_registered_loggers(source_logger=logger, include={"fedcore"})


@metrics.handler
@logger.inject_lambda_context(clear_state=True)
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, int]:
    counts = coordinator(metrics).sweep()
    if any(counts.values()):
        logger.info("sweep", extra=counts)
    return counts
