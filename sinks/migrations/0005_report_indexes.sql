-- Reports across all tenants: the most expensive requests of a period, and conversations.
CREATE INDEX ledger_ts ON tokenmeter.ledger (ts);
CREATE INDEX ledger_tenant_session ON tokenmeter.ledger (tenant_id, session_id) WHERE session_id IS NOT NULL;
