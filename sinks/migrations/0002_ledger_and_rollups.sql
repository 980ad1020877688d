-- The per-call ledger (one row per distinct event_id, forever: the de-duplication horizon of the
-- Postgres sink) and the rollups the reports and invoices read.
CREATE TABLE tokenmeter.ledger (
    event_id           text PRIMARY KEY,
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
);
CREATE INDEX ledger_tenant_ts ON tokenmeter.ledger (tenant_id, ts);
CREATE INDEX ledger_tenant_trace ON tokenmeter.ledger (tenant_id, trace_id) WHERE trace_id IS NOT NULL;

-- Aggregates per tenant, UTC window (hour, day, month) and dimension: 'tenant' (value ''), 'feature',
-- 'model' ('provider/model'), 'user', 'environment'. Only ever advanced by rows newly inserted into
-- the ledger in the same transaction, so replays change nothing.
CREATE TABLE tokenmeter.rollups (
    tenant_id          text NOT NULL,
    granularity        text NOT NULL CHECK (granularity IN ('hour', 'day', 'month')),
    window_start       timestamptz NOT NULL,
    dimension          text NOT NULL,
    dimension_value    text NOT NULL,
    calls              bigint NOT NULL,
    unpriced_calls     bigint NOT NULL,
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cache_read_tokens  bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    input_cost         numeric(38, 12) NOT NULL,
    output_cost        numeric(38, 12) NOT NULL,
    cost               numeric(38, 12) NOT NULL,
    PRIMARY KEY (tenant_id, granularity, window_start, dimension, dimension_value)
);
