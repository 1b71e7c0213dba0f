"""The handlers' metric sink: powertools ``Metrics`` (CloudWatch embedded metric format).

One sink per function, tagged with its service name (the dashboard's ``service``
dimension). Each data point's unit is checked by powertools' own validation on
every call, metrics enabled or not, so a mistyped unit raises
``MetricUnitError`` in the tests and the local stack instead of being published
as something else on AWS. The names come from :mod:`fedcore.metrics`.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.functions import (
    extract_cloudwatch_metric_unit_value,
    is_metrics_disabled,
)

from fedcore.metrics import HANDLER_DURATION, NAMESPACE

__all__ = ["HandlerMetrics"]

# With metrics disabled (tests, the local stack) nothing is recorded: no warning each time.
warnings.filterwarnings("ignore", message="No application metrics to publish")

_UNIT_VALUES = [u.value for u in MetricUnit]  # "Count", "Count/Second", ...
_UNIT_NAMES = list(MetricUnit.__members__)  # "Count", "CountPerSecond", ...

Handler = TypeVar("Handler", bound=Callable[[dict[str, Any], Any], Any])


class HandlerMetrics:
    """A :data:`fedcore.metrics.MetricSink` for one Lambda function (``service``).

    Call it as ``sink(name, value, unit)``; decorate the Lambda entry point with
    :meth:`handler` so that what an invocation recorded is published when it ends.
    """

    def __init__(self, service: str) -> None:
        self._metrics = Metrics(namespace=NAMESPACE, service=service)

    def __call__(self, name: str, value: float, unit: str) -> None:
        """Record one data point. Raises ``MetricUnitError`` if CloudWatch has no such unit."""
        extract_cloudwatch_metric_unit_value(
            metric_units=_UNIT_VALUES, metric_valid_options=_UNIT_NAMES, unit=unit
        )
        # Powertools never clears metrics while disabled, so a long-lived local stack
        # would grow without bound: do not record them at all then.
        if is_metrics_disabled():
            return
        self._metrics.add_metric(name=name, unit=unit, value=value)

    def handler(self, fn: Handler) -> Handler:
        """Publish the invocation's metrics when it ends, with its ``HandlerDuration``.

        Our own duration (beside Lambda's ``Duration``) carries the service dimension
        like the protocol metrics do, and covers failed invocations too.
        """

        @functools.wraps(fn)
        def timed(event: dict[str, Any], context: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(event, context)
            finally:
                self(HANDLER_DURATION, (time.perf_counter() - started) * 1000, "Milliseconds")

        return cast(Handler, self._metrics.log_metrics(timed))
