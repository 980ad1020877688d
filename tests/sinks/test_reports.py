"""Reports from the real Postgres tables: every breakdown adds up to the total; JSON, CSV and HTML."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from deploy.report_render import render_html
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent
from sinks.postgres import write_batch
from sinks.reports import build_report, parse_period, report_rows, trace_report, whatif
from streams.pricing import PriceBook

NOW = datetime(2025, 7, 20, 15, tzinfo=UTC)


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def seed(conn: psycopg.Connection, tenant: str) -> list[PricedEvent]:
    book = PriceBook()
    models = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("google", "gemini-2.5-flash")]
    items = []
    for i in range(90):
        provider, model = models[i % 3]
        event = validate_event(
            {
                "event_id": f"{tenant}-{i}",
                "timestamp": NOW - timedelta(hours=5 * i),
                "tenant_id": tenant,
                "provider": provider,
                "model": model,
                "input_tokens": 2000 + 37 * i,
                "output_tokens": 100 + i,
                "feature": ["search", "chat"][i % 2],
                "user_id": f"u{i % 7}",
                "environment": "prod" if i % 4 else None,
                "session_id": f"s{i % 5}",
                "latency_ms": 300 + i,
            }
        )
        items.append(PricedEvent(event, book.price(event)))
    write_batch(conn, items)
    return items


def test_report_answers_the_four_questions_and_adds_up(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"rep-{unique}"
    items = seed(conn, tenant)
    period = parse_period("2025-07")
    report = build_report(conn, tenant, period, top=5, now=NOW)
    in_july = [i for i in items if i.event.timestamp.month == 7]
    total = sum((i.price.total_cost for i in in_july), Decimal(0))
    assert Decimal(report["totals"]["cost"]) == total and report["totals"]["calls"] == len(in_july)
    for key in ("by_provider", "by_model", "by_feature", "by_environment", "by_user"):
        assert sum(Decimal(r["cost"]) for r in report[key]) == total, key
        assert sum(r["calls"] for r in report[key]) == len(in_july), key
    assert {r["name"] for r in report["by_provider"]} == {"openai", "anthropic", "google"}
    assert {r["name"] for r in report["by_environment"]} == {"prod", "(none)"}
    assert [d["date"] for d in report["trend_7d"]][-1] == "2025-07-20" and len(report["trend_7d"]) == 7
    today = sum((i.price.total_cost for i in items if i.event.timestamp.date() == NOW.date()), Decimal(0))
    assert Decimal(report["totals"]["today"]) == today
    costs = [Decimal(r["cost"]) for r in report["top_requests"]]
    assert (
        len(costs) == 5
        and costs == sorted(costs, reverse=True)
        and costs[0] == max(i.price.total_cost for i in in_july)
    )
    assert report["top_conversations"][0]["conversation"].startswith("s")
    assert {r["model"] for r in report["latency_by_model"]} == {
        "openai/gpt-4o",
        "anthropic/claude-sonnet-4-5",
        "google/gemini-2.5-flash",
    }
    rows = report_rows(report)
    assert rows[0] == ["section", "name", "cost", "calls", "share_percent"]
    page = render_html(report)
    assert page.count("<svg") == 6 and "spend-over-time" in page and "model-mix" in page


def test_report_command_formats(
    stack: LocalStack, conn: psycopg.Connection, settings: Settings, unique: str, tmp_path: Path
) -> None:
    tenant = f"repcli-{unique}"
    seed(conn, tenant)
    base = [sys.executable, "-m", "deploy", "report", "--tenant", tenant, "--period", "2025-07-01..2025-07-31"]
    shown = subprocess.run([*base, "--format", "json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert {
        "totals",
        "trend_7d",
        "by_provider",
        "by_model",
        "by_feature",
        "by_environment",
        "by_user",
        "avg_cost_per_call",
        "top_requests",
    } <= set(report)
    assert all(isinstance(r["cost"], str) for r in report["by_model"])
    table = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "By model" in table.stdout and "openai/gpt-4o" in table.stdout
    as_csv = subprocess.run([*base, "--format", "csv"], capture_output=True, text=True, timeout=60)
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[1][0] == "totals" and Decimal(rows[1][2]) == Decimal(report["totals"]["cost"])
    page = tmp_path / "report.html"
    written = subprocess.run(
        [*base, "--format", "html", "--output", str(page)], capture_output=True, text=True, timeout=60
    )
    assert written.returncode == 0 and "<svg" in page.read_text()
    bad = subprocess.run([*base[:-2], "--period", "last-tuesday"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "YYYY-MM" in bad.stderr


def test_periods() -> None:
    now = datetime(2025, 7, 2, 9, tzinfo=UTC)
    assert parse_period("today", now).start == datetime(2025, 7, 2, tzinfo=UTC)
    assert parse_period("week", now).start == datetime(2025, 6, 30, tzinfo=UTC)
    assert parse_period("2025-12").end == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_period("2025-07-01..2025-07-01").end == datetime(2025, 7, 2, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_period("2025-07-09..2025-07-01")


def test_whatif_reprices_the_same_tokens_with_another_model(
    conn: psycopg.Connection, stack: LocalStack, unique: str
) -> None:
    tenant = f"whatif-{unique}"
    items = seed(conn, tenant)
    period = parse_period("2025-07")
    mine = [i for i in items if i.event.model == "gpt-4o" and i.event.timestamp.month == 7]
    book = PriceBook()
    result = whatif(conn, book, tenant, period, "openai/gpt-4o", "openai/gpt-4o-mini")
    expected = sum(
        (book.price(i.event.model_copy(update={"model": "gpt-4o-mini"})).total_cost for i in mine), Decimal(0)
    )
    assert result["calls"] == len(mine) and Decimal(result["whatif_cost"]) == expected
    assert Decimal(result["actual_cost"]) == sum((i.price.total_cost for i in mine), Decimal(0))
    assert Decimal(result["ratio"]) < Decimal("0.1")  # mini is ~16x cheaper
    with pytest.raises(ValueError, match="provider/model"):
        whatif(conn, book, tenant, period, "gpt-4o", "openai/gpt-4o-mini")


def test_a_trace_lists_its_calls_in_order_and_adds_up(conn: psycopg.Connection, unique: str) -> None:
    """An agent run: 4 calls of one trace (one of an unknown model) among other traffic; the same trace
    id in another tenant stays apart when the tenant is given."""
    book = PriceBook()
    tenant, other, trace = f"trace-{unique}", f"trace-other-{unique}", f"run-{unique}"
    calls = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4o"), ("acme", "homegrown-1")]
    items = []
    for i, (provider, model) in enumerate(calls):
        for owner in (tenant, other):
            event = validate_event(
                {
                    "event_id": f"{owner}-{i}",
                    "timestamp": NOW + timedelta(seconds=10 * (4 - i)),  # written out of order
                    "tenant_id": owner,
                    "provider": provider,
                    "model": model,
                    "input_tokens": 1000 + i,
                    "output_tokens": 50 + i,
                    "trace_id": trace,
                    "session_id": f"chat-{unique}",
                }
            )
            items.append(PricedEvent(event, book.price(event)))
    write_batch(conn, items)
    seed(conn, tenant)  # other calls of the tenant, not of the trace
    ours = [item for item in items if item.event.tenant_id == tenant]
    report = trace_report(conn, trace_id=trace, tenant_id=tenant)
    assert [c["event_id"] for c in report["calls"]] == [f"{tenant}-{i}" for i in (3, 2, 1, 0)]  # by time
    assert Decimal(report["totals"]["cost"]) == sum((item.price.total_cost for item in ours), Decimal(0))
    assert report["totals"]["calls"] == 4 and report["totals"]["unpriced_calls"] == 1
    assert {m["name"]: m["calls"] for m in report["by_model"]} == {
        "openai/gpt-4o": 2,
        "anthropic/claude-sonnet-4-5": 1,
        "acme/homegrown-1": 1,
    }
    assert sum(Decimal(m["cost"]) for m in report["by_model"]) == Decimal(report["totals"]["cost"])
    assert trace_report(conn, trace_id=trace)["tenants"] == sorted([tenant, other])
    assert trace_report(conn, session_id=f"chat-{unique}", tenant_id=tenant)["totals"] == report["totals"]
    with pytest.raises(ValueError, match="one of them"):
        trace_report(conn)


def test_report_trace_command(stack: LocalStack, conn: psycopg.Connection, unique: str) -> None:
    tenant = f"trcli-{unique}"
    event = validate_event(
        {
            "event_id": f"{tenant}-1",
            "timestamp": NOW,
            "tenant_id": tenant,
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 1234,
            "output_tokens": 56,
            "trace_id": f"tr-{unique}",
        }
    )
    priced = PricedEvent(event, PriceBook().price(event))
    write_batch(conn, [priced])
    base = [sys.executable, "-m", "deploy", "report", "--trace", f"tr-{unique}"]
    shown = subprocess.run([*base, "--format", "json"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert Decimal(json.loads(shown.stdout)["totals"]["cost"]) == priced.price.total_cost
    table = subprocess.run([*base, "--tenant", tenant], capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "openai/gpt-4o" in table.stdout and "Total" in table.stdout
    as_csv = subprocess.run([*base, "--format", "csv"], capture_output=True, text=True, timeout=60)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["event_id"] for r in rows] == [f"{tenant}-1"] and Decimal(rows[0]["cost"]) == priced.price.total_cost
    missing = subprocess.run(
        [sys.executable, "-m", "deploy", "report", "--trace", f"nothing-{unique}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "no calls" in missing.stdout
