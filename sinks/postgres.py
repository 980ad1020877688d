"""The Postgres sink: ledger rows and rollups, written in batches, idempotently.

One transaction per batch: COPY the batch into a temporary staging table, insert its ids into
``tokenmeter.ledger_ids`` with ``ON CONFLICT (event_id) DO NOTHING``, insert into the ledger only the
rows whose id that returned, and advance the rollups from exactly those rows. A replayed batch (a
worker killed before it committed its Kafka offsets) inserts nothing and so changes nothing: each
distinct event_id is counted once, whatever Kafka redelivers and whatever timestamp a repeat carries.

The ledger is partitioned by the UTC month of ``ts`` (migration 0010 says why the ids live apart);
the month partitions a batch needs are created before it is written (``ensure_partitions``), and old
months can be detached for archive (``detach_month``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal

import psycopg
from psycopg import sql

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
    "service_tier",
    "processing",
    "cache_write_1h_tokens",
    "usage_details",
    "api_key_id",
)
_COLUMN_LIST = ", ".join(_COLUMNS)

GRANULARITIES = ("minute", "hour", "day", "week", "month")
DIMENSIONS = ("tenant", "feature", "model", "user", "environment", "team", "api_key")  # and tag:<name>, see below
# Rollups are advanced in two steps, so Postgres aggregates each event 5 times, not 23:
# 1. per (tenant, UTC minute, dimension, value), the events' sums (``_MINUTE_SUMS``): in a batch most
#    events share their minute and values, so this is far fewer rows than events. The events are summed
#    per minute and combination of attributes first, and those (a quarter of the rows in the bench's
#    batches) spread over the dimensions: 2 us less Postgres time per event than spreading every event;
# 2. those minutes rolled into every granularity and upserted (``_ROLLUP_UPSERT``), in key order so that
#    concurrent batches lock rows in one order (no deadlocks). Windows are truncated in the tenant's time
#    zone (UTC for tenants without one); every zone's offset is whole minutes, so a UTC minute lies in
#    exactly one local hour, day, week and month.
# Dimension values: '' for the tenant itself and for events without that attribute. No minute windows
# per user or environment: nothing reads them, and they were the most rows of all (one per user and
# minute; state must stay bounded under many users). Teams and API keys (budget hierarchies) have rows only
# for events that carry one, and like tags only day, week and month windows (budgets and reports read those).
# A tag has rows (dimension 'tag:<name>', value the tag's) only for the (tenant, tag name) pairs a caller
# passes, the ones some budget names, so tags never multiply the rollups by what events carry (DESIGN.md
# §4.5); without any, the query is as before.
_MINUTE_SUMS = """
SELECT {src}.tenant_id, {src}.minute, d.dimension, d.value,
       sum({src}.calls) AS calls, sum({src}.unpriced_calls) AS unpriced_calls,
       sum({src}.input_tokens) AS input_tokens, sum({src}.output_tokens) AS output_tokens,
       sum({src}.cache_read_tokens) AS cache_read_tokens, sum({src}.cache_write_tokens) AS cache_write_tokens,
       sum({src}.input_cost) AS input_cost, sum({src}.output_cost) AS output_cost, sum({src}.cost) AS cost
