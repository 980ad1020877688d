-- Each tenant's time zone: its calendar days, weeks and months (rollups, budgets, invoices, reports)
-- begin at its own midnight. Tenants without a row use UTC. The CHECK makes Postgres reject a zone
-- name it could not truncate with, so a bad name never reaches the sink's batch query.
CREATE TABLE tokenmeter.tenants (
    tenant_id  text PRIMARY KEY,
    time_zone  text NOT NULL DEFAULT 'UTC' CHECK (now() AT TIME ZONE time_zone IS NOT NULL),
    updated_at timestamptz NOT NULL DEFAULT now()
);
