-- Issue #18 item 1: the ledger keeps each call's price context and the usage keys genai-prices priced
-- beyond the standard counts (usage event contract v3), so spend can be broken down by service tier and
-- batch processing, and a call's price re-derived from its row.
--
-- service_tier           the provider's tier as reported (default, flex, priority, fast, standard...), or NULL
-- processing             'batch' for Batch API calls, else NULL
-- cache_write_1h_tokens  part of cache_write_tokens written with a 1-hour TTL, or NULL
-- usage_details          the event's usage_details (genai-prices usage key -> count), NULL when it has none
--
-- Nullable and without defaults: adding them rewrites nothing (a catalog change only), and rows written
-- before stay as they were (NULL: no tier, not batch, no extra usage reported). On the partitioned ledger
-- (migration 0010) the columns reach every attached month partition, and ensure_ledger_partition creates
-- later months LIKE the ledger; months already detached for archive keep their old columns. The
-- pipeline validates the values before they get here (schemas/events.py), so no CHECK constraints: one
-- would scan every month partition to validate.
ALTER TABLE tokenmeter.ledger
    ADD COLUMN service_tier text,
    ADD COLUMN processing text,
    ADD COLUMN cache_write_1h_tokens bigint,
    ADD COLUMN usage_details jsonb;
