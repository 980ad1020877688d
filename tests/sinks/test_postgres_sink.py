"""The Postgres sink against the real database: duplicates and replays never count twice."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import genai_prices
import psycopg
import psycopg.rows
import pytest
from rich.console import Console

from deploy.bench.workload import UNPRICED, Model, usage_events
from deploy.report_render import print_report, render_html
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import UsageEvent, validate_event
from schemas.records import PricedEvent, money
from sinks.invoices import invoice
from sinks.postgres import write_batch
from streams.pricing import PriceBook, usage_of


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def workload(tenant: str, count: int) -> list[PricedEvent]:
    """``count`` calls of one tenant seven minutes apart from 20:00 on June 30th (crossing the June/July
    month boundary), priced by the pipeline's ``PriceBook``; a quarter of them of a model without a price."""
    book = PriceBook()
    models = (Model("openai", "gpt-4o"), Model("anthropic", "claude-sonnet-4-5"), Model("openai", "o3"), UNPRICED)
    events = usage_events(
        count,
        seed=5,
        tenants=[tenant],
        users_per_tenant=5,
        features=("f0", "f1", "f2"),
        models=models,
        start=datetime(2025, 6, 30, 20, tzinfo=UTC),
        span=timedelta(minutes=7 * count),
        prefix=tenant,
    )
    items = []
    for data in events:
        event = validate_event(data)
        items.append(PricedEvent(event, book.price(event)))
    return items


def expected_total(items: list[PricedEvent], month: int) -> Decimal:
    total = Decimal(0)
    for item in {i.event.event_id: i for i in items}.values():
        e = item.event
        if e.timestamp.month != month or e.provider == "acme-ai":
            continue
        total += genai_prices.calc_price(
            usage_of(e), e.model, provider_id=e.provider, genai_request_timestamp=e.timestamp
        ).total_price
    return total


