"""The ledger partitioned by UTC month, against the real Postgres: batches across month boundaries
(a year back, the future), an id counted once whatever month a repeat of it carries, partitions
created by concurrent writers, the migration of a populated unpartitioned ledger, and the archive of
an old month leaving every other month's reports as they were."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import genai_prices
import psycopg
import pytest
from psycopg import sql

from deploy.bench.workload import UNPRICED, Model, usage_events
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent, money
from sinks import postgres, summaries
from sinks.invoices import finalize, invoice
from sinks.migrate import available_migrations, migrate
from sinks.postgres import (
    PartitionError,
    _rollup_upsert,
    _row,
    detach_month,
    ledger_partitions,
    set_time_zone,
    write_batch,
)
from sinks.reports import build_report, parse_period
from streams.pricing import PriceBook, usage_of

BOOK = PriceBook()
MODELS = (Model("openai", "gpt-4o"), Model("anthropic", "claude-sonnet-4-5"), Model("openai", "o3"), UNPRICED)


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def calls(tenant: str, count: int, start: datetime, span: timedelta, name: str) -> list[PricedEvent]:
    """``count`` priced calls of ``tenant`` evenly over ``span`` from ``start`` (ids ``<tenant>-<name>-n``)."""
    events = usage_events(
        count,
        seed=name,
        tenants=[tenant],
        users_per_tenant=4,
        features=("f0", "f1"),
        models=MODELS,
        start=start,
        span=span,
        prefix=f"{tenant}-{name}",
    )
    return [priced(validate_event(data)) for data in events]


def priced(event: Any) -> PricedEvent:
    return PricedEvent(event, BOOK.price(event))


def restamped(item: PricedEvent, at: datetime) -> PricedEvent:
    """The same event id with another timestamp (and the price of that time), bypassing the 24 h
    future limit of validation: the sink must take any timestamp it is handed."""
    return priced(item.event.model_copy(update={"timestamp": at}))


def counted(items: Sequence[PricedEvent]) -> list[PricedEvent]:
    """What must be billed: the first event of each id, whatever later repeats of it carry."""
    first: dict[str, PricedEvent] = {}
    for item in items:
        first.setdefault(item.event.event_id, item)
    return list(first.values())


def month_of(item: PricedEvent) -> str:
    return item.event.timestamp.astimezone(UTC).strftime("%Y-%m")


def expected(items: Sequence[PricedEvent], month: str) -> tuple[Decimal, int]:
    """Total and calls of a UTC month, priced by genai-prices itself (not the pipeline's PriceBook)."""
    total, calls_in_month = Decimal(0), 0
    for item in counted(items):
        e = item.event
        if month_of(item) != month:
            continue
        calls_in_month += 1
        if e.provider != UNPRICED.provider:
            usage = usage_of(e)
            total += genai_prices.calc_price(
                usage, e.model, provider_id=e.provider, genai_request_timestamp=e.timestamp
            ).total_price
    return total, calls_in_month


def partition_of_each_row(conn: psycopg.Connection, tenant: str) -> dict[str, str]:
    rows = conn.execute(
        "SELECT event_id, tableoid::regclass::text, to_char(ts AT TIME ZONE 'UTC', 'YYYY_MM')"
        " FROM tokenmeter.ledger WHERE tenant_id = %s",
        (tenant,),
    ).fetchall()
    for event_id, table, month in rows:
        assert table == f"tokenmeter.ledger_{month}", (event_id, table, month)
    return {event_id: month for event_id, _, month in rows}


def test_batches_across_month_boundaries_count_each_id_once(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"part-{unique}"
    now = datetime.now(UTC)
    new_year = datetime(now.year - 1, 12, 31, 22, tzinfo=UTC)  # across last New Year, a year boundary too
    across = calls(tenant, 60, new_year, timedelta(hours=4), "ny")
    year_back = calls(tenant, 10, now - timedelta(days=365), timedelta(days=20), "yb")
    recent = calls(tenant, 10, now - timedelta(hours=2), timedelta(hours=1), "now")
    # Stamped in coming months (beyond the 24 h validation allows: a clock or a backfill gone wrong).
    future = [restamped(item, now + timedelta(days=35 + 31 * i)) for i, item in enumerate(recent[:3])]
    future = [priced(f.event.model_copy(update={"event_id": f"{f.event.event_id}-future"})) for f in future]
    everything = across + year_back + recent + future
    # Repeats of ids with another timestamp, across the boundary both ways and into other months: the
    # first one stays, wherever the repeat would have gone.
    moved = [
        restamped(across[0], new_year + timedelta(hours=3)),  # Dec 31 → Jan 1
        restamped(across[-1], new_year - timedelta(days=1)),  # Jan 1 → Dec 30
        restamped(year_back[0], now - timedelta(hours=1)),  # a year back → this month
    ]
    assert all(month_of(m) != month_of(o) for m, o in zip(moved, (across[0], across[-1], year_back[0]), strict=True))

    shuffled = everything + everything[5:25]  # in-batch duplicates
    random.Random(unique).shuffle(shuffled)
    assert write_batch(conn, shuffled[:70]).inserted == len(counted(shuffled[:70]))
    second = write_batch(conn, shuffled[40:] + moved)  # a replay of 30, the rest new, the moved ids repeats
    assert second.inserted == len(counted(everything)) - len(counted(shuffled[:70]))
    assert write_batch(conn, everything + moved).inserted == 0  # a whole replay
    assert write_batch(conn, moved[::-1]).inserted == 0

    months = {month_of(i) for i in everything}
    assert len(months) >= 5
    placed = partition_of_each_row(conn, tenant)  # each row in its own month's partition
    assert placed == {i.event.event_id: month_of(i).replace("-", "_") for i in everything}
    (ids,) = conn.execute(
        "SELECT count(*) FROM tokenmeter.ledger_ids WHERE event_id LIKE %s", (f"{tenant}-%",)
    ).fetchone() or (0,)
    assert ids == len(everything)
    attached = {p.month for p in ledger_partitions(conn) if p.state == "attached"}
    assert months <= attached
    # A partition the sink made (attached to the indexed ledger) has the ledger's five indexes (four B-trees
    # and the BRIN on batch_id of migration 0016).
    (indexes,) = conn.execute(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = 'tokenmeter' AND tablename = %s",
        (f"ledger_{month_of(future[-1]).replace('-', '_')}",),
    ).fetchone() or (0,)
    assert indexes == 5

    for month in sorted(months):
        total, month_calls = expected(everything, month)
        bill = invoice(conn, tenant, month)
        assert (bill.total, bill.calls) == (total, month_calls), month
        report = build_report(conn, tenant, parse_period(month), top=1000, now=now)
        assert Decimal(report["totals"]["cost"]) == total
        assert report["totals"]["calls"] == month_calls
        # top requests read the ledger: every call of the month once, most expensive first
        in_month = [i for i in everything if month_of(i) == month]
        top = report["top_requests"]
        assert sorted(r["event_id"] for r in top) == sorted(i.event.event_id for i in in_month)
        assert [Decimal(r["cost"]) for r in top] == sorted((money(i.price.total_cost) for i in in_month), reverse=True)
    for dimension in ("tenant", "feature", "model", "user", "environment"):
        (total,) = conn.execute(
            "SELECT sum(cost) FROM tokenmeter.rollups"
            " WHERE tenant_id = %s AND granularity = 'month' AND dimension = %s",
            (tenant, dimension),
        ).fetchone() or (None,)
        assert total == sum((expected(everything, m)[0] for m in months), Decimal(0))


def test_an_id_repeated_with_another_timestamp_in_one_batch_keeps_the_first(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"same-{unique}"
    june = calls(tenant, 2, datetime(2024, 6, 30, 23, 59, 59, tzinfo=UTC), timedelta(seconds=1), "edge")
    july = [restamped(item, datetime(2024, 7, 1, 0, 0, 1, tzinfo=UTC)) for item in june]
    assert write_batch(conn, [june[0], july[0], july[1], june[1]]).inserted == 2
    assert partition_of_each_row(conn, tenant) == {june[0].event.event_id: "2024_06", july[1].event.event_id: "2024_07"}
    assert invoice(conn, tenant, "2024-06").calls == 1
    assert invoice(conn, tenant, "2024-07").calls == 1
    assert invoice(conn, tenant, "2024-06").total == expected([june[0]], "2024-06")[0]
    assert invoice(conn, tenant, "2024-07").total == expected([july[1]], "2024-07")[0]


def test_concurrent_writers_create_a_new_month_once(conn: psycopg.Connection, settings: Settings) -> None:
    month = datetime(2015, 2, 1, tzinfo=UTC)  # no other test writes in 2015 or 2016
    table = f"tokenmeter.ledger_{month:%Y_%m}"
    # One session creates the partition and has not committed yet; another asks for it meanwhile:
    # the second waits for the first, then finds its partition instead of failing.
    with psycopg.connect(settings.database_url) as first, psycopg.connect(settings.database_url) as second:
        first.execute("SELECT tokenmeter.ensure_ledger_partition(%s)", (month.date(),))
        answer: list[object] = []

        def ask() -> None:
            try:
                answer.append(second.execute("SELECT tokenmeter.ensure_ledger_partition(%s)::text", (month.date(),)))
            except Exception as exc:  # reported below
                answer.append(exc)

        asker = threading.Thread(target=ask)
        asker.start()
        asker.join(1.0)
        assert asker.is_alive(), "the second session did not wait for the first"
        first.commit()
        asker.join(10.0)
        assert not isinstance(answer[0], Exception), answer[0]
        second.commit()
    assert [p.table for p in ledger_partitions(conn) if p.month == f"{month:%Y-%m}"] == [table]

    # Workers writing the first batches of a new month at once (each with its own connection).
    later = datetime(2016, 2, 10, tzinfo=UTC)
    tenants = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    batches = [calls(t, 30, later, timedelta(days=25), "race") for t in tenants]
    start = threading.Barrier(len(batches))
    results: list[object] = []

    def write(batch: list[PricedEvent]) -> None:
        with psycopg.connect(settings.database_url) as own:
            start.wait()
            try:
                results.append(write_batch(own, batch).inserted)
            except Exception as exc:  # reported below
                results.append(exc)

    writers = [threading.Thread(target=write, args=(b,)) for b in batches]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert results == [30] * len(batches)
    for tenant, batch in zip(tenants, batches, strict=True):
        assert invoice(conn, tenant, f"{later:%Y-%m}").total == expected(batch, f"{later:%Y-%m}")[0]


def _scratch_database(settings: Settings) -> tuple[str, str]:
    name = f"tokenmeter_scratch_{uuid.uuid4().hex[:8]}"
    server = settings.database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server, name


def test_migration_moves_a_populated_unpartitioned_ledger(
    stack: LocalStack, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, name = _scratch_database(settings)
    url = f"{server}/{name}"
    try:
        with psycopg.connect(url, autocommit=True) as db:
            # The schema as it was before 0010, recorded as the runner records it.
            db.execute(
                "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL,"
                " checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in available_migrations():
                if migration.version >= "0010":
                    continue
                db.execute(migration.sql.encode())
                db.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                    (migration.version, migration.name, migration.checksum),
                )
            # This version's reports also read the columns of 0011 (tier, batch) and its rollups the API key
            # of 0013: the old ledger gets them too.
            db.execute(
                "ALTER TABLE tokenmeter.ledger ADD COLUMN service_tier text, ADD COLUMN processing text,"
                " ADD COLUMN cache_write_1h_tokens bigint, ADD COLUMN usage_details jsonb, ADD COLUMN api_key_id text"
            )
            # A ledger written the old way: one row per id, rollups from those rows.
            tenant = "old-ledger"
            old = calls(tenant, 200, datetime(2025, 5, 20, tzinfo=UTC), timedelta(days=50), "old")
            old += calls(tenant, 6, datetime(2025, 6, 30, 23, tzinfo=UTC), timedelta(hours=2), "edge")
            old[-1] = priced(old[-1].event.model_copy(update={"trace_id": "trace-1"}))
            with db.cursor().copy(
                "COPY tokenmeter.ledger (event_id, ts, tenant_id, provider, model, user_id, feature, environment,"
                " trace_id, session_id, team_id, request_id, input_tokens, output_tokens, cache_read_tokens,"
                " cache_write_tokens, reasoning_tokens, latency_ms, status, estimated, tags, price_status, input_cost,"
                " output_cost, total_cost, price_source) FROM STDIN"
            ) as copy:
                for item in old:
                    copy.write_row(_row(item)[:26])  # the columns before 0011 (tier, batch, usage details)
            db.execute(_rollup_upsert("ledger", "tokenmeter.ledger AS ledger"))
            now = datetime(2025, 8, 15, tzinfo=UTC)
            # Read from the ledger (the report summaries of 0016 do not exist yet); after the migrations the
            # same month reports come from the summaries it made of these rows.
            with monkeypatch.context() as patch:
                patch.setattr(summaries, "whole_months", lambda start, end: None)
                before = {m: build_report(db, tenant, parse_period(m), top=50, now=now) for m in ("2025-06", "2025-07")}

        assert migrate(url) == [m.version for m in available_migrations() if m.version >= "0010"]
        assert migrate(url) == []  # applied once

        with psycopg.connect(url, autocommit=True) as db:
            (kind,) = db.execute(
                "SELECT relkind::text FROM pg_class WHERE oid = 'tokenmeter.ledger'::regclass"
            ).fetchone() or ("",)
            assert kind == "p"
            assert to_regclass(db, "tokenmeter.ledger_unpartitioned") is None
            months = {p.month: p for p in ledger_partitions(db)}
            assert {"2025-05", "2025-06", "2025-07"} <= set(months)
            placed = partition_of_each_row(db, tenant)
            assert len(placed) == len(old)
            (ids,) = db.execute("SELECT count(*) FROM tokenmeter.ledger_ids").fetchone() or (0,)
            assert ids == len(old)
            indexes: dict[str, str] = dict(
                db.execute(
                    "SELECT indexname, indexdef FROM pg_indexes"
                    " WHERE schemaname = 'tokenmeter' AND tablename = 'ledger'"
                ).fetchall()
            )
            assert set(indexes) == {
                "ledger_tenant_ts",
                "ledger_ts",
                "ledger_tenant_trace",
                "ledger_tenant_session",
                "ledger_batch",
            }
            assert "WHERE (trace_id IS NOT NULL)" in indexes["ledger_tenant_trace"]
            assert "WHERE (session_id IS NOT NULL)" in indexes["ledger_tenant_session"]
            (leaf_indexes,) = db.execute(
                "SELECT count(*) FROM pg_indexes WHERE schemaname = 'tokenmeter' AND tablename = 'ledger_2025_06'"
            ).fetchone() or (0,)
            assert leaf_indexes == 5
            assert summaries.whole_months(parse_period("2025-06").start, parse_period("2025-06").end)
            # Same reports and invoices from the moved rows.
            assert {m: build_report(db, tenant, parse_period(m), top=50, now=now) for m in before} == before
            # Invoices (this version's code needs the later migrations' columns, so none before): the
            # moved calls, priced by genai-prices itself.
            for month in ("2025-05", "2025-06", "2025-07"):
                billed = invoice(db, tenant, month)
                assert (billed.total, billed.calls) == expected(old, month)
            # The moved ids are still the horizon: a replay (also with another timestamp) counts nothing.
            moved = [restamped(old[3], datetime(2025, 7, 31, tzinfo=UTC))]
            assert write_batch(db, old + moved).inserted == 0
            fresh = calls(tenant, 20, datetime(2025, 7, 25, tzinfo=UTC), timedelta(days=10), "new")
            assert write_batch(db, fresh + old[:10]).inserted == 20
            for month in ("2025-05", "2025-06", "2025-07", "2025-08"):
                assert (invoice(db, tenant, month).total, invoice(db, tenant, month).calls) == expected(
                    old + fresh, month
                )
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def to_regclass(conn: psycopg.Connection, name: str) -> object:
    row = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
    return row[0] if row else None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=60)


def test_detaching_an_old_month_leaves_other_months_reports_intact(conn: psycopg.Connection, unique: str) -> None:
    tenant, other = f"arch-{unique}", f"arch2-{unique}"
    now = datetime.now(UTC)
    # 2017: no other test writes there, so the month's invoices are only these tenants'.
    march = calls(tenant, 30, datetime(2017, 3, 1, tzinfo=UTC), timedelta(days=31), "mar")
    rest = calls(tenant, 60, datetime(2017, 3, 31, 20, tzinfo=UTC), timedelta(days=60), "rest")
    march_other = calls(other, 5, datetime(2017, 3, 10, tzinfo=UTC), timedelta(days=5), "mar")
    write_batch(conn, march + rest + march_other)
    periods = ("2017-04", "2017-05")
    reports = {p: build_report(conn, tenant, parse_period(p), top=100, now=now) for p in periods}
    march_report = build_report(conn, tenant, parse_period("2017-03"), top=100, now=now)
    assert march_report["top_requests"]

    in_march = [i for i in march + rest + march_other if month_of(i) == "2017-03"]
    with pytest.raises(PartitionError, match=r"unfinalized invoices .*2017-03"):
        detach_month(conn, "2017-03", now)
    finalize(conn, tenant, "2017-03", now)
    with pytest.raises(PartitionError, match=f"{other} 2017-03"):
        detach_month(conn, "2017-03", now)
    finalize(conn, other, "2017-03", now)
    frozen = invoice(conn, tenant, "2017-03").as_json()
    # Detached by another process (the CLI): this one still believes the month's partition is there.
    done = cli("ledger", "detach", "--month", "2017-03")
    assert done.returncode == 0, done.stderr
    assert f"detached 2017-03: {len(in_march)} calls now in tokenmeter_archive.ledger_2017_03" in done.stdout

    assert {p.state for p in ledger_partitions(conn) if p.month == "2017-03"} == {"archived"}
    assert {p: build_report(conn, tenant, parse_period(p), top=100, now=now) for p in periods} == reports
    assert invoice(conn, tenant, "2017-03").as_json() == frozen
    after = build_report(conn, tenant, parse_period("2017-03"), top=100, now=now)
    assert after["totals"] == march_report["totals"] and after["by_model"] == march_report["by_model"]
    assert after["top_requests"] == []  # the month's calls are in the archive now
    (archived,) = conn.execute(
        "SELECT sum(total_cost) FROM tokenmeter_archive.ledger_2017_03 WHERE tenant_id = %s", (tenant,)
    ).fetchone() or (None,)
    assert archived == sum((money(i.price.total_cost) for i in in_march if i.event.tenant_id == tenant), Decimal(0))

    # Its ids stay: a replay counts nothing. A late call is billed once, on the next open invoice, through
    # a new partition (this process still thought 2017-03 was there: its insert failed and was retried).
    assert write_batch(conn, march).inserted == 0
    assert date(2017, 3, 1) in postgres._known_months[postgres._database(conn)]
    late = calls(tenant, 2, datetime(2017, 3, 15, tzinfo=UTC), timedelta(hours=1), "late")
    assert write_batch(conn, late).inserted == 2
    april = invoice(conn, tenant, "2017-04")
    assert {a.usage_period for a in april.adjustments} == {"2017-03"}
    assert sum(a.calls for a in april.adjustments) == 2
    assert sum((a.cost for a in april.adjustments), Decimal(0)) == expected(late, "2017-03")[0]
    assert [p.table for p in ledger_partitions(conn) if p.month == "2017-03" and p.state == "attached"] == [
        "tokenmeter.ledger_2017_03"
    ]
    # Archived again (its invoice is finalized): a second archive table.
    assert detach_month(conn, "2017-03", now).table == "tokenmeter_archive.ledger_2017_03_2"

    # Rebuilding the tenant's rollups in another zone would need the archived calls: refused.
    with pytest.raises(psycopg.Error, match="archived ledger months \\(2017-03\\)"):
        set_time_zone(conn, tenant, "Europe/Berlin")

    # Recent months are refused without --force; the CLI says so in one line.
    this_month = f"{now:%Y-%m}"
    with pytest.raises(PartitionError, match="current or previous month"):
        detach_month(conn, this_month, now)
    done = cli("ledger", "detach", "--month", this_month)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "--force" in done.stderr
    bad = cli("ledger", "detach", "--month", "March")
    assert bad.returncode == 1 and "YYYY-MM" in bad.stderr
    listed = cli("ledger", "partitions", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    rows = {(p["month"], p["table"]): p for p in json.loads(listed.stdout)}
    assert rows[("2017-03", "tokenmeter_archive.ledger_2017_03")]["rows"] == len(in_march)
    assert rows[("2017-04", "tokenmeter.ledger_2017_04")]["state"] == "attached"
    table = cli("ledger", "partitions")
    assert table.returncode == 0 and "ledger_2017_04" in table.stdout
