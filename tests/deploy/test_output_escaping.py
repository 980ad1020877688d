"""Names from usage data print as written: the real CLI against the real stack, with tenant, feature,
user, model and provider names that are rich markup, spreadsheet formulas, control characters and HTML."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Producer
from rich.console import Console
from rich.table import Table

from deploy.output import cell, csv_safe
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import UsageEvent
from schemas.records import Alert, PricedEvent
from sinks.alerts import store_alerts
from sinks.postgres import write_batch
from streams.budgets import Budget
from streams.pricing import PriceBook

HOSTILE = [
    "[/bold]",
    "[red]x[/red]",
    '=HYPERLINK("http://evil")',
    "+1",
    "-2+3",
    "@SUM(A1)",
    "\tfoo",
    "<script>alert(1)</script>",
    ":warning:",
]
JULY = datetime(2025, 7, 3, 12, tzinfo=UTC)


def shown(name: str) -> str:
    """How a table shows a name: as written, control characters as escapes."""
    return name.replace("\t", "\\t")


def in_csv(name: str) -> str:
    """How CSV holds a name: with a leading ' when a spreadsheet would read it as a formula."""
    return "'" + name if name[0] in "=+-@\t\r" else name


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that rich never wraps or cuts a name
    return subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


@pytest.fixture
def tenant(conn: psycopg.Connection, unique: str) -> str:
    """A tenant whose every name is hostile: per name, one priced gpt-4o call with that feature, user,
    environment and session, and one unpriced call of that provider and model. Built without validation,
    like rows written before names had to be printable (a tab), since the ledger can hold them."""
    tenant_id = f"[/bold]<script>alert(1)</script>{unique}"
    book, items = PriceBook(), []
    for i, name in enumerate(HOSTILE):
        for j, (provider, model) in enumerate([("openai", "gpt-4o"), (name, name)]):
            event = UsageEvent.model_construct(
                event_id=f"{name}{unique}-{i}-{j}",
                timestamp=JULY + timedelta(hours=i),
                tenant_id=tenant_id,
                provider=provider,
                model=model,
                input_tokens=1000 * (i + 1),
                output_tokens=100,
                feature=name,
                user_id=name,
                environment=name,
                session_id=name,
                latency_ms=200,
            )
            items.append(PricedEvent(event, book.price(event)))
    write_batch(conn, items)
    store_alerts(
        conn,
        [
            Alert(**a)
            for a in [
                {
                    "alert_id": f"esc-{unique}-{i}",
                    "kind": "budget.threshold",
                    "tenant_id": tenant_id,
                    "scope": {"dimension": "feature", "value": name},
                    "period": "month:2025-07-01",
                    "threshold_percent": 50,
                    "current": Decimal("1.5"),
                    "baseline": None,
                    "limit": Decimal(3),
                    "message": f"{name} has spent $1.5",
                    "details": {},
                    "created_at": JULY + timedelta(minutes=i),
                }
                for i, name in enumerate(HOSTILE)
            ]
        ],
    )
    return tenant_id


def test_report_table_prints_names_literally(tenant: str) -> None:
    done = cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "table")
    assert done.returncode == 0, done.stderr
    assert tenant in done.stdout  # in the title rule
    for name in HOSTILE:
        assert shown(name) in done.stdout, name
    assert "\t" not in done.stdout


def test_report_csv_neutralises_formulas_and_keeps_numbers(tenant: str) -> None:
    done = cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    report = json.loads(cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "json").stdout)
    for section in ("by_feature", "by_user", "by_environment"):
        found = {row[1]: row for row in rows if row[0] == section}
        assert set(found) == {in_csv(name) for name in HOSTILE}, section
        for entry in report[section]:  # numbers as the JSON report has them, never prefixed
            _, _, cost, calls, share = found[in_csv(entry["name"])]
            assert (Decimal(cost), int(calls), Decimal(share)) == (
                Decimal(entry["cost"]),
                entry["calls"],
                Decimal(entry["share"]),
            )
    assert {in_csv(f"{n}/{n}") for n in HOSTILE} <= {row[1] for row in rows if row[0] == "by_model"}
    assert all(row[1].startswith("'") for row in rows if row[0] == "top_requests" and row[1][0] in "'=+-@")
    for row in rows[1:]:
        Decimal(row[2])  # every cost parses as a number
        assert row[3].isdigit()


def test_report_html_escapes_names(tenant: str, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    done = cli("report", "--tenant", tenant, "--period", "2025-07", "--format", "html", "--output", str(page))
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<title>tokenmeter report — [/bold]&lt;script&gt;" in text


def test_invoice_table_and_csv(tenant: str) -> None:
    table = cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "table")
    assert table.returncode == 0, table.stderr
    assert tenant in table.stdout
    for name in HOSTILE:
        assert shown(f"{name}/{name}") in table.stdout, name
    as_csv = cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "csv")
    assert as_csv.returncode == 0, as_csv.stderr
    *lines, total = csv.DictReader(io.StringIO(as_csv.stdout))
    document = json.loads(cli("invoice", "--tenant", tenant, "--period", "2025-07", "--format", "json").stdout)
    by_model = {line["provider_model"]: line for line in document["lines"]}
    assert {line["provider_model"] for line in lines} == {in_csv(m) for m in by_model}
    for line in lines:
        expected = next(v for k, v in by_model.items() if in_csv(k) == line["provider_model"])
        assert Decimal(line["amount"]) == Decimal(expected["amount"]) and int(line["calls"]) == expected["calls"]
        assert int(line["unpriced_calls"]) == expected["unpriced_calls"]
    assert total["provider_model"] == "TOTAL" and Decimal(total["amount"]) == Decimal(document["total"])


def test_alerts_and_budgets_list_tables(tenant: str, settings: Settings) -> None:
    done = cli("alerts", "list", "--tenant", tenant, "--format", "table")
    assert done.returncode == 0, done.stderr
    for name in HOSTILE:
        assert f"{shown(name)} has spent $1.5" in done.stdout, name
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    budgets = [Budget(tenant, "feature", name, "month", Decimal(5)) for name in HOSTILE if "\t" not in name]
    for budget in budgets:
        producer.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    assert producer.flush(15) == 0
    listed = cli("budget", "list", "--tenant", tenant, "--format", "table")
    assert listed.returncode == 0, listed.stderr
    for budget in budgets:
        assert budget.scope_label in listed.stdout


def test_cell_is_never_markup_emoji_or_terminal_control() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system="standard", width=200)
    table = Table()
    table.add_column("name")
    for name in [*HOSTILE, "\x1b[31mred", "a\\"]:
        table.add_row(cell(name))
    console.print(table)
    text = out.getvalue()
    assert "[/bold]" in text and "[red]x[/red]" in text and ":warning:" in text and "a\\" in text
    assert "\\x1b[31mred" in text and "\x1b[31m" not in text  # the name's ESC is shown, not obeyed


def test_csv_safe_decides_by_type() -> None:
    assert [csv_safe(v) for v in ("=1+2", "+1", "-2+3", "@SUM(A1)", "\tfoo", "\rfoo", "acme", "")] == [
        "'=1+2",
        "'+1",
        "'-2+3",
        "'@SUM(A1)",
        "'\tfoo",
        "'\rfoo",
        "acme",
        "",
    ]
    assert csv_safe(Decimal("-0.5")) == "-0.5" and csv_safe(-3) == "-3" and csv_safe(None) == ""
    assert csv_safe(Decimal("1E-7")) == "0.0000001"  # plain notation, as the ledger holds it
    assert csv_safe("-0.5") == "'-0.5"  # a name that looks like a number is still a name
