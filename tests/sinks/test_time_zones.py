"""A tenant's calendar in its own time zone, against the real Postgres and Redis: rollups, invoices,
reports and the quota check's budget periods all start at the tenant's midnight."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
import redis

from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.quota import QuotaClient
from schemas.events import validate_event
from schemas.periods import period_end, period_start
from schemas.records import PricedEvent, Rollup
from schemas.redis_keys import budget_key
from sinks.invoices import invoice
from sinks.postgres import set_time_zone, write_batch
from sinks.redis import write_spend
from sinks.reports import build_report, parse_period
from streams.pricing import PriceBook


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def priced(tenant: str, name: str, at: datetime) -> PricedEvent:
    event = validate_event(
        {
            "event_id": f"{tenant}-{name}",
            "timestamp": at,
            "tenant_id": tenant,
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 1000,
            "output_tokens": 100,
        }
    )
    return PricedEvent(event, PriceBook().price(event))


def test_rollups_invoices_and_reports_follow_the_tenants_calendar(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"tz-{unique}"
    assert set_time_zone(conn, tenant, "Asia/Tokyo") == []
    october = priced(tenant, "oct", datetime(2025, 10, 31, 14, tzinfo=UTC))  # 23:00 on 31 October in Tokyo
    november = priced(tenant, "nov", datetime(2025, 10, 31, 16, tzinfo=UTC))  # 01:00 on 1 November in Tokyo
    december = priced(tenant, "dec", datetime(2025, 11, 30, 16, tzinfo=UTC))  # 1 December in Tokyo
    result = write_batch(conn, [october, november, december])
    assert result.inserted == 3 and {r.time_zone for r in result.rollups} == {"Asia/Tokyo"}
    months = {r.window_start: r.calls for r in result.rollups if r.granularity == "month" and r.dimension == "tenant"}
    assert months == {
        datetime(2025, 9, 30, 15, tzinfo=UTC): 1,
        datetime(2025, 10, 31, 15, tzinfo=UTC): 1,
        datetime(2025, 11, 30, 15, tzinfo=UTC): 1,
    }

    bill = invoice(conn, tenant, "2025-11")
    assert bill.calls == 1 and bill.total == november.price.total_cost
    report = build_report(conn, tenant, parse_period("2025-11", time_zone="Asia/Tokyo"))
    assert report["period"]["time_zone"] == "Asia/Tokyo"
    assert Decimal(report["totals"]["cost"]) == november.price.total_cost and report["totals"]["calls"] == 1
    assert [day["date"] for day in report["trend_7d"]][-1] == "2025-11-30"

    # Moving the tenant to UTC rebuilds its windows from the ledger: October now holds two calls.
    tenant_set = [sys.executable, "-m", "deploy", "tenant", "set", "--tenant", tenant, "--timezone"]
    switched = subprocess.run([*tenant_set, "UTC"], capture_output=True, text=True, timeout=60)
    assert switched.returncode == 0, switched.stderr
    assert invoice(conn, tenant, "2025-10").calls == 2
    assert invoice(conn, tenant, "2025-10").total == october.price.total_cost + november.price.total_cost
    assert invoice(conn, tenant, "2025-11").total == december.price.total_cost
    assert write_batch(conn, [november]).inserted == 0  # the ledger is untouched: still counted once

    bad = subprocess.run([*tenant_set, "Mars/Base"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "unknown time zone 'Mars/Base'" in bad.stderr


def test_a_daily_budget_resets_at_the_tenants_midnight(stack: LocalStack, settings: Settings, unique: str) -> None:
    tenant = f"tzq-{unique}"
    client = QuotaClient(settings, redis.Redis.from_url(settings.redis_url))
    client.redis.set(budget_key(tenant, "tenant", ""), json.dumps({"limit": "10", "period": "day", "hard": True}))
    zone = "America/Los_Angeles"
    now = datetime.now(UTC)
    day = period_start("day", now, zone)
    spent = Rollup(tenant, "day", day, "tenant", "", 3, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal("12"), zone)
    assert write_spend(client.redis, [spent], now) == 1
    blocked = client.check(tenant, now=now)
    assert not blocked.allowed and blocked.spent == Decimal(12) and blocked.period == "day"
    assert not client.reserve(tenant, Decimal("0.01"), now=now).allowed
    next_day = period_end("day", day, zone) + timedelta(seconds=1)
    assert client.check(tenant, now=next_day).allowed
    assert client.reserve(tenant, Decimal("0.01"), now=next_day).allowed


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "Asia/Kathmandu", "America/St_Johns"])
def test_hour_and_day_windows_of_a_half_or_quarter_hour_zone_match_an_independent_count(
    conn: psycopg.Connection, unique: str, zone: str
) -> None:
    """Rollups are summed per UTC minute before they are truncated in the tenant's zone: for zones whose
    offset is not whole hours, every local hour and day must still get exactly its own calls."""
    from zoneinfo import ZoneInfo

    tenant = f"tzq-{unique}"
    set_time_zone(conn, tenant, zone)
    start = datetime(2025, 7, 1, 17, tzinfo=UTC)
    moments = [start + timedelta(minutes=7 * i, seconds=i % 60) for i in range(80)]  # ~9 h, across local midnight
    batch = [priced(tenant, f"e{i}", at) for i, at in enumerate(moments)]
    first = write_batch(conn, batch[:37])
    second = write_batch(conn, batch[37:] + batch[:5])  # a later batch with replays of earlier events
    assert first.inserted == 37 and second.inserted == 43

    local = ZoneInfo(zone)
    expected: dict[tuple[str, datetime], int] = {}
    for at in moments:  # the independent count: each call's local hour and day, by the standard library
        here = at.astimezone(local)
        for granularity, window in (
            ("hour", here.replace(minute=0, second=0, microsecond=0)),
            ("day", here.replace(hour=0, minute=0, second=0, microsecond=0)),
        ):
            key = (granularity, window.astimezone(UTC))
            expected[key] = expected.get(key, 0) + 1
    rows = conn.execute(
        "SELECT granularity, window_start, calls, cost FROM tokenmeter.rollups WHERE tenant_id = %s"
        " AND dimension = 'tenant' AND granularity IN ('hour', 'day')",
        (tenant,),
    ).fetchall()
    conn.commit()
    assert {(g, w.astimezone(UTC)): calls for g, w, calls, _ in rows} == expected
    unit = batch[0].price.total_cost
    assert all(cost == unit * calls for _, _, calls, cost in rows)
