"""`tokenmeter dashboard` against the test stack: its JSON adds up to the ledger, and Debian's headless
Chromium, running the page's script, shows the live names and amounts (names escaped, money in cents
with the exact value in the cell's title)."""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import psycopg
import pytest
import redis

from deploy.dashboard import money
from deploy.isolation import free_port
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import Alert, PricedEvent
from schemas.redis_keys import budget_key, escape_part, unescape_part
from sinks.alerts import store_alerts
from sinks.postgres import write_batch
from sinks.redis import write_spend
from streams.budgets import Budget
from streams.pricing import PriceBook


def test_money_is_exact_for_machines_and_rounded_for_people() -> None:
    assert money(Decimal("1234.565")) == {"exact": "1234.565", "shown": "$1,234.57"}
    assert money(Decimal("0.004999999999"))["shown"] != "$0.00"  # a nonzero amount never reads as nothing
    assert money(Decimal("0.005")) == {"exact": "0.005", "shown": "$0.01"}  # half up, as people round
    assert money(Decimal("12.300000000000")) == {"exact": "12.3", "shown": "$12.30"}
    assert money(Decimal(0)) == {"exact": "0", "shown": "$0.00"}
    for name in ("a:b", "100%", "%3A", "x%25:y%3A", "", "{a}", "%7B}", "}{"):
        assert unescape_part(escape_part(name)) == name


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def seed_today_and_month(conn: psycopg.Connection, client: redis.Redis, tenant: str, now: datetime) -> None:
    """Calls today and earlier this month, written as stage 1 writes them: the Postgres batch, then the
    absolute totals it read back mirrored into Redis."""
    book = PriceBook()
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    items = []
    for i in range(24):
        when = max(today, now - timedelta(minutes=i)) if i % 3 else month + timedelta(hours=i)
        event = validate_event(
            {
                "event_id": f"{tenant}-{i}",
                "timestamp": min(when, now),
                "tenant_id": tenant,
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens": 400_000 + 7_919 * i,
                "output_tokens": 20_000 + 13 * i,
                "feature": "search",
                "user_id": f"u{i % 3}",
            }
        )
        items.append(PricedEvent(event, book.price(event)))
    result = write_batch(conn, items)
    write_spend(client, result.rollups, now)


def ledger_sum(conn: psycopg.Connection, tenant: str, since: datetime) -> Decimal:
    row = conn.execute(
        "SELECT coalesce(sum(total_cost), 0) FROM tokenmeter.ledger WHERE tenant_id = %s AND ts >= %s", (tenant, since)
    ).fetchone()
    assert row is not None
    return Decimal(row[0])


def cents(value: Decimal) -> str:
    return f"${value.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"


@pytest.fixture
def dashboard(stack: LocalStack, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy", "dashboard", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/", timeout=2).close()
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "dashboard.log").read_text()
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def get(url: str, host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_dashboard_serves_live_numbers_that_add_up_and_chromium_shows_them(
    conn: psycopg.Connection, settings: Settings, unique: str, dashboard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: deploy/test installs it before running the tests"
    now = datetime.now(UTC)
    client = redis.Redis.from_url(settings.redis_url)
    # ':' and braces are escaped in Redis keys (a brace would break the hash tag)
    plain, hostile = f"dash-{unique}", f"<img src=x onerror=alert(1)>:{{{unique}}}"
    for tenant in (plain, hostile):
        seed_today_and_month(conn, client, tenant, now)
    limit = Decimal("2500")
    client.set(budget_key(hostile, "tenant", ""), Budget(hostile, "tenant", "", "month", limit, hard=True).redis_json())
    message = f"{hostile}: spent $9.99 this hour, 5.00× the 7-day hourly average of $2.00"
    store_alerts(
        conn,
        [
            Alert(**a)
            for a in [
                {
                    "alert_id": f"anomaly.spend_spike:{unique}",
                    "kind": "anomaly.spend_spike",
                    "tenant_id": hostile,
                    "scope": {"dimension": "tenant", "value": ""},
                    "period": f"hour:{now.isoformat()}",
                    "threshold_percent": None,
                    "current": Decimal("9.99"),
                    "baseline": Decimal("2"),
                    "limit": None,
                    "message": message,
                    "details": {},
                    "created_at": now,
                }
            ]
        ],
    )
    conn.commit()

    status, headers, body = get(dashboard + "/api/summary")
    assert status == 200 and headers["Content-Type"] == "application/json"
    summary = json.loads(body)
    assert summary["errors"] == {}, summary["errors"]
    rows = {row["tenant_id"]: row for row in summary["tenants"]}
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    expected = {}
    for tenant in (plain, hostile):
        spent_today, spent_month = ledger_sum(conn, tenant, today), ledger_sum(conn, tenant, month)
        assert spent_today > 0 and (spent_month > spent_today or now.day == 1)
        assert Decimal(rows[tenant]["today"]["exact"]) == spent_today, tenant
        assert Decimal(rows[tenant]["month"]["exact"]) == spent_month, tenant
        assert rows[tenant]["today"]["shown"] == cents(spent_today)
        expected[tenant] = (spent_today, spent_month)
    budget = next(b for b in summary["budgets"] if b["tenant_id"] == hostile)
    percent = (expected[hostile][1] * 100 / limit).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    assert (budget["hard"], budget["period"], Decimal(budget["limit"]["exact"])) == (True, "month", limit)
    assert (Decimal(budget["spent"]["exact"]), budget["percent"]) == (expected[hostile][1], str(percent))
    assert any(a["message"] == message for a in summary["alerts"])
    assert set(summary["lag"]) == {"stage 1 (usage events to meter)", "stage 2 (rollup batches for alerts)"}

    # Only loopback names (a DNS name rebound to 127.0.0.1 gets nothing), and a strict content policy.
    assert get(dashboard + "/api/summary", host="attacker.example:80")[0] == 421
    status, headers, page = get(dashboard + "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"] and b"<script>" not in page
    assert get(dashboard + "/nope")[0] == 404

    shown = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
            dashboard + "/",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    artifact = Path(os.environ["TOKENMETER_HOME"]) / "artifacts" / "dashboard.html"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_text(dom, encoding="utf-8")
    with capsys.disabled():
        print(f"\n  dashboard DOM: {artifact}")
    assert "updated " in dom and "cannot reach" not in dom, dom[-3000:]
    for tenant, (spent_today, spent_month) in expected.items():
        assert f"<td>{html.escape(tenant, quote=False)}</td>" in dom, tenant
        for amount in (spent_today, spent_month):
            exact = f"{amount.normalize():f}"
            assert f'title="${exact} (exact)">{cents(amount)}</td>' in dom, (tenant, amount)
    assert "<img" not in dom  # the hostile name is text, never an element
    assert html.escape(message, quote=False) in dom
    assert f"{percent}%" in dom and "hard month" in dom
