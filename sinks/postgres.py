"""The Postgres sink: ledger rows and rollups, written in batches, idempotently.

One transaction per batch: COPY the batch into a temporary staging table, insert into the ledger
with ``ON CONFLICT (event_id) DO NOTHING``, and advance the rollups from exactly the rows that insert
returned. A replayed batch (a worker killed before it committed its Kafka offsets) inserts nothing
and so changes nothing: each distinct event_id is counted once, whatever Kafka redelivers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg

from schemas.records import PricedEvent, Rollup

_COLUMNS = (
    "event_id",
    "ts",
    "tenant_id",
    "provider",
    "model",
    "user_id",
    "feature",
    "environment",
    "trace_id",
    "session_id",
    "team_id",
    "request_id",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "latency_ms",
    "status",
    "estimated",
    "tags",
    "price_status",
    "input_cost",
    "output_cost",
    "total_cost",
    "price_source",
)
_COLUMN_LIST = ", ".join(_COLUMNS)

GRANULARITIES = ("minute", "hour", "day", "week", "month")
DIMENSIONS = ("tenant", "feature", "model", "user", "environment")
# Rollups are advanced in two steps, so Postgres aggregates each event 5 times, not 23:
# 1. per (tenant, UTC minute, dimension, value), the events' sums (``_MINUTE_SUMS``): in a batch most
#    events share their minute and values, so this is far fewer rows than events;
# 2. those minutes rolled into every granularity and upserted (``_ROLLUP_UPSERT``), in key order so that
#    concurrent batches lock rows in one order (no deadlocks). Windows are truncated in the tenant's time
#    zone (UTC for tenants without one); every zone's offset is whole minutes, so a UTC minute lies in
#    exactly one local hour, day, week and month.
# Dimension values: '' for the tenant itself and for events without that attribute. No minute windows
# per user or environment: nothing reads them, and they were the most rows of all (one per user and
# minute; state must stay bounded under many users).
_MINUTE_SUMS = """
SELECT {src}.tenant_id, date_trunc('minute', {src}.ts, 'UTC') AS minute, d.dimension, d.value,
       count(*) AS calls, count(*) FILTER (WHERE {src}.price_status = 'unpriced') AS unpriced_calls,
       sum({src}.input_tokens) AS input_tokens, sum({src}.output_tokens) AS output_tokens,
       sum({src}.cache_read_tokens) AS cache_read_tokens, sum({src}.cache_write_tokens) AS cache_write_tokens,
       sum({src}.input_cost) AS input_cost, sum({src}.output_cost) AS output_cost, sum({src}.total_cost) AS cost
FROM {source}
CROSS JOIN LATERAL (VALUES
    ('tenant', ''),
    ('feature', coalesce({src}.feature, '')),
    ('model', {src}.provider || '/' || {src}.model),
    ('user', coalesce({src}.user_id, '')),
    ('environment', coalesce({src}.environment, ''))
) AS d(dimension, value)
GROUP BY 1, 2, 3, 4
"""
_ROLLUP_UPSERT = """
INSERT INTO tokenmeter.rollups AS r
SELECT m.tenant_id, g.granularity, date_trunc(g.granularity, m.minute, coalesce(zone.time_zone, 'UTC')),
       m.dimension, m.value, sum(m.calls), sum(m.unpriced_calls), sum(m.input_tokens), sum(m.output_tokens),
       sum(m.cache_read_tokens), sum(m.cache_write_tokens), sum(m.input_cost), sum(m.output_cost), sum(m.cost)
FROM {minutes} AS m
LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = m.tenant_id
CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month')) AS g(granularity)
WHERE g.granularity <> 'minute' OR m.dimension NOT IN ('user', 'environment')
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
ON CONFLICT (tenant_id, granularity, window_start, dimension, dimension_value) DO UPDATE SET
    calls = r.calls + excluded.calls,
    unpriced_calls = r.unpriced_calls + excluded.unpriced_calls,
    input_tokens = r.input_tokens + excluded.input_tokens,
    output_tokens = r.output_tokens + excluded.output_tokens,
    cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
    input_cost = r.input_cost + excluded.input_cost,
    output_cost = r.output_cost + excluded.output_cost,
    cost = r.cost + excluded.cost
