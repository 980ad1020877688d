-- Baseline: the schema namespace of tokenmeter. Pipeline tables arrive in later migrations.
CREATE SCHEMA IF NOT EXISTS tokenmeter;
