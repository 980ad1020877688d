-- Finalized invoices are frozen: the usage each one billed (its own month, and late usage of earlier
-- finalized months as adjustment lines) and the rate card it was billed under. Usage that reaches a
-- finalized month later is that month's rollups minus everything already billed for it, and goes
-- on the next open invoice as an adjustment (DESIGN.md §4.3).
CREATE TABLE tokenmeter.invoices (
    tenant_id    text NOT NULL,
    period       text NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    time_zone    text NOT NULL,
    rate_card    jsonb NOT NULL,
    total        numeric NOT NULL,
    finalized_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, period)
);
CREATE TABLE tokenmeter.invoice_usage (
    tenant_id          text NOT NULL,
    period             text NOT NULL,  -- the invoice
    usage_period       text NOT NULL,  -- the month the usage happened in (= period, or earlier: an adjustment)
    provider_model     text NOT NULL,
    calls              bigint NOT NULL,
    unpriced_calls     bigint NOT NULL,
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cache_read_tokens  bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    input_cost         numeric(38, 12) NOT NULL,
    output_cost        numeric(38, 12) NOT NULL,
    cost               numeric(38, 12) NOT NULL,
    PRIMARY KEY (tenant_id, period, usage_period, provider_model),
    FOREIGN KEY (tenant_id, period) REFERENCES tokenmeter.invoices (tenant_id, period)
);
CREATE INDEX invoice_usage_billed ON tokenmeter.invoice_usage (tenant_id, usage_period);