def test_replayed_and_duplicate_batches_count_once(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"t-{unique}"
    items = workload(tenant, 120)
    assert write_batch(conn, items[:70]).inserted == 70
    # a replay of the first batch plus its continuation, with in-batch duplicates
    assert write_batch(conn, items[40:] + items[100:110]).inserted == 50
    assert write_batch(conn, items).inserted == 0
    for month, period in ((6, "2025-06"), (7, "2025-07")):
        bill = invoice(conn, tenant, period)
        assert bill.total == expected_total(items, month)
        assert bill.calls == sum(1 for i in items if i.event.timestamp.month == month)
        assert bill.unpriced_calls == sum(
            1 for i in items if i.event.timestamp.month == month and i.price.status == "unpriced"
        )
        assert bill.unpriced_calls > 0
    # every breakdown adds up to the same total
    for dimension in ("tenant", "feature", "model", "user", "environment"):
        (total,) = conn.execute(
            "SELECT sum(cost) FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = 'day' AND dimension = %s",
            (tenant, dimension),
        ).fetchone() or (None,)
        assert total == expected_total(items, 6) + expected_total(items, 7)


def test_batches_return_absolute_totals_of_every_window_they_touch(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"abs-{unique}"
    items = workload(tenant, 40)
    first = write_batch(conn, items[:30])
    replay = write_batch(conn, items[:30])  # nothing new, yet the same windows come back, unchanged
    assert replay.inserted == 0
    key = lambda r: (r.granularity, r.window_start, r.dimension, r.dimension_value)  # noqa: E731
    assert sorted(first.rollups, key=key) == sorted(replay.rollups, key=key)
    assert {r.granularity for r in first.rollups} == {"minute", "hour", "day", "week", "month"}
    months = {r.window_start: r for r in first.rollups if r.granularity == "month" and r.dimension == "tenant"}
    assert sum(r.calls for r in months.values()) == 30
    later = write_batch(conn, items[25:40])  # five repeats, ten new
    assert later.inserted == 10
    july = next(
        r for r in later.rollups if r.granularity == "month" and r.dimension == "tenant" and r.window_start.month == 7
    )
    assert july.calls == sum(1 for i in items if i.event.timestamp.month == 7)
    assert july.cost == expected_total(items, 7)


def test_invoice_command_json(conn: psycopg.Connection, settings: Settings, unique: str) -> None:
    import json
    import subprocess
    import sys

    tenant = f"cli-{unique}"
    items = workload(tenant, 16)
    write_batch(conn, items)
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "invoice", "--tenant", tenant, "--period", "2025-06", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    bill = json.loads(done.stdout)
    assert set(bill) >= {"tenant_id", "period", "currency", "lines", "total", "calls", "unpriced_calls"}
    assert Decimal(bill["total"]) == expected_total(items, 6)
    assert bill["calls"] == sum(1 for i in items if i.event.timestamp.month == 6)
    bad = subprocess.run(
        [sys.executable, "-m", "deploy", "invoice", "--tenant", tenant, "--period", "June"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0 and "YYYY-MM" in bad.stderr


def test_rate_cards_markup_and_custom_rates_exactly(conn: psycopg.Connection, unique: str) -> None:
    from sinks.invoices import RateCard, set_rate_card

    tenant = f"card-{unique}"
    write_batch(conn, workload(tenant, 40))
    at_cost = invoice(conn, tenant, "2025-06")
    assert at_cost.total == sum((line.cost for line in at_cost.lines), Decimal(0)) > 0
    set_rate_card(conn, RateCard(tenant, "cost_plus", Decimal("17.5")))
    marked = invoice(conn, tenant, "2025-06")
    assert marked.total == at_cost.total * Decimal("1.175")  # exactly, no rounding
    assert [line.amount for line in marked.lines] == [line.cost * Decimal("1.175") for line in at_cost.lines]
    assert all(sum(i.amount for i in line.items) == line.amount for line in marked.lines)
    rates = {
        "openai/gpt-4o": {"input_mtok": Decimal("3"), "output_mtok": Decimal("12"), "cache_read_mtok": Decimal("0.5")}
    }
    set_rate_card(conn, RateCard(tenant, "custom", rates=rates))
    custom = invoice(conn, tenant, "2025-06")
    line = next(line for line in custom.lines if line.provider_model == "openai/gpt-4o")
    uncached = line.input_tokens - line.cache_read_tokens - line.cache_write_tokens
    assert line.amount == (uncached * 3 + line.cache_read_tokens * Decimal("0.5") + line.output_tokens * 12) / 10**6
    assert {i.kind for i in line.items} >= {"input_uncached", "output"}
    others = [x for x in custom.lines if x.provider_model != "openai/gpt-4o"]
    assert all(x.amount == x.cost for x in others)  # models without a custom rate are billed at cost


def test_ledger_keeps_tier_batch_1h_writes_and_usage_details_for_reports(conn: psycopg.Connection, unique: str) -> None:
    """Contract v3 fields reach the ledger, and the report breaks spend down by tier and by batch."""
    from sinks.reports import build_report, parse_period

    tenant = f"tiers-{unique}"
    book = PriceBook()
    moment = datetime(2026, 11, 2, 12, tzinfo=UTC)
    contexts = [
        {"service_tier": "priority"},
        {"service_tier": "flex"},
        {"processing": "batch"},
        {"service_tier": "default", "usage_details": {"web_searches": 2}},
        {
            "provider": "anthropic",
            "model": "claude-sonnet-4-5",
            "cache_write_tokens": 900,
            "cache_write_1h_tokens": 600,
        },
        {},
    ]
    items = []
    for i, context in enumerate(contexts):
        data = {
            "event_id": f"{tenant}-{i}",
            "timestamp": moment + timedelta(minutes=i),
            "tenant_id": tenant,
            "provider": "openai",
            "model": "gpt-5",
            "input_tokens": 10_000,
            "output_tokens": 2_000,
            **context,
        }
        event = validate_event(data)
        items.append(PricedEvent(event, book.price(event)))
    write_batch(conn, items)
    rows = conn.execute(
        "SELECT event_id, service_tier, processing, cache_write_1h_tokens, usage_details, total_cost"
        " FROM tokenmeter.ledger WHERE tenant_id = %s ORDER BY event_id",
        (tenant,),
    ).fetchall()
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        ("priority", None, None, None),
        ("flex", None, None, None),
        (None, "batch", None, None),
        ("default", None, None, {"web_searches": 2}),
        (None, None, 600, None),
        (None, None, None, None),
    ]
    assert [r[5] for r in rows] == [i.price.total_cost.quantize(Decimal("1e-12")) for i in items]
    report = build_report(conn, tenant, parse_period("2026-11"), now=moment)
    total = sum((i.price.total_cost for i in items), Decimal(0))
    for key in ("by_service_tier", "by_processing"):
        assert sum(Decimal(r["cost"]) for r in report[key]) == total, key
        assert sum(r["calls"] for r in report[key]) == len(items), key
    tiers = {r["name"]: r["calls"] for r in report["by_service_tier"]}
    assert tiers == {"priority": 1, "flex": 1, "default": 1, "(none)": 3}
    batch = {r["name"]: Decimal(r["cost"]) for r in report["by_processing"]}
    assert set(batch) == {"batch", "(none)"} and batch["batch"] == items[2].price.total_cost
    # Both views show the price contexts when some calls had one.
    buffer = io.StringIO()
    print_report(report, Console(file=buffer, width=160))
    assert "By service tier" in buffer.getvalue() and "priority" in buffer.getvalue()
    assert "Batch or not" in buffer.getvalue()
    page = render_html(report)
    assert 'id="by_service_tier"' in page and 'id="by_processing"' in page


def test_every_event_field_lands_in_its_own_ledger_column(conn: psycopg.Connection, unique: str) -> None:
    """The ledger row holds each field of the event in the column of that name (``_row`` takes them from the
    event's storage by position: a column list out of step would shift values silently)."""
    tenant = f"columns-{unique}"
    full = validate_event(
        {
            "event_id": f"{tenant}-full",
            "timestamp": datetime(2026, 11, 3, 9, 30, 15, 123456, tzinfo=UTC),
            "tenant_id": tenant,
            "provider": "openai",
            "model": "gpt-5",
            "user_id": "u-1",
            "feature": "search",
            "environment": "staging",
            "trace_id": "trace-1",
            "session_id": "session-1",
            "team_id": "team-1",
            "request_id": "request-1",
            "api_key_id": "key-1",
            "input_tokens": 9_000,
            "output_tokens": 800,
            "cache_read_tokens": 1_000,
            "cache_write_tokens": 700,
            "cache_write_1h_tokens": 300,
            "reasoning_tokens": 200,
            "latency_ms": 1234,
            "status": "error",
            "estimated": True,
            "service_tier": "priority",
            "tags": {"team": "search", "tier": "gold"},
            "usage_details": {"web_searches": 3},
        }
    )
    bare = validate_event(
        {
            "event_id": f"{tenant}-bare",
            "timestamp": datetime(2026, 11, 3, 9, 31, tzinfo=UTC),
            "tenant_id": tenant,
            "provider": "acme-ai",
            "model": "mystery-1",
            "input_tokens": 5,
            "output_tokens": 1,
            "processing": "batch",
        }
    )
    book = PriceBook()
    items = [PricedEvent(e, book.price(e)) for e in (full, bare)]
    write_batch(conn, items)
    conn.commit()
    for item in items:
        e, p = item.event, item.price
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            row = cur.execute("SELECT * FROM tokenmeter.ledger WHERE event_id = %s", (e.event_id,)).fetchone()
        assert row is not None
        expected = {
            **{name: getattr(e, name) for name in UsageEvent.model_fields if name not in ("timestamp", "tags")},
            "ts": e.timestamp,
            "tags": e.tags,
            "usage_details": e.usage_details or None,
            "price_status": p.status,
            "input_cost": money(p.input_cost),
            "output_cost": money(p.output_cost),
            "total_cost": money(p.total_cost),
            "price_source": p.source,
        }
        ledger_columns = {name: value for name, value in row.items() if name in expected}
        skipped = set(expected) - set(ledger_columns)  # fields the ledger does not keep (audio, image tokens)
        assert skipped <= {"input_audio_tokens", "output_audio_tokens", "input_image_tokens"}, skipped
        assert ledger_columns == {name: expected[name] for name in ledger_columns}
