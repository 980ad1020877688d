"""Report summaries per UTC month: how they are kept current and how a report reads them exactly.

Migration 0016 says what they hold. Every ledger insert queues its (transaction id, month) in
``tokenmeter.report_queue``; :func:`summarize_pending` (the worker calls it every
``report_summary_interval_s``, off the billing path) folds queued batches into the summaries and
dequeues them in one transaction. A report of
whole UTC months reads the summaries plus the ledger rows of batches still queued (``_tail``), so it is
exact however far behind the summaries are; other periods (a local month of a tenant in another time
zone, a week, a range) read the ledger as before.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg

# Calls kept per tenant and month in report_top_calls (the literal in migration 0016 is the same): a
# report asking for more top requests than this reads the ledger.
TOP_CALLS_KEPT = 100
_QUEUE_READ = 2000  # queued batches looked at per call


def summarize_pending(conn: psycopg.Connection, max_batches: int = _QUEUE_READ) -> int:
    """Fold up to ``max_batches`` queued batches into the summaries, a month at a time, each month in its own
    transaction; batches another worker is summarizing are skipped. Returns how many it summarized."""
    queued = conn.execute(
        "SELECT month, batch_id FROM tokenmeter.report_queue ORDER BY batch_id LIMIT %s", (max_batches,)
    ).fetchall()
    by_month: dict[date, list[int]] = defaultdict(list)
    for month, batch in queued:
        by_month[month].append(batch)
    done = 0
    for month, batches in sorted(by_month.items()):
        with conn.transaction():
            row = conn.execute(
                "SELECT tokenmeter.summarize_queued(%s, %s, %s)", (month, batches, TOP_CALLS_KEPT)
            ).fetchone()
        done += int(row[0]) if row else 0
    return done


def pending_batches(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM tokenmeter.report_queue").fetchone()
    return int(row[0]) if row else 0


def _month_start(moment: datetime) -> date | None:
    utc = moment.astimezone(UTC)
    if (utc.day, utc.hour, utc.minute, utc.second, utc.microsecond) != (1, 0, 0, 0, 0):
        return None
    return utc.date()


def whole_months(start: datetime, end: datetime) -> tuple[date, date] | None:
    """(first month, month after the last) when [start, end) is whole UTC months, else None."""
    first, after = _month_start(start), _month_start(end)
    if first is None or after is None or after <= first:
        return None
    return first, after


def queued_batches(conn: psycopg.Connection, months: tuple[date, date]) -> list[int]:
    """The batches of these months not yet summarized (read before a report's sections: see ``_tail``)."""
    rows = conn.execute(
        "SELECT DISTINCT batch_id FROM tokenmeter.report_queue WHERE month >= %s AND month < %s", months
    ).fetchall()
    return [int(batch) for (batch,) in rows]


def _tail(where: str, batches: list[int]) -> str:
    """CTEs ``queued`` and ``tail``: the period's ledger rows whose (batch, month) is still queued — a batch
    spanning two months may be summarized for one and not yet for the other. ``batches`` (read just before)
    lets Postgres find the rows through the BRIN index on batch_id; the queue itself is checked again in the
    section's own statement, so a batch summarized in between is read from the summaries only, never twice.
    One queued after the read is in neither yet: the section is as of the read."""
    if not batches:
        return "queued AS (SELECT NULL::bigint AS batch_id), tail AS (SELECT * FROM tokenmeter.ledger WHERE false)"
    return (
        "queued AS (SELECT batch_id, month FROM tokenmeter.report_queue"
        " WHERE month >= %(first_month)s AND month < %(after_month)s AND batch_id = ANY(%(batches)s)),"
        " tail AS (SELECT * FROM tokenmeter.ledger"
        f" WHERE ts >= %(start)s AND ts < %(end)s {where} AND batch_id = ANY(%(batches)s)"
        " AND (batch_id, (date_trunc('month', ts, 'UTC') AT TIME ZONE 'UTC')::date)"
        " IN (SELECT batch_id, month FROM queued))"
    )


_SUMMARY = "month >= %(first_month)s AND month < %(after_month)s {where}"


@dataclass(frozen=True)
class Source:
    """Where a report's ledger-free sections come from: whole UTC months, and their batches still queued."""

    months: tuple[date, date]
    batches: list[int]

    def params(self, window: dict[str, Any]) -> dict[str, Any]:
        return {**window, "first_month": self.months[0], "after_month": self.months[1], "batches": self.batches}


def source(conn: psycopg.Connection, start: datetime, end: datetime, top: int) -> Source | None:
    """The summaries, when [start, end) is whole UTC months and ``top`` within what they keep; else None."""
    months = whole_months(start, end)
    if months is None or top > TOP_CALLS_KEPT:
        return None
    return Source(months, queued_batches(conn, months))


def top_requests(conn: psycopg.Connection, where: str, window: dict[str, Any], src: Source) -> list[tuple[Any, ...]]:
    """Rows as the ledger query of ``sinks.reports`` returns them (``window['top']`` ≤ TOP_CALLS_KEPT)."""
    columns = (
        "event_id, tenant_id, ts, provider, model, feature, user_id, trace_id, input_tokens, output_tokens, total_cost"
    )
    query = (
        f"WITH {_tail(where, src.batches)}"
        f" SELECT {columns} FROM (SELECT {columns} FROM tokenmeter.report_top_calls"
        f" WHERE {_SUMMARY.format(where=where)} UNION ALL SELECT {columns} FROM tail) AS calls"
        " ORDER BY total_cost DESC, event_id LIMIT %(top)s"
    )
    return conn.execute(query, src.params(window)).fetchall()


def top_conversations(
    conn: psycopg.Connection, where: str, window: dict[str, Any], src: Source
) -> list[tuple[Any, ...]]:
    query = (
        f"WITH {_tail(where, src.batches)}"
        " SELECT tenant_id, conversation, sum(calls), sum(cost), min(first_ts), max(last_ts) FROM ("
        " SELECT tenant_id, conversation, calls, cost, first_ts, last_ts FROM tokenmeter.report_conversations"
        f" WHERE {_SUMMARY.format(where=where)}"
        " UNION ALL SELECT tenant_id, coalesce(session_id, trace_id), 1, total_cost, ts, ts FROM tail"
        " WHERE coalesce(session_id, trace_id) IS NOT NULL) AS c"
        " GROUP BY 1, 2 ORDER BY sum(cost) DESC, 2 LIMIT %(top)s"
    )
    return conn.execute(query, src.params(window)).fetchall()


def latency_by_model(
    conn: psycopg.Connection, where: str, window: dict[str, Any], src: Source
) -> list[tuple[Any, ...]]:
    """(provider, model, calls, p50, p95) as ``percentile_disc`` over the calls gives them: the value at
    position ceil(fraction × calls) in latency order, computed from calls per latency value."""
    query = (
        f"WITH {_tail(where, src.batches)},"
        " counts AS (SELECT provider, model, latency_ms, sum(calls) AS calls FROM ("
        " SELECT provider, model, latency_ms, calls FROM tokenmeter.report_latency"
        f" WHERE {_SUMMARY.format(where=where)}"
        " UNION ALL SELECT provider, model, latency_ms, 1 FROM tail WHERE latency_ms IS NOT NULL) AS l"
        " GROUP BY 1, 2, 3),"
        " running AS (SELECT provider, model, latency_ms,"
        " sum(calls) OVER (PARTITION BY provider, model ORDER BY latency_ms) AS upto,"
        " sum(calls) OVER (PARTITION BY provider, model) AS total FROM counts)"
        " SELECT provider, model, total,"
        " min(latency_ms) FILTER (WHERE upto >= greatest(1, ceil(0.5::float8 * total::float8))),"
        " min(latency_ms) FILTER (WHERE upto >= greatest(1, ceil(0.95::float8 * total::float8)))"
        " FROM running GROUP BY 1, 2, 3 ORDER BY 3 DESC, 1, 2"
    )
    return conn.execute(query, src.params(window)).fetchall()


def price_context(conn: psycopg.Connection, where: str, window: dict[str, Any], src: Source) -> list[tuple[Any, ...]]:
    """(by processing?, name or None, cost, calls) in the shape of the ledger query of ``sinks.reports``."""
    query = (
        f"WITH {_tail(where, src.batches)},"
        " context AS (SELECT nullif(service_tier, '') AS service_tier, nullif(processing, '') AS processing,"
        " calls, cost FROM tokenmeter.report_price_context"
        f" WHERE {_SUMMARY.format(where=where)}"
        " UNION ALL SELECT service_tier, processing, 1, total_cost FROM tail)"
        " SELECT GROUPING(service_tier), coalesce(service_tier, processing), sum(cost), sum(calls) FROM context"
        " GROUP BY GROUPING SETS ((service_tier), (processing)) ORDER BY 3 DESC, 2"
    )
    return conn.execute(query, src.params(window)).fetchall()
