"""Prepaid credits end to end: usage through a real worker draws a grant down, the worker mirrors the
balance to Redis, where reserve refuses what it cannot cover, and the balance alert fires once."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import psycopg

from deploy.isolation import WorkerProcess, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.quota import QuotaClient
from schemas.credits import Grant, UsageSlice, allocate
from schemas.records import Alert
from sinks.alerts import list_alerts
from sinks.credits import record_grant
from streams.credits import UnconfirmedAlerts, credit_alerts
from streams.lag import wait_for_sinks
from tests.streams.test_worker_integration import record, send_raw, usage


def test_a_running_worker_mirrors_the_drawn_down_balance_and_alerts_once(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    own = isolated(settings, uuid.uuid4().hex[:10])
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        send_raw(own, [b'{"warm": "up"}'])
        assert wait_for_sinks(own, timeout=120), worker.output()
        tenant = f"e2e-credits-{uuid.uuid4().hex[:8]}"
        with psycopg.connect(own.database_url, autocommit=True) as conn:
            grant = record_grant(
                conn,
                tenant,
                Decimal("0.02"),
                priority=0,
                starts_at=datetime.now(UTC) - timedelta(minutes=5),
                expires_at=None,
                note="e2e",
            )
        client = QuotaClient(own)
        deadline = time.monotonic() + 10
        while client.check(tenant).credit_balance != Decimal("0.02") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.check(tenant).credit_balance == Decimal("0.02"), worker.output()
        # gpt-4o: 1,000 input tokens at $2.50/M + 100 output at $10/M = $0.0035 a call; five leave $0.0025 (12.5 %)
        record(own, [usage(tenant) for _ in range(5)], tmp_path)
        while client.check(tenant).credit_balance != Decimal("0.0025") and time.monotonic() < deadline + 10:
            time.sleep(0.2)
        assert client.check(tenant).credit_balance == Decimal("0.0025"), worker.output()
        assert not client.reserve(tenant, Decimal("0.0026")).allowed
        assert client.reserve(tenant, Decimal("0.0025")).allowed
        with psycopg.connect(own.database_url) as conn:
            while time.monotonic() < deadline + 15 and not list_alerts(conn, tenant):
                time.sleep(0.2)
            time.sleep(2.0)  # more ticks of the worker: still one alert
            alerts = list_alerts(conn, tenant)
        assert [(a["alert_id"], a["kind"], a["threshold_percent"]) for a in alerts] == [
            (f"credits:{grant.grant_id}:20", "credits.low", 20)
        ]
        assert "$0.0025 of $0.02 left (12.5%, threshold 20%)" in alerts[0]["message"]
        assert worker.alive(), worker.output()
    finally:
        worker.stop()


def test_credit_alerts_survive_a_failed_alert_store() -> None:
    """The follower's side of the worker's credit alert round (streams/app.py ``follow_credits``): the
    alerts reached are offered every round until the store confirms them, so a store that fails once
    delays them by a round instead of losing them (a used-up tenant makes no usage to derive them again)."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    grant = Grant(7, "acme", Decimal("10"), 0, start, None, start, "promo")
    used_up = allocate([grant], [UsageSlice(start, None, Decimal("10"))], start + timedelta(days=2))
    reached = credit_alerts(used_up, start + timedelta(days=2))
    assert sorted(a.alert_id for a in reached) == ["credits:7:0", "credits:7:20", "credits:7:5"]

    stored: dict[str, Alert] = {}  # keeps each alert id once, as the Postgres alert store does
    failures = [True]  # the first attempt fails (a Postgres blip), later ones succeed

    def store(alerts: list[Alert]) -> set[str]:
        if failures and failures.pop():
            raise psycopg.OperationalError("connection lost")
        new = {a.alert_id for a in alerts if a.alert_id not in stored}
        stored.update({a.alert_id: a for a in alerts if a.alert_id in new})
        return new

    def one_round(pending: UnconfirmedAlerts, derived: list[Alert]) -> None:
        pending.add(derived)
        offered = pending.due()
        try:
            store(offered)
        except psycopg.OperationalError:
            return  # not confirmed: offered again next round
        pending.confirm(a.alert_id for a in offered)

    pending = UnconfirmedAlerts()
    one_round(pending, reached)  # derived once (the balance changed), the store fails
    assert stored == {} and {a.alert_id for a in pending.due()} == {a.alert_id for a in reached}
    one_round(pending, [])  # nothing derived again (no new usage): the waiting alerts are stored now
    assert set(stored) == {a.alert_id for a in reached} and pending.due() == []
    one_round(pending, reached)  # derived again later: offered, stored once only
    assert len(stored) == 3 and pending.due() == []
