"""Money for people: tables and the HTML report round amounts (``deploy.output.usd``) and say so; JSON and CSV
keep the ledger's exact amounts. CLI runs against the test stack with amounts of 10-12 decimals, and the HTML
bar labels measured in headless Chromium (none may run past its chart's right edge)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from confluent_kafka import Producer

from deploy.output import csv_safe, rounding_note, summing_column, usd, usd_in_text
from deploy.report_render import render_html
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.records import Alert
from schemas.redis_keys import budget_key, spend_key
from sinks import invoices
from sinks.alerts import store_alerts
from sinks.reports import build_report, parse_period, report_rows
from streams.budgets import Budget
from tests.sinks.test_reports import seed

EXACT = re.compile(r"\d\.\d{7,}")  # an amount at the ledger's precision


def test_totals_round_to_cents() -> None:
    assert usd("258.524070655") == "$258.52"
    assert usd(Decimal("1234567.895")) == "$1,234,567.90"  # halves round up
    assert usd("-0.2612345678") == "-$0.26"
    assert (usd(12), usd("0"), usd(Decimal("0E-12")), usd("0.005")) == ("$12.00", "$0.00", "$0.00", "$0.01")


def test_an_amount_under_a_cent_is_never_shown_as_zero() -> None:
    assert usd("0.0042123") == "$0.0042"  # 2 significant digits for a total
    assert usd("0.000000123456") == "$0.00000012"
    assert usd("-0.001") == "-$0.001"
    assert usd("0.0042123", "per_call") == "$0.004212"
    assert usd("0.000000000001", "per_call") == "$0.000000000001"  # the ledger's smallest step
    assert usd("1E-13") == "<$0.000000000001"


def test_per_call_amounts_keep_four_significant_digits() -> None:
    assert usd("0.008916142884", "per_call") == "$0.008916"
    assert usd("0.0089", "per_call") == "$0.0089"  # no trailing zeros that would claim precision
    assert usd("1.23456", "per_call") == "$1.235"
    assert usd("12.3456", "per_call") == "$12.35"
    assert usd("0.5", "per_call") == "$0.50"
    assert usd("0", "per_call") == "$0.00"


def test_text_that_is_not_an_amount_stays() -> None:
    assert usd("n/a") == "n/a" and usd("NaN") == "NaN"
    message = "acme has spent $30.5012345678 of its month budget of $30.24; average $0.00892, -$0.00123456789"
    assert usd_in_text(message) == "acme has spent $30.50 of its month budget of $30.24; average $0.00892, -$0.0012"
    assert rounding_note("json").endswith("--format json is exact")
    assert rounding_note("json", "csv").endswith("--format json and csv are exact")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that rich never wraps a cell
    done = subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def tenant(conn: psycopg.Connection, unique: str) -> str:
    """90 priced calls in June and July 2025 (amounts of 10-12 decimals), as in tests/sinks/test_reports.py."""
    name = f"money-{unique}"
    seed(conn, name)
    return name


def test_report_table_rounds_and_json_and_csv_are_exact(conn: psycopg.Connection, tenant: str) -> None:
    period = parse_period("2025-07")
    expected = json.loads(json.dumps(build_report(conn, tenant, period)))  # today/this week/month: 0 for 2025
    as_json = json.loads(cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "json").stdout)
    assert as_json == expected
    assert EXACT.fullmatch(as_json["totals"]["cost"]), as_json["totals"]  # the seed has the ledger's precision
    as_csv = cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "csv").stdout
    buffer = io.StringIO()
    csv.writer(buffer).writerows([csv_safe(value) for value in row] for row in report_rows(expected))
    assert as_csv.splitlines() == buffer.getvalue().splitlines()  # text mode reads the writer's \r\n as \n

    table = cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "table").stdout
    assert rounding_note("json", "csv") in table
    assert f"1. Total: {usd(expected['totals']['cost'])} over" in table
    assert not EXACT.search(table), EXACT.findall(table)
    for row in expected["by_model"]:
        line = next(line for line in table.splitlines() if row["name"] in line)
        assert usd(row["cost"]) in line and usd(row["avg_cost_per_call"], "per_call") in line, line
    assert usd(expected["avg_cost_per_call"]["overall"], "per_call") in table
    assert usd(expected["top_requests"][0]["cost"], "per_call") in table


def test_report_html_rounds_and_keeps_exact_amounts_in_tooltips(
    conn: psycopg.Connection, tenant: str, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "html", "--output", str(page))
    text = page.read_text()
    report = build_report(conn, tenant, parse_period("2025-07"))
    assert f"<div class='v'>{usd(report['totals']['cost'])}</div>" in text
    assert rounding_note("json", "csv") in text
    shown = re.sub(r"<title>.*?</title>", "", text)  # tooltips keep the exact amount on purpose
    assert not EXACT.search(shown), EXACT.findall(shown)
    assert f": ${report['by_model'][0]['cost']}</title>" in text


def test_invoice_table_rounds_and_json_and_csv_are_exact(conn: psycopg.Connection, tenant: str) -> None:
    bill = invoices.invoice(conn, tenant, "2025-07")
    assert EXACT.fullmatch(f"{bill.total:f}"), bill.total
    table = cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "table").stdout
    assert rounding_note("json", "csv") in table and not EXACT.search(table)
    shown = summing_column([line.amount for line in bill.lines], "USD")  # rows add up (test_invoice_display.py)
    for line, amount in zip(bill.lines, shown.lines, strict=True):
        assert amount in next(row for row in table.splitlines() if line.provider_model in row)
    assert usd(bill.total) == shown.total and shown.total in next(row for row in table.splitlines() if "TOTAL" in row)
    as_json = json.loads(cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "json").stdout)
    assert as_json == json.loads(json.dumps(bill.as_json()))
    *lines, total = csv.DictReader(
        io.StringIO(cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "csv").stdout)
    )
    assert [Decimal(line["amount"]) for line in lines] == [line.amount for line in bill.lines]
    assert total["amount"] == f"{bill.total:f}"


def test_budgets_alerts_quota_and_whatif_round_in_tables_only(
    conn: psycopg.Connection, tenant: str, settings: Settings
) -> None:
    budget = Budget(tenant, "tenant", "", "month", Decimal("30.2412345"), True)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    assert producer.flush(15) == 0
    listed = cli("budget", "list", "--tenant", tenant, "--format", "table").stdout
    assert "$30.24" in listed and "30.2412345" not in listed and rounding_note("json") in listed
    assert json.loads(cli("budget", "list", "--tenant", tenant, "--format", "json").stdout)[0]["limit"] == "30.2412345"

    message = f"{tenant} has spent $30.5012345678 of its month budget of $30.2412345 (100.9%)"
    store_alerts(
        conn,
        [
            Alert(**a)
            for a in [
                {
                    "alert_id": f"money-{tenant}",
                    "kind": "budget.blocked",
                    "tenant_id": tenant,
                    "scope": {"dimension": "tenant", "value": ""},
                    "period": "month:2025-07-01",
                    "threshold_percent": 100,
                    "current": Decimal("30.5012345678"),
                    "baseline": None,
                    "limit": budget.limit,
                    "message": message,
                    "details": {},
                    "created_at": datetime(2025, 7, 20, tzinfo=UTC),
                }
            ]
        ],
    )
    alerts = cli("alerts", "list", "--tenant", tenant, "--format", "table").stdout
    assert "has spent $30.50 of its month budget of $30.24 (100.9%)" in alerts and rounding_note("json") in alerts
    assert json.loads(cli("alerts", "list", "--tenant", tenant, "--format", "json").stdout)[0]["message"] == message

    # What the worker mirrors into Redis: the budget and the month's spend (with the period's end in ms).
    client = redis.Redis.from_url(settings.redis_url)
    end_ms = int((datetime.now(UTC) + timedelta(days=40)).timestamp() * 1000)
    client.set(budget_key(tenant, "tenant", ""), budget.to_json())
    client.set(spend_key(tenant, "tenant", "", "month"), f"30.5012345678 {end_ms}")
    quota = cli("quota", "check", "--tenant", tenant).stdout
    assert "is spent ($30.50)" in quota and "spent $30.50 of $30.24 (remaining -$0.26)" in quota, quota
    assert rounding_note("json") in quota
    decision = json.loads(cli("quota", "check", "--tenant", tenant, "--format", "json").stdout)
    assert (decision["spent"], decision["limit"], decision["remaining"]) == (
        "30.5012345678",
        "30.2412345",
        "-0.2600000678",
    )

    models = ("--from", "openai/gpt-4o", "--to", "openai/gpt-4o-mini")
    exact = json.loads(cli("whatif", "--tenant", tenant, "--period", "2025-07", *models, "--format", "json").stdout)
    assert EXACT.fullmatch(exact["actual_cost"]), exact
    shown = cli("whatif", "--tenant", tenant, "--period", "2025-07", *models).stdout
    assert f"cost {usd(exact['actual_cost'])};" in shown and f"would have cost {usd(exact['whatif_cost'])}" in shown
    assert not EXACT.search(shown)


def big_report() -> dict[str, Any]:
    """A report whose labels are as long as they get: millions of dollars, a 100 % share, long names."""
    rows = [
        {
            "name": f"{'very-long-model-name-' * 2}{i}",
            "cost": f"{1234567.891234567 / (i + 1):.9f}",
            "calls": 10_000_000,
            "share": "100.0" if i == 0 else "64.3",
            "avg_cost_per_call": "0.123456789012",
        }
        for i in range(8)
    ]
    days = [{"date": f"2025-07-{d:02d}", "cost": "1234567.891234567", "calls": 1} for d in range(14, 21)]
    totals = {
        "cost": "9876543.21",
        "calls": 80_000_000,
        "unpriced_calls": 0,
        "today": "1",
        "this_week": "1",
        "this_month": "1",
    }
    issue = [
        {
            "name": "openai/gpt-4o",
            "cost": "258.524070655",
            "calls": 29_000,
            "share": "64.3",  # issue 17
            "avg_cost_per_call": "0.008916142884",
        },
        {
            "name": "anthropic/claude-sonnet-4-5",
            "cost": "143.5",
            "calls": 9_000,
            "share": "35.7",
            "avg_cost_per_call": "0.015944444444",
        },
    ]
    return {
        "tenant_id": "acme",
        "period": {"label": "2025-07"},
        "totals": totals,
        "trend_7d": days,
        "by_model": issue,
        "by_provider": rows,
        "by_feature": rows,
        "by_environment": rows,
        "by_user": rows,
        "avg_cost_per_call": {"overall": "0.123456789012"},
        "top_requests": [],
        "top_conversations": [],
    }


# Measures every chart text in the browser's own layout and writes the ones that leave their chart.
MEASURE = """<script>
const outside = [];
for (const svg of document.querySelectorAll('svg')) {
  const width = svg.viewBox.baseVal.width;
  for (const text of svg.querySelectorAll('text')) {
    const box = text.getBBox();
    if (box.x < 0 || box.x + box.width > width) outside.push(`${text.textContent}: ${box.x}+${box.width} > ${width}`);
  }
}
const result = document.createElement('pre');
result.id = 'outside';
result.textContent = JSON.stringify(outside);
document.body.appendChild(result);
</script>"""


def test_no_chart_label_runs_past_its_chart_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: deploy/test installs it before running the tests"
    page = tmp_path / "report.html"
    page.write_text(render_html(big_report()).replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dumped = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--window-size=1280,2400",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    found = re.search(r"<pre id=\"outside\">(.*?)</pre>", dumped.stdout, re.S)
    assert found, dumped.stdout[-2000:]
    assert json.loads(found.group(1).replace("&gt;", ">").replace("&amp;", "&")) == []
    assert "$1,234,567.89 · 100.0%" in dumped.stdout and "$258.52 · 64.3%" in dumped.stdout
