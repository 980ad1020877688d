"""The main job, as a user runs it: `tokenmeter demo` on the (test) stack, to the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from deploy.demo import HISTORY_DAYS, TENANTS
from deploy.isolation import free_port
from deploy.settings import Settings
from deploy.stack import LocalStack


def window_day(alert: dict[str, Any]) -> date:
    """The day an anomaly's window starts: ``period`` is ``hour:<ISO start>`` or ``day:<ISO start>``."""
    try:
        return date.fromisoformat(alert["period"].split(":", 1)[1][:10])
    except (IndexError, ValueError):
        return date.max


def test_demo_runs_to_the_end_and_its_report_adds_up(stack: LocalStack, settings: Settings) -> None:
    started = datetime.now(UTC)
    command = ["demo", "--duration", "25", "--rate", "400", "--dashboard-port", str(free_port())]
    wide = {**os.environ, "COLUMNS": "200"}  # rich wraps long lines at the terminal's width (80 in a pipe)
    done = subprocess.run(
        [sys.executable, "-m", "deploy", *command], capture_output=True, text=True, timeout=600, env=wide
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6", "By model", "By feature", "By user", "HTML report"):
        assert step in out, step
    assert "live dashboard while the demo runs: http://127.0.0.1:" in out
    assert (settings.home / "report.html").read_text().count("<svg") == 6

    # A multi-week history: the 7-day trend has spend on every day.
    shown = subprocess.run(
        [sys.executable, "-m", "deploy", "report", "--format", "json"], capture_output=True, text=True, timeout=60
    )
    report = json.loads(shown.stdout)
    assert sum(1 for day in report["trend_7d"] if Decimal(day["cost"]) > 0) >= 7, report["trend_7d"]
    total = Decimal(report["totals"]["cost"])
    assert total > 0
    for key in ("by_provider", "by_model", "by_feature", "by_environment"):
        assert sum(Decimal(r["cost"]) for r in report[key]) == total, key

    # The anomaly rules found the incident in the backfilled history (windows of earlier days), and only it.
    listed = subprocess.run(
        [sys.executable, "-m", "deploy", "alerts", "list", "--limit", "100000", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    first_day = started.date() - timedelta(days=HISTORY_DAYS)
    history = [
        a
        for a in json.loads(listed.stdout)
        if a["kind"].startswith("anomaly.")
        and a["tenant_id"] in TENANTS
        and first_day <= window_day(a) < started.date()
    ]
    assert history and {a["tenant_id"] for a in history} == {"initech"}, history
    assert {a["kind"] for a in history} >= {"anomaly.daily_spend_spike", "anomaly.spend_spike"}, history
    assert f"anomalies the rules found in the history ({len(history)})" in out

    # globex's hard budget: reserve() refused calls, and the overrun is within what was reserved in flight.
    checked = subprocess.run(
        [sys.executable, "-m", "deploy", "quota", "check", "--tenant", "globex", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    quota = json.loads(checked.stdout)
    spent, limit = Decimal(quota["spent"]), Decimal(quota["limit"])
    found = re.search(r"exact: limit=(\S+) spent=(\S+) overrun=(\S+) in_flight_max=(\S+)", out)
    assert found, out[-4000:]
    printed_limit, printed_spent, overrun, in_flight = (Decimal(v) for v in found.groups())
    assert (printed_limit, printed_spent) == (limit, spent)
    assert overrun == max(Decimal(0), spent - limit) <= in_flight and in_flight > 0
    refused = re.search(r"([\d,]+) calls refused by reserve\(\)", out)
    assert refused and int(refused.group(1).replace(",", "")) > 0, out[-4000:]
    assert spent >= limit * Decimal("0.9")  # it did run into the budget
    assert "overrun within the in-flight reservations" in out
