-- Every alert the worker fired (budget thresholds, anomalies), once per alert_id: replays after a
-- crash insert nothing. `tokenmeter alerts list` reads it.
CREATE TABLE tokenmeter.alerts (
    alert_id          text PRIMARY KEY,
    kind              text NOT NULL,
    tenant_id         text NOT NULL,
    scope             jsonb NOT NULL,
    period            text NOT NULL,
    threshold_percent integer,
    current           numeric(38, 12) NOT NULL,
    baseline          numeric(38, 12),
    "limit"           numeric(38, 12),
    message           text NOT NULL,
    details           jsonb NOT NULL,
    created_at        timestamptz NOT NULL,
    stored_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX alerts_tenant_created ON tokenmeter.alerts (tenant_id, created_at);
