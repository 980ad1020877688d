-- Minute windows (anomaly rules, live dashboards) and ISO weeks (weekly budgets) join hour/day/month.
ALTER TABLE tokenmeter.rollups DROP CONSTRAINT rollups_granularity_check;
ALTER TABLE tokenmeter.rollups ADD CONSTRAINT rollups_granularity_check
    CHECK (granularity IN ('minute', 'hour', 'day', 'week', 'month'));
-- Reports read one granularity and dimension over a time range, across tenants too.
CREATE INDEX rollups_report ON tokenmeter.rollups (granularity, dimension, window_start);
