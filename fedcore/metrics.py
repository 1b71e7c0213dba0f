"""The names of the metrics the core and the handlers publish: one declaration each.

Why a module of constants: CloudWatch creates a new metric for any name it is
sent, so a misspelt name is not an error anywhere; it is a dashboard graph that
silently stays empty. The emitters (the coordinator, the handlers) and the
dashboard test (``tests/infra/test_template.py``) read these names, so they
cannot drift apart.

The core stays free of the metrics backend: it publishes through a
:data:`MetricSink`, a plain ``(name, value, unit)`` callable. ``unit`` is a
CloudWatch unit name (``"Count"``, ``"Seconds"``, ``"Bytes"``,
``"Milliseconds"``); the handlers' sink (``functions/metrics.py``) has
powertools validate it and raises on a unit CloudWatch does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Final

from fedcore.layout import Phase

__all__ = [
    "AGGREGATE_SECONDS",
    "ALL_METRICS",
    "BYTES_READ",
    "COHORTS_ABORTED",
    "COHORTS_APPLIED",
    "COHORTS_FORMED",
    "DROPOUTS",
    "HANDLER_DURATION",
    "NAMESPACE",
    "PHASE_SECONDS",
    "STALENESS",
    "MetricSink",
]

MetricSink = Callable[[str, float, str], None]
"""``sink(name, value, unit)``: publish one data point (the handlers tag it with their service)."""

NAMESPACE: Final = "SecureFL"
"""CloudWatch namespace of every metric below (the template's ``POWERTOOLS_METRICS_NAMESPACE``)."""

# Cohort lifecycle (coordinator), unit Count: one data point per cohort.
COHORTS_FORMED: Final = "CohortsFormed"
COHORTS_APPLIED: Final = "CohortsApplied"
COHORTS_ABORTED: Final = "CohortsAborted"
# Per applied cohort (coordinator), unit Count: members who did not count, and how many
# versions the model moved on between the cohort's base and its application.
DROPOUTS: Final = "Dropouts"
STALENESS: Final = "Staleness"
# Work (coordinator): wall time of finalize in Seconds, bytes downloaded to sum in Bytes.
AGGREGATE_SECONDS: Final = "AggregateSeconds"
BYTES_READ: Final = "BytesRead"
# Handlers: wall time of one invocation in Milliseconds, failed invocations included.
HANDLER_DURATION: Final = "HandlerDuration"

PHASE_SECONDS: Final[Mapping[Phase, str]] = MappingProxyType(
    {
        phase: f"{phase.value.capitalize()}PhaseSeconds"
        for phase in (Phase.KEYS, Phase.SHARES, Phase.INPUTS, Phase.UNMASK)
    }
)
"""Seconds from the previous phase's close (or the cohort's creation) to this phase's close,
per applied cohort. ``Phase.RESULT`` is not timed (``AggregateSeconds`` covers finalize)."""

ALL_METRICS: Final[frozenset[str]] = frozenset(
    {
        COHORTS_FORMED,
        COHORTS_APPLIED,
        COHORTS_ABORTED,
        DROPOUTS,
        STALENESS,
        AGGREGATE_SECONDS,
        BYTES_READ,
        HANDLER_DURATION,
        *PHASE_SECONDS.values(),
    }
)
"""Every metric name the code may publish: what the dashboard must show, no more, no less."""