FROM (
    SELECT {src}.tenant_id, date_trunc('minute', {src}.ts, 'UTC') AS minute, {src}.feature, {src}.provider,
           {src}.model, {src}.user_id, {src}.environment, {src}.team_id, {src}.api_key_id,{tag_column}
           count(*) AS calls, count(*) FILTER (WHERE {src}.price_status = 'unpriced') AS unpriced_calls,
           sum({src}.input_tokens) AS input_tokens, sum({src}.output_tokens) AS output_tokens,
           sum({src}.cache_read_tokens) AS cache_read_tokens, sum({src}.cache_write_tokens) AS cache_write_tokens,
           sum({src}.input_cost) AS input_cost, sum({src}.output_cost) AS output_cost,
           sum({src}.total_cost) AS cost
    FROM {source}
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9{tag_group}
) AS {src}
CROSS JOIN LATERAL (VALUES
    ('tenant', ''),
    ('feature', coalesce({src}.feature, '')),
    ('model', {src}.provider || '/' || {src}.model),
    ('user', coalesce({src}.user_id, '')),
    ('environment', coalesce({src}.environment, '')),
    ('team', {src}.team_id),
    ('api_key', {src}.api_key_id){tags}
) AS d(dimension, value)
WHERE d.value IS NOT NULL
GROUP BY 1, 2, 3, 4
"""
# The budgeted tag names arrive as one JSON object, tenant -> [tag names]: a row looks up its own tenant's
# names (a key lookup) instead of scanning every budgeted pair.
_TAG_VALUES = """
    UNION ALL SELECT 'tag:' || t.name, {src}.tags ->> t.name
    FROM jsonb_array_elements_text(%(tag_names)s::jsonb -> {src}.tenant_id) AS t(name)
    WHERE {src}.tags ? t.name"""


def _minute_sums(src: str, source: str, tagged: bool = False) -> str:
    """Step 1 over ``source`` (aliased ``src``); ``tagged``: with the tags named by the query's parameters."""
    return _MINUTE_SUMS.format(
        src=src,
        source=source,
        tag_column=f" {src}.tags," if tagged else "",
        tag_group=", 10" if tagged else "",
        tags=_TAG_VALUES.format(src=src) if tagged else "",
    )


def _tag_parameters(tag_dimensions: Collection[tuple[str, str]]) -> dict[str, str]:
    names: dict[str, list[str]] = {}
    for tenant_id, name in tag_dimensions:
        names.setdefault(tenant_id, []).append(name)
    return {"tag_names": json.dumps(names)}


_ROLLUP_UPSERT = """
INSERT INTO tokenmeter.rollups AS r
SELECT m.tenant_id, g.granularity, date_trunc(g.granularity, m.minute, coalesce(zone.time_zone, 'UTC')),
       m.dimension, m.value, sum(m.calls), sum(m.unpriced_calls), sum(m.input_tokens), sum(m.output_tokens),
       sum(m.cache_read_tokens), sum(m.cache_write_tokens), sum(m.input_cost), sum(m.output_cost), sum(m.cost)
FROM {minutes} AS m
LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = m.tenant_id
CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month')) AS g(granularity)
WHERE g.granularity IN ('day', 'week', 'month') OR m.dimension IN ('tenant', 'feature', 'model')
   OR (g.granularity = 'hour' AND m.dimension IN ('user', 'environment'))
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


def _rollup_upsert(src: str, source: str, tagged: bool = False) -> str:
    """Advance the rollups by the rows of ``source`` (aliased ``src``); the caller passes them exactly once."""
    minutes = f"({_minute_sums(src, source, tagged)})"
    return _ROLLUP_UPSERT.format(minutes=minutes)


@dataclass(frozen=True)
class BatchResult:
    inserted: int  # ledger rows that were new; the rest were duplicates
    rollups: list[Rollup]  # every window the batch touched, with its totals after the batch
    new_spend: dict[str, Decimal] = field(default_factory=dict)  # tenant → cost of its new rows
    seconds: float = 0.0  # how long the sinks took (Postgres and Redis)


# The batch's new ledger rows (a replayed id inserts nothing), summed per minute and scope into a
# temporary table: the rollups advance from it, and it gives each tenant's new calls and spend. The ids
# are the de-duplication of record (``ledger_ids``); the staging table holds each id once (``write_batch``),
# so the rows whose id was new are exactly one each. IN, not a join: Postgres hashes the new ids (a join
# sorted both sides, 30 % slower).
def _insert_new_rows(tagged: bool) -> str:
    tags = " tags," if tagged else ""  # events' tags are copied out only when some are rolled up
    return f"""
