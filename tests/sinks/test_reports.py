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
from sinks.reports import build_report, parse_period, report_rows, whatif
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