"""
_ROLLUP_COLUMNS = (
    "r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value, r.calls, r.unpriced_calls,"
    " r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.input_cost, r.output_cost, r.cost,"
    " coalesce(zone.time_zone, 'UTC')"
)


def _rollup_upsert(src: str, source: str) -> str:
    """Advance the rollups by the rows of ``source`` (aliased ``src``); the caller passes them exactly once."""
    minutes = f"({_MINUTE_SUMS.format(src=src, source=source)})"
    return _ROLLUP_UPSERT.format(minutes=minutes)


@dataclass(frozen=True)
class BatchResult:
    inserted: int  # ledger rows that were new; the rest were duplicates
    rollups: list[Rollup]  # every window the batch touched, with its totals after the batch
    new_spend: dict[str, Decimal] = field(default_factory=dict)  # tenant → cost of its new rows
    seconds: float = 0.0  # how long the sinks took (Postgres and Redis)


# The batch's new ledger rows (a replayed id inserts nothing), summed per minute and scope into a
# temporary table: the rollups advance from it, and it gives each tenant's new calls and spend.
_INSERT_NEW_ROWS = f"""
WITH new AS (
    INSERT INTO tokenmeter.ledger ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM ledger_staging
    ON CONFLICT (event_id) DO NOTHING
    RETURNING tenant_id, ts, provider, model, feature, user_id, environment, price_status, input_tokens,
              output_tokens, cache_read_tokens, cache_write_tokens, input_cost, output_cost, total_cost
)
INSERT INTO new_minutes {_MINUTE_SUMS.format(src="new", source="new")}
"""
# The absolute totals of the windows just advanced, returned by the upsert itself.
_ADVANCE_ROLLUPS = f"""
WITH advanced AS ({_ROLLUP_UPSERT.format(minutes="new_minutes")} RETURNING r.*)
SELECT {_ROLLUP_COLUMNS} FROM advanced AS r LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
"""
_NEW_PER_TENANT = "SELECT tenant_id, sum(calls), sum(cost) FROM new_minutes WHERE dimension = 'tenant' GROUP BY 1"

# When some of the batch was already in the ledger (a replay), every window the batch belongs to is read
# back, duplicates' windows included: that repairs a mirror left stale by a worker killed between its
# Postgres commit and its own Redis write.
_TOUCHED_ROLLUPS = f"""
WITH minutes AS ({_MINUTE_SUMS.format(src="staging", source="ledger_staging AS staging")})
SELECT {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r
JOIN (SELECT DISTINCT m.tenant_id, g.granularity,
             date_trunc(g.granularity, m.minute, coalesce(zone.time_zone, 'UTC')) AS window_start, m.dimension, m.value
      FROM minutes AS m
      LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = m.tenant_id
      CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month')) AS g(granularity)
      WHERE g.granularity <> 'minute' OR m.dimension NOT IN ('user', 'environment')) AS k
  ON (r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value)
   = (k.tenant_id, k.granularity, k.window_start, k.dimension, k.value)
LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
"""


def _row(item: PricedEvent) -> tuple[object, ...]:
    e, p = item.event, item.price
    return (
        e.event_id,
        e.timestamp,
        e.tenant_id,
        e.provider,
        e.model,
        e.user_id,
        e.feature,
        e.environment,
        e.trace_id,
        e.session_id,
        e.team_id,
        e.request_id,
        e.input_tokens,
        e.output_tokens,
        e.cache_read_tokens,
        e.cache_write_tokens,
        e.reasoning_tokens,
        e.latency_ms,
        e.status,
        e.estimated,
        json.dumps(e.tags) if e.tags else "{}",  # most events have none: no encoder call
        p.status,
        p.input_cost,
        p.output_cost,
        p.total_cost,
        p.source,
    )


def write_batch(conn: psycopg.Connection, batch: Sequence[PricedEvent]) -> BatchResult:
    """Write a batch in one transaction; return the new-row count and the touched rollups' totals."""
    if not batch:
        return BatchResult(0, [])
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ledger_staging"
            " (LIKE tokenmeter.ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_minutes (tenant_id text, minute timestamptz, dimension text,"
            " value text, calls bigint, unpriced_calls bigint, input_tokens numeric, output_tokens numeric,"
            " cache_read_tokens numeric, cache_write_tokens numeric, input_cost numeric, output_cost numeric,"
            " cost numeric) ON COMMIT DELETE ROWS"
        )
        with conn.cursor().copy(f"COPY ledger_staging ({_COLUMN_LIST}) FROM STDIN") as copy:
            for item in batch:
                copy.write_row(_row(item))
        conn.execute(_INSERT_NEW_ROWS)
        rollups = [Rollup(*row) for row in conn.execute(_ADVANCE_ROLLUPS)]
        new = conn.execute(_NEW_PER_TENANT).fetchall()
        inserted = sum(int(calls) for _, calls, _ in new)
        if inserted < len(batch):
            rollups = [Rollup(*row) for row in conn.execute(_TOUCHED_ROLLUPS)]
    return BatchResult(inserted, rollups, {tenant: cost for tenant, _, cost in new})