WITH fresh AS (
    INSERT INTO tokenmeter.ledger_ids (event_id, ts)
    SELECT event_id, ts FROM ledger_staging
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id
), new AS (
    INSERT INTO tokenmeter.ledger ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM ledger_staging WHERE event_id IN (SELECT event_id FROM fresh)
    RETURNING tenant_id, ts, provider, model, feature, user_id, environment, team_id, api_key_id,{tags}
              price_status, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, input_cost,
              output_cost, total_cost
)
INSERT INTO new_minutes {_minute_sums("new", "new", tagged)}
"""


# Without tag dimensions and with them (the second takes the tag parameters).
_INSERT_NEW_ROWS_BY_TAGGED = {tagged: _insert_new_rows(tagged) for tagged in (False, True)}
# The absolute totals of the windows just advanced, returned by the upsert itself.
_ADVANCE_ROLLUPS = f"""
WITH advanced AS ({_ROLLUP_UPSERT.format(minutes="new_minutes")} RETURNING r.*)
SELECT {_ROLLUP_COLUMNS} FROM advanced AS r LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
"""
_NEW_PER_TENANT = "SELECT tenant_id, sum(calls), sum(cost) FROM new_minutes WHERE dimension = 'tenant' GROUP BY 1"


# When some of the batch was already in the ledger (a replay), every window the batch belongs to is read
# back, duplicates' windows included: that repairs a mirror left stale by a worker killed between its
# Postgres commit and its own Redis write.
def _touched_rollups(tagged: bool) -> str:
    return f"""
