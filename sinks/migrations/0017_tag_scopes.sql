-- Issue #16 follow-up: which (tenant, tag name) pairs have complete tag rollups, so that a worker start does
-- not rebuild them again (a rebuild scans the tenant's whole ledger).
--
-- A tag has rollups only while a budget or rate limit names it (sinks.postgres.write_batch), so they are
-- complete only from a rebuild on (sinks.postgres.ensure_tag_rollups) for as long as every batch of the
-- tenant keeps naming the tag. When the last budget naming it goes, stage 1 marks the pair stale *before*
-- its batches stop counting the tag (streams.live.NamedScopes.unnamed_tags): named again later, the pair
-- is rebuilt once more, its rollups having missed the calls in between.
--
-- state        'complete': rebuilt and advanced by every batch since; 'stale': must be rebuilt before a
--              budget reads it. A pair without a row was never rebuilt (stale too).
-- rebuilt_at   when the last rebuild committed.
-- stale_since  when the pair stopped being named (NULL while complete).
CREATE TABLE tokenmeter.tag_scopes (
    tenant_id text NOT NULL,
    tag_name text NOT NULL,
    state text NOT NULL CHECK (state IN ('complete', 'stale')),
    rebuilt_at timestamptz NOT NULL,
    stale_since timestamptz,
    PRIMARY KEY (tenant_id, tag_name)
);
