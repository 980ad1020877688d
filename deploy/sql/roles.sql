-- Least-privilege Postgres roles for tokenmeter (issue #14 item 3).
--
--   role                  who connects as it                         may
--   tokenmeter_owner      `tokenmeter db migrate`, `ledger detach`   own the database, its schemas, tables and
--                                                                    functions: DDL; nothing else runs as it
--   tokenmeter_worker     `tokenmeter worker`                        append to the ledger (and ledger_ids),
--                                                                    advance rollups, store alerts and mark
--                                                                    them delivered, read tenants' time zones
--                                                                    and credit grants;
--                                                                    no UPDATE/DELETE of billed rows
--   tokenmeter_reporting  report, invoice (open), alerts list,       SELECT, and every transaction read-only
--                         whatif, tenant show, dashboard
--   tokenmeter_operator   tenant set, ratecard set,                  reporting, plus what those commands write
--                         invoice --finalize, credits grant|void,
--                         fx set, reconcile (its mismatch alerts)
--
-- Apply as a superuser (or the database owner with CREATEROLE), connected to the tokenmeter database:
--
--     psql "postgresql://postgres@db/tokenmeter" -v ON_ERROR_STOP=1 -f deploy/sql/roles.sql
--
-- 1. once before the first `tokenmeter db migrate`: it creates the roles, makes tokenmeter_owner the owner
--    of the database and of the schema, so the migrations run as tokenmeter_owner;
-- 2. again after every `tokenmeter db migrate`: table privileges are granted on the tables that exist then.
-- The file is idempotent and is the whole truth: per-table privileges of the worker and the operator are
-- revoked and granted again each run, and objects an earlier install created as another role (migrations
-- run as postgres) are handed to tokenmeter_owner. Passwords are not set here; set them out of band
-- (ALTER ROLE tokenmeter_worker PASSWORD '…', or your platform's IAM auth), and give each component its
-- own URL: postgresql://tokenmeter_worker:…@host/tokenmeter?sslmode=verify-full.
-- Plain SQL (no psql meta-commands): the test applies it with psycopg (tests/deploy/test_manifests.py).

DO $roles$
DECLARE
    name text;
BEGIN
    FOREACH name IN ARRAY ARRAY['tokenmeter_owner', 'tokenmeter_worker', 'tokenmeter_reporting', 'tokenmeter_operator']
    LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', name);
        END IF;
        EXECUTE format('ALTER ROLE %I NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS', name);
    END LOOP;
END
$roles$;

GRANT tokenmeter_reporting TO tokenmeter_operator;
-- Reports can never write, even by accident (role settings are not inherited by the operator).
ALTER ROLE tokenmeter_reporting SET default_transaction_read_only = on;

-- The database: owned by tokenmeter_owner (it creates schemas and, as database owner, schema_migrations in
-- public); only tokenmeter's roles connect; only the worker creates temporary tables (its COPY staging).
DO $database$
BEGIN
    EXECUTE format('ALTER DATABASE %I OWNER TO tokenmeter_owner', current_database());
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tokenmeter_worker, tokenmeter_reporting, tokenmeter_operator',
                   current_database());
    EXECUTE format('GRANT TEMPORARY ON DATABASE %I TO tokenmeter_worker', current_database());
END
$database$;

CREATE SCHEMA IF NOT EXISTS tokenmeter AUTHORIZATION tokenmeter_owner;
REVOKE ALL ON SCHEMA tokenmeter FROM PUBLIC;
GRANT USAGE ON SCHEMA tokenmeter TO tokenmeter_worker, tokenmeter_reporting, tokenmeter_operator;

-- Objects an earlier install created as another role become tokenmeter_owner's (a no-op on a fresh one).
DO $adopt$
DECLARE
    item record;
BEGIN
    FOR item IN
        SELECT n.nspname FROM pg_namespace AS n
        WHERE n.nspname IN ('tokenmeter', 'tokenmeter_archive') AND pg_get_userbyid(n.nspowner) <> 'tokenmeter_owner'
    LOOP
        EXECUTE format('ALTER SCHEMA %I OWNER TO tokenmeter_owner', item.nspname);
    END LOOP;
    FOR item IN
        SELECT n.nspname, c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p')
          AND (n.nspname IN ('tokenmeter', 'tokenmeter_archive')
               OR (n.nspname = 'public' AND c.relname = 'schema_migrations'))
          AND pg_get_userbyid(c.relowner) <> 'tokenmeter_owner'
    LOOP
        EXECUTE format('ALTER TABLE %I.%I OWNER TO tokenmeter_owner', item.nspname, item.relname);
    END LOOP;
    FOR item IN
        SELECT p.oid::regprocedure AS signature FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'tokenmeter' AND pg_get_userbyid(p.proowner) <> 'tokenmeter_owner'
    LOOP
        EXECUTE format('ALTER ROUTINE %s OWNER TO tokenmeter_owner', item.signature);
    END LOOP;
END
$adopt$;

-- Reporting reads every table of the schema, now and those later migrations (and ledger partitions) add.
GRANT SELECT ON ALL TABLES IN SCHEMA tokenmeter TO tokenmeter_reporting;
ALTER DEFAULT PRIVILEGES FOR ROLE tokenmeter_owner IN SCHEMA tokenmeter GRANT SELECT ON TABLES TO tokenmeter_reporting;
-- Functions keep PUBLIC's EXECUTE: only tokenmeter's roles may use the schema, and a function runs with
-- its caller's privileges, except the one SECURITY DEFINER function below, which only the worker may call.

-- Writes, per table and role: exactly what the code of each component executes (sinks/postgres.py,
-- sinks/alerts.py, sinks/webhooks.py for the worker; sinks/postgres.py set_time_zone, sinks/invoices.py
-- for the operator). Tables a migration has not created yet are skipped; run the file again after it.
--   ledger, ledger_ids  INSERT … ON CONFLICT DO NOTHING RETURNING (SELECT for RETURNING and the LIKE of
--                       the staging table); the ledger is append-only: nobody but the owner updates it
--   rollups             upserts (INSERT … ON CONFLICT DO UPDATE); the operator's time-zone change also
--                       deletes and rebuilds one tenant's rows
--   alerts              INSERT … ON CONFLICT DO NOTHING; webhook delivery: SELECT … FOR UPDATE SKIP LOCKED
--                       and UPDATE of the delivery columns
--   ledger (operator)   set_time_zone locks the ledger IN SHARE ROW EXCLUSIVE MODE, which needs MAINTAIN
--                       (Postgres 17+) and else UPDATE, the one write this file grants on the ledger below 17
DO $grants$
DECLARE
    lock_privilege text := CASE WHEN current_setting('server_version_num')::int >= 170000 THEN 'MAINTAIN' ELSE 'UPDATE' END;
    item record;
BEGIN
    REVOKE ALL ON ALL TABLES IN SCHEMA tokenmeter FROM tokenmeter_worker, tokenmeter_operator;
    FOR item IN
        SELECT * FROM (VALUES
            ('ledger',        'tokenmeter_worker',   'SELECT, INSERT'),
            ('ledger_ids',    'tokenmeter_worker',   'SELECT, INSERT'),
            ('rollups',       'tokenmeter_worker',   'SELECT, INSERT, UPDATE'),
            ('alerts',        'tokenmeter_worker',   'SELECT, INSERT, UPDATE'),
            ('tenants',       'tokenmeter_worker',   'SELECT'),
            ('credit_grants', 'tokenmeter_worker',   'SELECT'),  -- streams/credits.py follows the grants
            ('credit_voids',  'tokenmeter_worker',   'SELECT'),
            -- report summaries (migration 0016): the ledger's trigger queues each insert; the worker folds
            -- queued batches into the summaries (upserts, and trims the top calls) and dequeues them
            ('report_queue',         'tokenmeter_worker', 'SELECT, INSERT, UPDATE, DELETE'),
            ('report_conversations', 'tokenmeter_worker', 'SELECT, INSERT, UPDATE'),
            ('report_latency',       'tokenmeter_worker', 'SELECT, INSERT, UPDATE'),
            ('report_price_context', 'tokenmeter_worker', 'SELECT, INSERT, UPDATE'),
            ('report_top_calls',     'tokenmeter_worker', 'SELECT, INSERT, DELETE'),
            ('tag_scopes',    'tokenmeter_worker',   'SELECT, INSERT, UPDATE'),  -- tag rollups recorded complete (0017)
            ('tenants',       'tokenmeter_operator', 'INSERT, UPDATE'),
            ('rollups',       'tokenmeter_operator', 'INSERT, UPDATE, DELETE'),
            ('ledger',        'tokenmeter_operator', lock_privilege),
            ('rate_cards',    'tokenmeter_operator', 'INSERT, UPDATE'),
            ('fx_rates',      'tokenmeter_operator', 'INSERT'),  -- tokenmeter fx set (append-only)
            ('invoices',      'tokenmeter_operator', 'INSERT'),
            ('invoice_usage', 'tokenmeter_operator', 'INSERT'),
            ('alerts',        'tokenmeter_operator', 'INSERT'),  -- tokenmeter reconcile: reconcile.mismatch alerts
            ('credit_grants', 'tokenmeter_operator', 'INSERT'),  -- tokenmeter credits grant|void (append-only)
            ('credit_voids',  'tokenmeter_operator', 'INSERT'),
            ('invoice_credits', 'tokenmeter_operator', 'INSERT')  -- finalize freezes the credits applied
        ) AS grants (table_name, grantee, privileges)
    LOOP
        IF to_regclass(format('tokenmeter.%I', item.table_name)) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON tokenmeter.%I TO %I', item.privileges, item.table_name, item.grantee);
        END IF;
    END LOOP;
END
$grants$;

-- The ledger's month partitions are made by the worker's sink through tokenmeter.ensure_ledger_partition
-- (migration 0010). CREATE TABLE in the schema and ATTACH PARTITION need the owner, so the function runs
-- as its owner (SECURITY DEFINER, with a fixed search_path) and only the worker and the owner may call it:
-- the worker gets no DDL rights of its own.
DO $partitions$
DECLARE
    routine regprocedure := to_regprocedure('tokenmeter.ensure_ledger_partition(date)');
BEGIN
    IF routine IS NOT NULL THEN
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', routine);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', routine);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tokenmeter_worker', routine);
    END IF;
END
$partitions$;