def tenant_time_zone(conn: psycopg.Connection, tenant_id: str) -> str:
    row = conn.execute("SELECT time_zone FROM tokenmeter.tenants WHERE tenant_id = %s", (tenant_id,)).fetchone()
    return str(row[0]) if row else "UTC"


def set_time_zone(conn: psycopg.Connection, tenant_id: str, time_zone: str) -> list[Rollup]:
    """Set a tenant's time zone and rebuild its rollups from the ledger in that zone, in one
    transaction; return its day, week and month rollups of the last 40 days (for the Redis mirror).

    The locks wait for batches in flight and hold new ones back until the rebuild commits, so no
    batch advances a window of the old zone after it."""
    with conn.transaction():
        conn.execute("LOCK TABLE tokenmeter.ledger, tokenmeter.rollups IN SHARE ROW EXCLUSIVE MODE")
        conn.execute(
            "INSERT INTO tokenmeter.tenants (tenant_id, time_zone) VALUES (%s, %s) ON CONFLICT (tenant_id)"
            " DO UPDATE SET time_zone = excluded.time_zone, updated_at = now()",
            (tenant_id, time_zone),
        )
        conn.execute("DELETE FROM tokenmeter.rollups WHERE tenant_id = %s", (tenant_id,))
        source = "(SELECT * FROM tokenmeter.ledger WHERE tenant_id = %(tenant)s) AS ledger"
        conn.execute(_rollup_upsert("ledger", source), {"tenant": tenant_id})
        rows = conn.execute(
            f"SELECT {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r"
            " LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id"
            " WHERE r.tenant_id = %s AND r.granularity IN ('day', 'week', 'month')"
            " AND r.window_start > now() - interval '40 days'",
            (tenant_id,),
        ).fetchall()
    return [Rollup(*row) for row in rows]


def scope_rollups(conn: psycopg.Connection, tenant_id: str, dimension: str, value: str) -> list[Rollup]:
    """The newest day, week and month window of one scope (the Redis mirror keeps only open ones)."""
    rows = conn.execute(
        f"SELECT DISTINCT ON (r.granularity) {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r"
        " LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id"
        " WHERE r.tenant_id = %s AND r.dimension = %s AND r.dimension_value = %s"
        " AND r.granularity IN ('day', 'week', 'month') ORDER BY r.granularity, r.window_start DESC",
        (tenant_id, dimension, value),
    ).fetchall()
    conn.commit()
    return [Rollup(*row) for row in rows]