WITH minutes AS ({_minute_sums("staging", "ledger_staging AS staging", tagged)})
SELECT {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r
JOIN (SELECT DISTINCT m.tenant_id, g.granularity,
             date_trunc(g.granularity, m.minute, coalesce(zone.time_zone, 'UTC')) AS window_start, m.dimension, m.value
      FROM minutes AS m
      LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = m.tenant_id
      CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month')) AS g(granularity)
      WHERE g.granularity IN ('day', 'week', 'month') OR m.dimension IN ('tenant', 'feature', 'model')
         OR (g.granularity = 'hour' AND m.dimension IN ('user', 'environment'))) AS k
  ON (r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value)
   = (k.tenant_id, k.granularity, k.window_start, k.dimension, k.value)
LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
"""


_TOUCHED_ROLLUPS_BY_TAGGED = {tagged: _touched_rollups(tagged) for tagged in (False, True)}


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
        e.service_tier,
        e.processing,
        e.cache_write_1h_tokens,
        json.dumps(e.usage_details) if e.usage_details else None,
        e.api_key_id,
    )


# The UTC months (first days) whose ledger partition this process knows exists, per database: a batch
# asks the catalog only about months it has not seen. A month detached since is noticed by its insert
# failing (``write_batch``).
_known_months: dict[tuple[str, str, str], set[date]] = {}


def _database(conn: psycopg.Connection) -> tuple[str, str, str]:
    return (conn.info.host, str(conn.info.port), conn.info.dbname)


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def ensure_partitions(conn: psycopg.Connection, months: Iterable[date]) -> None:
    """Make sure the ledger has a partition for each of these UTC months (given by their first day).

    In its own short transaction before the batch's (when the connection is idle), so the lock that
    attaching a partition takes on the ledger is not held while the batch waits for rollup rows.
    Concurrent workers creating the same month are handled in ``tokenmeter.ensure_ledger_partition``."""
    known = _known_months.setdefault(_database(conn), set())
    missing = sorted(set(months) - known)
    if missing:
        with conn.transaction():
            conn.execute("SELECT tokenmeter.ensure_ledger_partition(m) FROM unnest(%s::date[]) AS m", (missing,))
        known.update(missing)


def write_batch(
    conn: psycopg.Connection, batch: Sequence[PricedEvent], tag_dimensions: Collection[tuple[str, str]] = ()
) -> BatchResult:
    """Write a batch in one transaction; return the new-row count and the touched rollups' totals.
    ``tag_dimensions``: the (tenant, tag name) pairs that get tag rollups (the ones budgets name)."""
    if not batch:
        return BatchResult(0, [])
    try:
        return _write_batch(conn, batch, tag_dimensions)
    except psycopg.errors.CheckViolation:
        # "No partition of relation ledger found for row": a month this process knew was detached since.
        # Forget what it knew and write once more (the months are looked up again); a row failing a real
        # CHECK fails again and is reported as before.
        _known_months.pop(_database(conn), None)
        return _write_batch(conn, batch, tag_dimensions)


def _write_batch(
    conn: psycopg.Connection, batch: Sequence[PricedEvent], tag_dimensions: Collection[tuple[str, str]]
) -> BatchResult:
    # Each id once, the first one winning (as the pipeline's Deduplicator does): the ledger insert takes
    # the staging rows whose id ledger_ids accepted, so a second row of an id would be a second count.
    unique: dict[str, PricedEvent] = {}
    months: set[tuple[int, int]] = set()
    for item in batch:
        event = item.event
        if event.event_id not in unique:
            unique[event.event_id] = item
            ts = event.timestamp
            if ts.tzinfo is not UTC:  # validated events are UTC already
                ts = ts.astimezone(UTC)
            months.add((ts.year, ts.month))
    now = datetime.now(UTC)
    # Next month's partition is made ahead, so the turn of the month needs no DDL in the batch path.
    ensure_partitions(conn, {date(y, m, 1) for y, m in months} | {_next_month(date(now.year, now.month, 1))})
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
            for item in unique.values():
                copy.write_row(_row(item))
        # Only the batch's tenants whose tags get rollups: a batch without any takes the un-tagged SQL and no
        # lock, whatever other tenants' budgets name.
        batch_tenants = {item.event.tenant_id for item in unique.values()}
        batch_tags = [(tenant, name) for tenant, name in tag_dimensions if tenant in batch_tenants]
        tagged = bool(batch_tags)
        tags = _tag_parameters(batch_tags) if tagged else None
        if tagged:
            _share_tag_locks(conn, batch_tenants, batch_tags)
        conn.execute(_INSERT_NEW_ROWS_BY_TAGGED[tagged], tags)
        rollups = [Rollup(*row) for row in conn.execute(_ADVANCE_ROLLUPS)]
        new = conn.execute(_NEW_PER_TENANT).fetchall()
        inserted = sum(int(calls) for _, calls, _ in new)
        if inserted < len(batch):
            rollups = [Rollup(*row) for row in conn.execute(_TOUCHED_ROLLUPS_BY_TAGGED[tagged], tags)]
    return BatchResult(inserted, rollups, {tenant: cost for tenant, _, cost in new})


def tenant_time_zone(conn: psycopg.Connection, tenant_id: str) -> str:
    row = conn.execute("SELECT time_zone FROM tokenmeter.tenants WHERE tenant_id = %s", (tenant_id,)).fetchone()
    return str(row[0]) if row else "UTC"


def set_time_zone(conn: psycopg.Connection, tenant_id: str, time_zone: str) -> list[Rollup]:
    """Set a tenant's time zone and rebuild its rollups from the ledger in that zone, in one
    transaction; return its day, week and month rollups of the last 40 days (for the Redis mirror).

    The locks wait for batches in flight and hold new ones back until the rebuild commits, so no
    batch advances a window of the old zone after it. Refused (an error from Postgres) while the
    tenant has usage in a month detached for archive: its calls are not there to rebuild from."""
    with conn.transaction():
        conn.execute("LOCK TABLE tokenmeter.ledger, tokenmeter.rollups IN SHARE ROW EXCLUSIVE MODE")
        conn.execute("SELECT tokenmeter.refuse_rebuild_over_archive(%s)", (tenant_id,))
        conn.execute(
            "INSERT INTO tokenmeter.tenants (tenant_id, time_zone) VALUES (%s, %s) ON CONFLICT (tenant_id)"
            " DO UPDATE SET time_zone = excluded.time_zone, updated_at = now()",
            (tenant_id, time_zone),
        )
        tag_dimensions = _tenant_tag_dimensions(conn, tenant_id)  # the tags budgeted so far keep their rollups
        conn.execute("DELETE FROM tokenmeter.rollups WHERE tenant_id = %s", (tenant_id,))
        source = "(SELECT * FROM tokenmeter.ledger WHERE tenant_id = %(tenant)s) AS ledger"
        conn.execute(_rollup_upsert("ledger", source, True), {"tenant": tenant_id, **_tag_parameters(tag_dimensions)})
        rows = conn.execute(
            f"SELECT {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r"
            " LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id"
            " WHERE r.tenant_id = %s AND r.granularity IN ('day', 'week', 'month')"
            " AND r.window_start > now() - interval '40 days'",
            (tenant_id,),
        ).fetchall()
    return [Rollup(*row) for row in rows]


def _tenant_tag_dimensions(conn: psycopg.Connection, tenant_id: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT DISTINCT substr(dimension, 5) FROM tokenmeter.rollups"
        " WHERE tenant_id = %s AND granularity = 'month' AND dimension LIKE 'tag:%%'",
        (tenant_id,),
    ).fetchall()
    return [(tenant_id, name) for (name,) in rows]


# ---------------------------------------------------------------- tag rollups: rebuild and its bookkeeping
# A rebuild of one (tenant, tag name) must count every ledger row of the tenant once: rows committed before
# it by a scan, rows committed after it by the batches (which advance the tag's rollups once they name it).
# It used to lock the ledger and rollups tables for the whole scan, stalling every tenant's batches for up
# to the statement timeout. Now:
# - the bulk is summed with no lock at all, from one snapshot, and the ids it counted are kept aside;
# - then a transaction-level advisory lock keyed by the tenant is taken exclusively: the batches that count
#   tags of that tenant take it shared (``_share_tag_locks``), so it waits for those in flight and holds new
#   ones back. Under it only the rows committed since the snapshot are summed (an anti-join on the counted
#   ids, over the tenant's rows), the tag's rollups replaced and the pair recorded as complete.
# Other tenants' batches never wait; a batch holding the tenant's calls waits only for the short second step.
# Batches of a tenant no budget names a tag of take no lock (the un-tagged hot path is unchanged).
_TAG_LOCK = "pg_advisory_xact_lock{mode}(hashtext('tokenmeter.tag_rollups'), hashtext({tenant}))"
_REBUILD_TABLES = (
    "CREATE TEMP TABLE IF NOT EXISTS tag_rebuild_ids (event_id text PRIMARY KEY) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS tag_rebuild_minutes (tenant_id text, minute timestamptz, dimension text,"
    " value text, calls bigint, unpriced_calls bigint, input_tokens numeric, output_tokens numeric,"
    " cache_read_tokens numeric, cache_write_tokens numeric, input_cost numeric, output_cost numeric,"
    " cost numeric) ON COMMIT DELETE ROWS",
)
# One tag's minute sums over ``rows`` (the tenant's ledger rows carrying the tag): only the tag's dimension,
# not the seven others ``_MINUTE_SUMS`` would compute and drop.
_TAG_MINUTES = """
INSERT INTO tag_rebuild_minutes
SELECT tenant_id, date_trunc('minute', ts, 'UTC'), 'tag:' || %(name)s::text, tags ->> %(name)s::text,
       count(*), count(*) FILTER (WHERE price_status = 'unpriced'), sum(input_tokens), sum(output_tokens),
       sum(cache_read_tokens), sum(cache_write_tokens), sum(input_cost), sum(output_cost), sum(total_cost)
FROM rows GROUP BY 1, 2, 3, 4
"""
_TAGGED_ROWS = "SELECT * FROM tokenmeter.ledger AS l WHERE l.tenant_id = %(tenant)s AND l.tags ? %(name)s::text"
# Step 1, one statement so one snapshot: the sums and the ids they counted.
_REBUILD_BULK = f"""
WITH rows AS MATERIALIZED ({_TAGGED_ROWS}),
     counted AS (INSERT INTO tag_rebuild_ids SELECT event_id FROM rows)
{_TAG_MINUTES}
"""
# Step 2, under the tenant's lock: the rows committed since step 1's snapshot.
_REBUILD_REST = f"""
WITH rows AS MATERIALIZED (
    {_TAGGED_ROWS} AND NOT EXISTS (SELECT 1 FROM tag_rebuild_ids AS i WHERE i.event_id = l.event_id))
{_TAG_MINUTES}
"""

_ZERO_TAG_ROLLUPS = (
    "UPDATE tokenmeter.rollups SET calls = 0, unpriced_calls = 0, input_tokens = 0, output_tokens = 0,"
    " cache_read_tokens = 0, cache_write_tokens = 0, input_cost = 0, output_cost = 0, cost = 0"
    " WHERE tenant_id = %s AND dimension = %s"
)


def _share_tag_locks(
    conn: psycopg.Connection, batch_tenants: Collection[str], tag_dimensions: Collection[tuple[str, str]]
) -> None:
    """Take, for this transaction, the shared tag lock of each tenant of the batch whose tags get rollups."""
    tenants = sorted({tenant for tenant, _ in tag_dimensions}.intersection(batch_tenants))
    if tenants:
        lock = _TAG_LOCK.format(mode="_shared", tenant="t")
        conn.execute(f"SELECT {lock} FROM unnest(%s::text[]) AS t", (tenants,))


def rebuild_tag_rollups(conn: psycopg.Connection, tenant_id: str, tag_name: str) -> None:
    """Rebuild a tenant's rollups of one tag from the ledger (attached months) and record the pair as
    complete (``tokenmeter.tag_scopes``), in one transaction: a tag has rollups only while a budget names it
    (``write_batch``), so when one starts to, its spend so far is counted here. Locks only this tenant's
    tag-counting batches, and only for the remainder (see above)."""
    params = {"tenant": tenant_id, "name": tag_name}
    with conn.transaction():
        for statement in _REBUILD_TABLES:
            conn.execute(statement)
        conn.execute(_REBUILD_BULK, params)
        conn.execute(f"SELECT {_TAG_LOCK.format(mode='', tenant='%(tenant)s')}", params)
        conn.execute(_REBUILD_REST, params)
        # Zeroed, then advanced by the sums (an upsert adds to them): the worker's role may update rollups
        # but not delete them (deploy/sql/roles.sql).
        conn.execute(_ZERO_TAG_ROLLUPS, (tenant_id, f"tag:{tag_name}"))
        conn.execute(_ROLLUP_UPSERT.format(minutes="tag_rebuild_minutes"))
        conn.execute(
            "INSERT INTO tokenmeter.tag_scopes (tenant_id, tag_name, state, rebuilt_at)"
            " VALUES (%(tenant)s, %(name)s, 'complete', now()) ON CONFLICT (tenant_id, tag_name)"
            " DO UPDATE SET state = 'complete', rebuilt_at = now(), stale_since = NULL",
            params,
        )


def ensure_tag_rollups(conn: psycopg.Connection, tenant_id: str, tag_name: str) -> bool:
    """Rebuild one tag's rollups unless they are recorded complete (a worker restart finds them so);
    return whether it rebuilt."""
    with conn.transaction():
        row = conn.execute(
            "SELECT state FROM tokenmeter.tag_scopes WHERE tenant_id = %s AND tag_name = %s", (tenant_id, tag_name)
        ).fetchone()
    if row is not None and row[0] == "complete":
        return False
    rebuild_tag_rollups(conn, tenant_id, tag_name)
    return True


def complete_tag_scopes(conn: psycopg.Connection) -> set[tuple[str, str]]:
    """The (tenant, tag name) pairs recorded complete: a starting stage 1 keeps counting them until it knows
    whether a budget still names them, so none misses a batch before it is marked stale."""
    with conn.transaction():
        rows = conn.execute("SELECT tenant_id, tag_name FROM tokenmeter.tag_scopes WHERE state = 'complete'")
        return {(tenant, name) for tenant, name in rows}


def mark_tag_scopes_stale(conn: psycopg.Connection, pairs: Collection[tuple[str, str]]) -> None:
    """Record that these (tenant, tag name) pairs stopped being named: their rollups stop advancing, so a
    budget naming them again needs a rebuild. Called before the batches stop counting them."""
    if not pairs:
        return
    tenants, names = zip(*sorted(pairs), strict=True)
    with conn.transaction():
        conn.execute(
            "UPDATE tokenmeter.tag_scopes AS s SET state = 'stale', stale_since = now()"
            " FROM unnest(%s::text[], %s::text[]) AS p(tenant_id, tag_name)"
            " WHERE (s.tenant_id, s.tag_name) = (p.tenant_id, p.tag_name) AND s.state = 'complete'",
            (list(tenants), list(names)),
        )


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


# ---------------------------------------------------------------- month partitions and their archive
_MONTH = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
_PARTITION = re.compile(r"ledger_(\d{4})_(\d{2})(_\d+)?")
DETACH_LOCK_TIMEOUT_S = 10


class PartitionError(ValueError):
    pass


@dataclass(frozen=True)
class LedgerPartition:
    month: str  # the UTC month, YYYY-MM
    table: str  # schema-qualified
    state: str  # attached | archived (detached, in tokenmeter_archive) | dropped (archived, then dropped)
    rows: int | None  # attached: Postgres' estimate (None before it analyzed the table); archived: exact
    bytes: int | None  # with indexes; None once dropped

    def as_json(self) -> dict[str, object]:
        return {"month": self.month, "table": self.table, "state": self.state, "rows": self.rows, "bytes": self.bytes}


def ledger_partitions(conn: psycopg.Connection) -> list[LedgerPartition]:
    """The ledger's month partitions and the months detached for archive, oldest first."""
    found = []
    for name, rows, size in conn.execute(
        "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_inherits AS i"
        " JOIN pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = 'tokenmeter.ledger'::regclass"
    ):
        named = _PARTITION.fullmatch(name)
        month = f"{named[1]}-{named[2]}" if named else "?"
        found.append(LedgerPartition(month, f"tokenmeter.{name}", "attached", rows if rows >= 0 else None, size))
    for name, month, rows, size in conn.execute(
        "SELECT table_name, to_char(month, 'YYYY-MM'), rows,"
        " pg_total_relation_size(to_regclass('tokenmeter_archive.' || quote_ident(table_name)))"
        " FROM tokenmeter.ledger_archive"
    ):
        state = "archived" if size is not None else "dropped"
        found.append(LedgerPartition(month, f"tokenmeter_archive.{name}", state, rows, size))
    return sorted(found, key=lambda p: (p.month, p.state != "attached", p.table))


# Tenants with usage in [start, end) whose invoice of that local month is not finalized. Hour windows,
# as each lies in one local month and they are few (an index range of the rollups, not the month's calls).
_UNFINALIZED = """
SELECT DISTINCT r.tenant_id, to_char(r.window_start AT TIME ZONE coalesce(zone.time_zone, 'UTC'), 'YYYY-MM') AS period
FROM tokenmeter.rollups AS r
LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
WHERE r.granularity = 'hour' AND r.dimension = 'tenant'
  AND r.window_start < %(end)s AND r.window_start > %(start)s - interval '1 hour'
  AND NOT EXISTS (
      SELECT 1 FROM tokenmeter.invoices AS i WHERE i.tenant_id = r.tenant_id
      AND i.period = to_char(r.window_start AT TIME ZONE coalesce(zone.time_zone, 'UTC'), 'YYYY-MM'))
ORDER BY 1, 2
"""


def detach_month(conn: psycopg.Connection, month: str, now: datetime, force: bool = False) -> LedgerPartition:
    """Detach the ledger's partition of a UTC month (``YYYY-MM``) for archive: it becomes the plain table
    ``tokenmeter_archive.ledger_YYYY_MM`` (recorded in ``tokenmeter.ledger_archive``), to be dumped and dropped.

    Refused, unless ``force``, for the current and previous UTC month and later ones (late events still
    arrive), and while a tenant with usage in the month has no finalized invoice for it (in its time zone).
    Rollups, invoices and report breakdowns are unchanged (they read the rollups); the month's ids stay
    in ``ledger_ids``, so replays of its events are still counted once."""
    named = _MONTH.fullmatch(month)
    if not named:
        raise PartitionError(f"the month must be YYYY-MM, got {month!r}")
    first = date(int(named[1]), int(named[2]), 1)
    start = datetime(first.year, first.month, 1, tzinfo=UTC)
    after = _next_month(first)
    end = datetime(after.year, after.month, 1, tzinfo=UTC)
    this_month = date(now.year, now.month, 1)
    previous = date(this_month.year - (this_month.month == 1), (this_month.month - 2) % 12 + 1, 1)
    if first >= previous and not force:
        raise PartitionError(
            f"{month} is the current or previous month (late events still arrive); --force detaches it"
        )
    name = f"ledger_{first:%Y_%m}"
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{DETACH_LOCK_TIMEOUT_S}s'")
        attached = conn.execute(
            "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(%s) AND inhparent = 'tokenmeter.ledger'::regclass",
            (f"tokenmeter.{name}",),
        ).fetchone()
        if attached is None:
            raise PartitionError(f"the ledger has no partition for {month} (see `tokenmeter ledger partitions`)")
        if not force:
            open_invoices = conn.execute(_UNFINALIZED, {"start": start, "end": end}).fetchall()
            if open_invoices:
                listed = ", ".join(f"{tenant} {period}" for tenant, period in open_invoices[:5])
                more = f" and {len(open_invoices) - 5} more" if len(open_invoices) > 5 else ""
                raise PartitionError(
                    f"{month} has unfinalized invoices ({listed}{more}): finalize them"
                    " (`tokenmeter invoice --finalize`) or pass --force"
                )
        taken = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM tokenmeter.ledger_archive UNION"
                " SELECT tablename FROM pg_tables WHERE schemaname = 'tokenmeter_archive'"
            )
        }
        # A month can be archived twice: late events after the first detach land in a new partition.
        archived = next(n for n in (name, *(f"{name}_{i}" for i in range(2, 1000))) if n not in taken)
        try:
            conn.execute(f"ALTER TABLE tokenmeter.ledger DETACH PARTITION tokenmeter.{name}")
        except psycopg.errors.LockNotAvailable:
            raise PartitionError(
                f"the ledger stayed busy for {DETACH_LOCK_TIMEOUT_S} s (a long query on it?); try again"
            ) from None
        if archived != name:
            # Its indexes too: theirs are named after the table, and the first archive of the month has them.
            indexes = conn.execute(
                "SELECT c.relname FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass(%s)",
                (f"tokenmeter.{name}",),
            ).fetchall()
            for (index,) in indexes:
                renamed = archived + index.removeprefix(name) if index.startswith(name) else f"{archived}_{index}"
                conn.execute(
                    sql.SQL("ALTER INDEX tokenmeter.{} RENAME TO {}").format(*map(sql.Identifier, (index, renamed)))
                )
            conn.execute(f"ALTER TABLE tokenmeter.{name} RENAME TO {archived}")
        conn.execute(f"ALTER TABLE tokenmeter.{archived} SET SCHEMA tokenmeter_archive")
        row = conn.execute(
            f"SELECT count(*), pg_total_relation_size('tokenmeter_archive.{archived}')"
            f" FROM tokenmeter_archive.{archived}"
        ).fetchone()
        assert row is not None
        conn.execute(
            "INSERT INTO tokenmeter.ledger_archive (table_name, month, rows) VALUES (%s, %s, %s)",
            (archived, first, row[0]),
        )
    _known_months.pop(_database(conn), None)
    return LedgerPartition(month, f"tokenmeter_archive.{archived}", "archived", int(row[0]), int(row[1]))
