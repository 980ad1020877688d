-- Report summaries per UTC month (issue #15): the sections of a report that the rollups cannot answer
-- (top conversations, latency percentiles, the most expensive calls, spend by service tier and batch)
-- read the per-call ledger, which at millions of calls a month takes seconds. These tables hold the
-- same answers pre-aggregated per tenant and UTC month, exactly:
--   report_conversations   calls, cost, first and last call per conversation (session, else trace)
--   report_latency         calls per latency value in whole milliseconds (percentile_disc from it is exact)
--   report_price_context   calls and cost per service tier and processing ('' = none)
--   report_top_calls       the most expensive calls, at least TOP_CALLS_KEPT per tenant and month
--
-- Off the billing path. A ledger row carries the id of the transaction that wrote it (batch_id, by
-- default), and a statement trigger queues (batch_id, month) for every insert, whoever the writer;
-- `tokenmeter.summarize_queued` folds queued batches' rows into the summaries and dequeues them in one
-- transaction (so each row is summarized once), called by the worker every
-- TOKENMETER_REPORT_SUMMARY_INTERVAL_S. A report reads the summaries plus the ledger rows of batches
-- still queued, the queue checked in each section's own statement (one snapshot): exact whether the
-- summaries are behind or not (sinks/summaries.py). Rows from before this migration are summarized by
-- it (batch_id NULL).

ALTER TABLE tokenmeter.ledger ADD COLUMN batch_id bigint;
-- A default, not a value on the ADD: an existing row keeps NULL and no partition is rewritten.
ALTER TABLE tokenmeter.ledger ALTER COLUMN batch_id SET DEFAULT pg_current_xact_id()::text::bigint;
-- Batch ids grow with time, and rows are appended in that order: a BRIN index finds a batch's rows by
-- reading a handful of block ranges, and costs next to nothing to maintain.
CREATE INDEX ledger_batch ON tokenmeter.ledger USING brin (batch_id) WITH (autosummarize = on);

CREATE TABLE tokenmeter.report_queue (
    batch_id bigint NOT NULL,
    month    date NOT NULL,  -- first day of the UTC month of the batch's rows
    PRIMARY KEY (batch_id, month)
);

CREATE TABLE tokenmeter.report_conversations (
    tenant_id    text NOT NULL,
    month        date NOT NULL,
    conversation text NOT NULL,
    calls        bigint NOT NULL,
    cost         numeric(38, 12) NOT NULL,
    first_ts     timestamptz NOT NULL,
    last_ts      timestamptz NOT NULL,
    PRIMARY KEY (month, tenant_id, conversation)
);

CREATE TABLE tokenmeter.report_latency (
    tenant_id  text NOT NULL,
    month      date NOT NULL,
    provider   text NOT NULL,
    model      text NOT NULL,
    latency_ms bigint NOT NULL,
    calls      bigint NOT NULL,
    PRIMARY KEY (month, tenant_id, provider, model, latency_ms)
);

CREATE TABLE tokenmeter.report_price_context (
    tenant_id    text NOT NULL,
    month        date NOT NULL,
    service_tier text NOT NULL,
    processing   text NOT NULL,
    calls        bigint NOT NULL,
    cost         numeric(38, 12) NOT NULL,
    PRIMARY KEY (month, tenant_id, service_tier, processing)
);

CREATE TABLE tokenmeter.report_top_calls (
    tenant_id     text NOT NULL,
    month         date NOT NULL,
    event_id      text NOT NULL,
    ts            timestamptz NOT NULL,
    provider      text NOT NULL,
    model         text NOT NULL,
    feature       text,
    user_id       text,
    trace_id      text,
    input_tokens  bigint NOT NULL,
    output_tokens bigint NOT NULL,
    total_cost    numeric(38, 12),
    PRIMARY KEY (month, tenant_id, event_id)
);
CREATE INDEX report_top_calls_rank ON tokenmeter.report_top_calls (month, tenant_id, total_cost DESC, event_id);

CREATE FUNCTION tokenmeter.queue_for_reports() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO tokenmeter.report_queue (batch_id, month)
    SELECT DISTINCT batch_id, (date_trunc('month', ts, 'UTC') AT TIME ZONE 'UTC')::date
    FROM new_rows WHERE batch_id IS NOT NULL
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER ledger_queue_for_reports AFTER INSERT ON tokenmeter.ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tokenmeter.queue_for_reports();

-- Fold the rows of these batches in one UTC month (batches NULL: the rows from before this migration)
-- into the summaries. Keys are upserted in key order, so two workers summarizing at once cannot deadlock
-- on them. The top calls keep every call ranked within `kept` of its tenant and month (the report's order:
-- cost descending, then event id): a report asking for at most that many is exact, since a call in the
-- true top k is ranked within k in every subset of the calls.
CREATE FUNCTION tokenmeter.summarize_rows(first date, batches bigint[], kept integer) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    lo timestamptz := first::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (first + interval '1 month')::timestamp AT TIME ZONE 'UTC';
BEGIN
    CREATE TEMP TABLE IF NOT EXISTS summary_rows ON COMMIT DELETE ROWS AS
        SELECT tenant_id, ts, provider, model, feature, user_id, trace_id, session_id, event_id, input_tokens,
               output_tokens, latency_ms, total_cost, service_tier, processing
        FROM tokenmeter.ledger WITH NO DATA;
    TRUNCATE summary_rows;
    IF batches IS NULL THEN
        INSERT INTO summary_rows
            SELECT tenant_id, ts, provider, model, feature, user_id, trace_id, session_id, event_id, input_tokens,
                   output_tokens, latency_ms, total_cost, service_tier, processing
            FROM tokenmeter.ledger WHERE ts >= lo AND ts < hi AND batch_id IS NULL;
    ELSE
        INSERT INTO summary_rows
            SELECT tenant_id, ts, provider, model, feature, user_id, trace_id, session_id, event_id, input_tokens,
                   output_tokens, latency_ms, total_cost, service_tier, processing
            FROM tokenmeter.ledger WHERE ts >= lo AND ts < hi AND batch_id = ANY(batches);
    END IF;

    INSERT INTO tokenmeter.report_conversations AS c
    SELECT tenant_id, first, coalesce(session_id, trace_id), count(*), sum(total_cost), min(ts), max(ts)
    FROM summary_rows WHERE coalesce(session_id, trace_id) IS NOT NULL
    GROUP BY 1, 3 ORDER BY 1, 3
    ON CONFLICT (month, tenant_id, conversation) DO UPDATE SET
        calls = c.calls + excluded.calls, cost = c.cost + excluded.cost,
        first_ts = least(c.first_ts, excluded.first_ts), last_ts = greatest(c.last_ts, excluded.last_ts);

    INSERT INTO tokenmeter.report_latency AS l
    SELECT tenant_id, first, provider, model, latency_ms, count(*)
    FROM summary_rows WHERE latency_ms IS NOT NULL
    GROUP BY 1, 3, 4, 5 ORDER BY 1, 3, 4, 5
    ON CONFLICT (month, tenant_id, provider, model, latency_ms) DO UPDATE SET calls = l.calls + excluded.calls;

    INSERT INTO tokenmeter.report_price_context AS p
    SELECT tenant_id, first, coalesce(service_tier, ''), coalesce(processing, ''), count(*), sum(total_cost)
    FROM summary_rows GROUP BY 1, 3, 4 ORDER BY 1, 3, 4
    ON CONFLICT (month, tenant_id, service_tier, processing) DO UPDATE SET
        calls = p.calls + excluded.calls, cost = p.cost + excluded.cost;

    INSERT INTO tokenmeter.report_top_calls
    SELECT tenant_id, first, event_id, ts, provider, model, feature, user_id, trace_id, input_tokens, output_tokens,
           total_cost
    FROM (SELECT *, row_number() OVER (PARTITION BY tenant_id ORDER BY total_cost DESC, event_id) AS rank
          FROM summary_rows) AS ranked
    WHERE rank <= kept ORDER BY tenant_id, event_id
    ON CONFLICT DO NOTHING;
    DELETE FROM tokenmeter.report_top_calls AS t
    USING (SELECT tenant_id, event_id,
                  row_number() OVER (PARTITION BY tenant_id ORDER BY total_cost DESC, event_id) AS rank
           FROM tokenmeter.report_top_calls
           WHERE month = first AND tenant_id IN (SELECT tenant_id FROM summary_rows)) AS ranked
    WHERE t.month = first AND t.tenant_id = ranked.tenant_id AND t.event_id = ranked.event_id AND ranked.rank > kept;
END $$;

-- Summarize the queued batches among `wanted` of one month that no other session is summarizing, and
-- dequeue them, in the caller's transaction; returns how many it took.
CREATE FUNCTION tokenmeter.summarize_queued(first date, wanted bigint[], kept integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    taken bigint[];
BEGIN
    SELECT array_agg(batch_id) INTO taken FROM (
        SELECT batch_id FROM tokenmeter.report_queue WHERE month = first AND batch_id = ANY(wanted)
        ORDER BY batch_id FOR UPDATE SKIP LOCKED) AS q;
    IF taken IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM tokenmeter.summarize_rows(first, taken, kept);
    DELETE FROM tokenmeter.report_queue WHERE month = first AND batch_id = ANY(taken);
    RETURN cardinality(taken);
END $$;

-- The rows already in the ledger.
SELECT tokenmeter.summarize_rows(m.first, NULL, 100)
FROM (SELECT DISTINCT (date_trunc('month', ts, 'UTC') AT TIME ZONE 'UTC')::date AS first
      FROM tokenmeter.ledger WHERE batch_id IS NULL) AS m;
