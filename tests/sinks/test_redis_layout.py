"""The Redis layout and the quota decision, without a server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from producers.quota import budget_key, decide
from sinks.postgres import Rollup
from sinks.redis import period_end, period_start, spend_key, spend_writes


def test_periods_are_utc_calendar_day_iso_week_and_month() -> None:
    at = datetime(2025, 7, 2, 15, 30, tzinfo=UTC)  # a Wednesday
    assert period_start("day", at) == datetime(2025, 7, 2, tzinfo=UTC)
    assert period_start("week", at) == datetime(2025, 6, 30, tzinfo=UTC)
    assert period_start("month", at) == datetime(2025, 7, 1, tzinfo=UTC)
    assert period_end("month", datetime(2025, 12, 1, tzinfo=UTC)) == datetime(2026, 1, 1, tzinfo=UTC)


def test_keys_escape_separators_so_scopes_never_collide() -> None:
    start = datetime(2025, 7, 1, tzinfo=UTC)
    a = spend_key("a:b", "feature", "c", "day", start)
    b = spend_key("a", "feature", "b:c", "day", start)
    assert a != b and a.count(":") == b.count(":")
    assert budget_key("t:1", "user", "") != budget_key("t", "user", "1:")


def test_spend_writes_cover_open_periods_of_quota_scopes_only() -> None:
    now = datetime(2025, 7, 2, 12, tzinfo=UTC)

    def r(granularity: str, start: datetime, dimension: str = "tenant") -> Rollup:
        return Rollup("acme", granularity, start, dimension, "", 1, 0, 1, 1, 0, 0, Decimal(0), Decimal(0),
                      Decimal("2.5"))  # fmt: skip

    writes = spend_writes([
        r("day", datetime(2025, 7, 2, tzinfo=UTC)), r("month", datetime(2025, 7, 1, tzinfo=UTC)),
        r("day", datetime(2025, 6, 1, tzinfo=UTC)),  # closed long ago: not written
        r("hour", datetime(2025, 7, 2, 11, tzinfo=UTC)), r("day", datetime(2025, 7, 2, tzinfo=UTC), "model"),
    ], now)  # fmt: skip
    assert sorted(writes) == ["tm:spend:acme:tenant::day:2025-07-02", "tm:spend:acme:tenant::month:2025-07-01"]
    value, ttl = writes["tm:spend:acme:tenant::day:2025-07-02"]
    assert value == "2.5" and ttl == 36 * 3600  # to the end of the day plus a day of grace


def test_quota_decision() -> None:
    scopes = [("tenant", ""), ("feature", "search")]
    spend = {(d, v, p): Decimal(0) for d, v in scopes for p in ("day", "week", "month")}
    assert decide("acme", scopes, [None, None], spend).reason == "no budget applies"
    hard = json.dumps({"limit": "10", "period": "month", "hard": True})
    soft = json.dumps({"limit": "1", "period": "day", "hard": False})
    spend[("tenant", "", "month")] = Decimal("2.5")
    ok = decide("acme", scopes, [hard, None], spend)
    assert ok.allowed and ok.remaining == Decimal("7.5") and ok.limit == Decimal(10)
    spend[("feature", "search", "day")] = Decimal("3")
    over_soft = decide("acme", scopes, [hard, soft], spend)
    assert over_soft.allowed and "exceeded" in over_soft.reason and over_soft.scope == "acme/feature=search"
    spend[("tenant", "", "month")] = Decimal("10.25")
    blocked = decide("acme", scopes, [hard, soft], spend)
    assert not blocked.allowed and blocked.remaining == Decimal("-0.25") and "hard month budget" in blocked.reason
