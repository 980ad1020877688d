-- The per-call ledger, partitioned by the UTC month of `ts` (issue #14 item 5): a month is one table,
-- so old months can be detached and archived (`tokenmeter ledger detach --month YYYY-MM`) and queries
-- over a period read only its months. Rollups, invoices and reports read the same columns as before.
--
-- De-duplication. A partitioned table's unique constraints must contain the partition key, so
-- `event_id` alone can no longer be the ledger's primary key, and (event_id, ts) would break the
-- contract: DESIGN.md §1 counts an event_id once, forever, and an id that comes back with another
-- timestamp (a producer that re-stamps a retry, a backfill that re-sends) would become a second row in
-- another month and be billed twice. The horizon of record is therefore `tokenmeter.ledger_ids`
-- (event_id PRIMARY KEY, ts), not partitioned: the sink inserts a batch's ids there with ON CONFLICT DO
-- NOTHING and writes to the ledger, in the same transaction, only the rows whose id was new (the
-- first of each id wins, whatever its ts). Its rows (~100 bytes with their index entry) stay when a
-- month is archived, so a replay of archived events is still counted once. The ledger itself carries
-- no event_id index any more: that index moved to ledger_ids, so a batch maintains as many indexes as
-- before plus one narrow heap row per event.
--
-- Partitions. No DEFAULT partition: a row there would have to be moved out before its month's
-- partition could be attached, under a lock, and it cannot be detached as a month. Instead the sink
-- creates the month partitions a batch needs before writing it (`ensure_ledger_partition`; cheap: a
-- per-process cache of known months, the catalog only for months it has not seen), plus next month's
-- ahead of time. A partition is created as a plain table and then ATTACHed, which takes SHARE UPDATE
-- EXCLUSIVE on the ledger (inserts and reports go on); CREATE TABLE … PARTITION OF would take ACCESS
-- EXCLUSIVE and queue every writer behind the longest running report.
--
-- This migration moves an existing ledger in one transaction (every row is copied once: it holds the
-- ledger's lock for about the time of that copy). A worker of the previous version stops at its next
-- batch (its ON CONFLICT (event_id) has no constraint to use: a transient error, retried, never a
-- double count) until it is replaced.

CREATE FUNCTION tokenmeter.ensure_ledger_partition(day date) RETURNS regclass
LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', day::timestamp)::date;  -- timestamp, not timestamptz: no session zone
    -- to_char, not ::text: a cast's text depends on the session's DateStyle.
    part text := 'ledger_' || to_char(first, 'YYYY_MM');
    found regclass;
BEGIN
    -- Catalog queries, not to_regclass: each takes a fresh snapshot, so after waiting for another
    -- session's CREATE they see its table (a name lookup could still answer from a cached miss).
    SELECT c.oid INTO found FROM pg_class AS c
    WHERE c.relname = part AND c.relnamespace = 'tokenmeter'::regnamespace;
    IF found IS NULL THEN
        BEGIN
            EXECUTE format(
                'CREATE TABLE tokenmeter.%I (LIKE tokenmeter.ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
            -- Bounds with an explicit +00: they must not depend on the session's TimeZone.
            EXECUTE format(
                'ALTER TABLE tokenmeter.ledger ATTACH PARTITION tokenmeter.%I FOR VALUES FROM (%L) TO (%L)',
                part, to_char(first, 'YYYY-MM-DD') || ' 00:00:00+00',
                to_char(first + interval '1 month', 'YYYY-MM-DD') || ' 00:00:00+00');
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            -- Another session created it after our look (our CREATE waited for that session to commit,
            -- then failed on the name): its partition serves us too.
            NULL;
        END;
        SELECT c.oid INTO found FROM pg_class AS c
        WHERE c.relname = part AND c.relnamespace = 'tokenmeter'::regnamespace;
    END IF;
    IF found IS NULL OR NOT EXISTS (
        SELECT 1 FROM pg_inherits WHERE inhrelid = found AND inhparent = 'tokenmeter.ledger'::regclass
    ) THEN
        RAISE EXCEPTION 'tokenmeter.% is not a partition of tokenmeter.ledger', part
            USING HINT = 'a table of that name is in the way: move it out of the tokenmeter schema';
    END IF;
    RETURN found;
END $$;

ALTER TABLE tokenmeter.ledger RENAME TO ledger_unpartitioned;

CREATE TABLE tokenmeter.ledger (
    event_id           text NOT NULL,
    ts                 timestamptz NOT NULL,
    tenant_id          text NOT NULL,
    provider           text NOT NULL,
    model              text NOT NULL,
    user_id            text,
    feature            text,
    environment        text,
    trace_id           text,
    session_id         text,
    team_id            text,
    request_id         text,
    input_tokens       bigint NOT NULL CHECK (input_tokens >= 0),
    output_tokens      bigint NOT NULL CHECK (output_tokens >= 0),
    cache_read_tokens  bigint NOT NULL CHECK (cache_read_tokens >= 0),
    cache_write_tokens bigint NOT NULL CHECK (cache_write_tokens >= 0),
    reasoning_tokens   bigint,
    latency_ms         bigint,
    status             text,
    estimated          boolean NOT NULL DEFAULT false,
    tags               jsonb NOT NULL DEFAULT '{}'::jsonb,
    price_status       text NOT NULL CHECK (price_status IN ('priced', 'unpriced')),
    input_cost         numeric(38, 12) NOT NULL,
    output_cost        numeric(38, 12) NOT NULL,
    total_cost         numeric(38, 12) NOT NULL,
    price_source       text NOT NULL,
    inserted_at        timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);

-- Every month the old ledger has, and this month and the next (so the sink's first batches need no DDL).
SELECT tokenmeter.ensure_ledger_partition(month)
FROM (
    SELECT DISTINCT date_trunc('month', ts AT TIME ZONE 'UTC')::date AS month FROM tokenmeter.ledger_unpartitioned
    UNION SELECT date_trunc('month', now() AT TIME ZONE 'UTC')::date
    UNION SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + interval '1 month')::date
) AS months
ORDER BY month;

-- Filled first, indexed after: one sorted build per index is faster than maintaining it row by row.
CREATE TABLE tokenmeter.ledger_ids (
    event_id text NOT NULL,
    ts       timestamptz NOT NULL  -- which month holds the row; lets the ids of a retention be found
);
INSERT INTO tokenmeter.ledger_ids (event_id, ts) SELECT event_id, ts FROM tokenmeter.ledger_unpartitioned;
ALTER TABLE tokenmeter.ledger_ids ADD PRIMARY KEY (event_id);

INSERT INTO tokenmeter.ledger (
    event_id, ts, tenant_id, provider, model, user_id, feature, environment, trace_id, session_id, team_id,
    request_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, latency_ms,
    status, estimated, tags, price_status, input_cost, output_cost, total_cost, price_source, inserted_at)
SELECT
    event_id, ts, tenant_id, provider, model, user_id, feature, environment, trace_id, session_id, team_id,
    request_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, reasoning_tokens, latency_ms,
    status, estimated, tags, price_status, input_cost, output_cost, total_cost, price_source, inserted_at
FROM tokenmeter.ledger_unpartitioned;

-- The old table goes before the indexes are made: they keep their names (0002, 0005).
DROP TABLE tokenmeter.ledger_unpartitioned;
CREATE INDEX ledger_tenant_ts ON tokenmeter.ledger (tenant_id, ts);
CREATE INDEX ledger_ts ON tokenmeter.ledger (ts);
CREATE INDEX ledger_tenant_trace ON tokenmeter.ledger (tenant_id, trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX ledger_tenant_session ON tokenmeter.ledger (tenant_id, session_id) WHERE session_id IS NOT NULL;

-- Detached months live on as plain tables in tokenmeter_archive (out of the way of a new partition of
-- the same month, should late events arrive), recorded here until someone dumps and drops them.
CREATE SCHEMA IF NOT EXISTS tokenmeter_archive;
CREATE TABLE tokenmeter.ledger_archive (
    table_name  text PRIMARY KEY,  -- in tokenmeter_archive
    month       date NOT NULL,     -- the UTC month it held
    rows        bigint NOT NULL,
    detached_at timestamptz NOT NULL DEFAULT now()
);

-- A tenant's rollups are rebuilt from the ledger when its time zone changes (sinks.postgres.set_time_zone):
-- the calls of an archived month are no longer there to rebuild from, so that is refused while the
-- tenant has usage in an archived month, instead of silently dropping that month from its reports.
CREATE FUNCTION tokenmeter.refuse_rebuild_over_archive(tenant text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    months text;
BEGIN
    SELECT string_agg(DISTINCT to_char(a.month, 'YYYY-MM'), ', ') INTO months
    FROM tokenmeter.ledger_archive AS a
    JOIN tokenmeter.rollups AS r ON r.tenant_id = tenant AND r.granularity = 'month' AND r.dimension = 'tenant'
    LEFT JOIN tokenmeter.tenants AS zone ON zone.tenant_id = r.tenant_id
    WHERE r.window_start < (a.month::timestamp + interval '1 month') AT TIME ZONE 'UTC'
      AND ((r.window_start AT TIME ZONE coalesce(zone.time_zone, 'UTC')) + interval '1 month')
          AT TIME ZONE coalesce(zone.time_zone, 'UTC') > a.month::timestamp AT TIME ZONE 'UTC';
    IF months IS NOT NULL THEN
        RAISE EXCEPTION 'tenant % has usage in archived ledger months (%): attach them again before changing its time zone (its rollups are rebuilt from the ledger)',
            tenant, months USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
END $$;

ANALYZE tokenmeter.ledger;
ANALYZE tokenmeter.ledger_ids;
