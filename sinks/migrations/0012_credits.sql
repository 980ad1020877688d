-- Prepaid credits (issue #16): an append-only ledger of grants and voids. Nothing here is ever
-- updated or deleted: balances, draws and expired remainders are derived from these rows and the usage
-- ledger by one pure function (schemas/credits.py: allocate), so a replayed batch or a restarted worker
-- derives the same numbers again.
CREATE TABLE tokenmeter.credit_grants (
    grant_id   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text NOT NULL,
    amount     numeric(38, 12) NOT NULL CHECK (amount > 0),
    priority   integer NOT NULL CHECK (priority >= 0),  -- lower is drawn first
    starts_at  timestamptz NOT NULL,                   -- usage at or after this draws from the grant
    expires_at timestamptz CHECK (expires_at > starts_at),  -- usage from this instant on does not
    note       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_grants_tenant ON tokenmeter.credit_grants (tenant_id);

-- A void ends a grant early: usage from voided_at on no longer draws from it; its remainder then is
-- recorded as voided (derived), draws before it stand. One void per grant.
CREATE TABLE tokenmeter.credit_voids (
    grant_id   bigint PRIMARY KEY REFERENCES tokenmeter.credit_grants (grant_id),
    voided_at  timestamptz NOT NULL,
    note       text NOT NULL DEFAULT ''
);

-- What a finalized invoice applied from each grant, frozen with it (sinks/invoices.py: finalize).
CREATE TABLE tokenmeter.invoice_credits (
    tenant_id text NOT NULL,
    period    text NOT NULL,
    grant_id  bigint NOT NULL REFERENCES tokenmeter.credit_grants (grant_id),
    applied   numeric(38, 12) NOT NULL CHECK (applied >= 0),
    PRIMARY KEY (tenant_id, period, grant_id),
    FOREIGN KEY (tenant_id, period) REFERENCES tokenmeter.invoices (tenant_id, period)
);
