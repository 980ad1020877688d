"""Prometheus metrics of the worker, served at ``http://<metrics_host>:<metrics_port>/metrics``.

The worker is two processes (stage 1 in its own, stage 2 in Faust's), so ``tokenmeter worker``
turns on prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) before either imports
it: each process writes its samples to files in one folder and the endpoint adds them up.

Spend per tenant is a Prometheus counter for dashboards (a float, like every Prometheus value);
invoices never read it. Its cardinality is bounded: the first ``MAX_TENANT_SERIES`` tenants a
process sees get a series each, the rest share ``tenant="_other"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from decimal import Decimal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("tokenmeter.metrics")

_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_TENANT_SERIES = 200

EVENTS_IN = Counter(
    "tokenmeter_events_in", "Messages consumed, per stage (meter: usage.raw; windows: rollups)", ["stage"]
)
EVENTS_OUT = Counter("tokenmeter_events_out", "Messages produced, per stage and output topic", ["stage", "output"])
DEAD_LETTERS = Counter(
    "tokenmeter_dead_letters",
    "Rejected raw messages sent to usage.dlq, per reason (decode, validate, process)",
    ["reason"],
)
BATCH_FAILURES = Counter(
    "tokenmeter_batch_failures",
    "Failed stage-1 batches, per reason (postgres, redis, kafka: retried; record_split: a "
    "batch split to isolate a record; redis_refused; other: the exception's type)",
    ["reason"],
)
OPTIONAL_FAILURES = Counter(
    "tokenmeter_optional_stage_failures",
    "Failures of stages that bill nothing (anomaly rules, runaway detection, webhooks), skipped",
    ["stage"],
)
COMMIT_FAILURES = Counter(
    "tokenmeter_commit_failures", "Offset commits Kafka refused (per partition; the batch is replayed)", ["stage"]
)
DUPLICATES = Counter("tokenmeter_duplicate_events", "Events whose event_id was already counted")
UNPRICED = Counter("tokenmeter_unpriced_events", "Events of models without a price (pricing misses)")
CONFIG_REJECTED = Counter(
    "tokenmeter_config_records_rejected",
    "Config records (budgets, price overrides) that could not be applied, per topic",
    ["topic"],
)
ALERTS = Counter("tokenmeter_alerts", "Alerts fired, per kind", ["kind"])
REPORT_BATCHES_SUMMARIZED = Counter(
    "tokenmeter_report_batches_summarized", "Ledger batches folded into the report summaries (sinks/summaries.py)"
)
SPEND = Counter("tokenmeter_spend_usd", "Priced spend of new events, per tenant (bounded; see module doc)", ["tenant"])
LAG = Gauge(
    "tokenmeter_consumer_lag_messages",
    "Messages behind the end of usage.raw (stage 1's partitions)",
    ["stage"],
    multiprocess_mode="livesum",
)
BATCH_SIZE = Histogram(
    "tokenmeter_sink_batch_events",
    "Events per sink batch",
    ["sink"],
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000),
)
SINK_SECONDS = Histogram(
    "tokenmeter_sink_seconds",
    "Time to write one batch, per sink",
    ["sink"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

_tenants: set[str] = set()


def tenant_label(tenant_id: str) -> str:
    if tenant_id in _tenants:
        return tenant_id
    if len(_tenants) < MAX_TENANT_SERIES:
        _tenants.add(tenant_id)
        return tenant_id
    return "_other"


def count_spend(costs: Iterable[tuple[str, Decimal]]) -> None:
    """Add each (tenant, cost) to the tenant's spend counter, one increment per tenant."""
    totals: dict[str, Decimal] = {}
    for tenant_id, cost in costs:
        label = tenant_label(tenant_id)
        totals[label] = totals.get(label, Decimal(0)) + cost
    for label, total in totals.items():
        SPEND.labels(tenant=label).inc(float(total))


def process_gone(pid: int) -> None:
    """Drop the live gauges of a process that exited (its counters keep counting in the sum)."""
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve(host: str, port: int) -> bool:
    """Serve /metrics (all of the worker's processes); False, with a warning, if the port is taken."""
    if not port:
        return False
    registry = REGISTRY
    if os.environ.get(_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.warning("metrics not served: cannot listen on %s:%d (%s)", host, port, exc)
        return False
    return True
