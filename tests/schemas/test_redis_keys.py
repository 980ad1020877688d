"""The Redis key contract shared by the pipeline (writer) and the quota client (reader)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal

from schemas.periods import PERIODS
from schemas.redis_keys import (
    LIVE_WITHIN_MS,
    RATE_COUNTER_TTL_S,
    RATE_COUNTERS,
    RATE_LIMITS,
    SCOPE_KEYS,
    budget_key,
    caught_up_ms,
    escape_part,
    format_freshness,
    format_held,
    format_spend,
    freshness_heartbeat_ms,
    held_key,
    rate_counter_keys,
    rate_limit_key,
    scope_keys,
    spend_key,
    spend_period_end_ms,
    spend_value,
    stale_calls_field,
    stale_calls_key,
)
from streams.budgets import Budget, RateLimit

NOW = datetime(2025, 7, 2, 12, 30, tzinfo=UTC)


def test_names_are_escaped_so_no_two_scopes_share_a_key() -> None:
    assert escape_part("a:b%c") == "a%3Ab%25c"
    assert spend_key("a:b", "feature", "c", "day") != spend_key("a", "feature", "b:c", "day")
    assert budget_key("t:1", "user", "") != budget_key("t", "user", "1:")
    assert stale_calls_key("a%3A", "tenant", "") != stale_calls_key("a:", "tenant", "")
    assert spend_key("acme", "feature", "search", "month") == "tm:spend:acme:feature:search:month"


def test_scope_keys_follow_the_declared_order() -> None:
    keys = scope_keys("acme", "user", "u:1", NOW)
    assert len(keys) == len(SCOPE_KEYS) == 1 + len(PERIODS) + 2 + len(RATE_COUNTERS)
    by_kind = dict(zip(SCOPE_KEYS, keys, strict=True))
    assert by_kind["budget"] == budget_key("acme", "user", "u:1")
    assert [by_kind[f"spend_{p}"] for p in PERIODS] == [spend_key("acme", "user", "u:1", p) for p in PERIODS]
    assert by_kind["held"] == held_key("acme", "user", "u:1")
    assert by_kind["rate_limit"] == rate_limit_key("acme", "user", "u:1")
    assert [by_kind[c] for c in RATE_COUNTERS] == rate_counter_keys("acme", "user", "u:1", NOW)
    assert len(RATE_COUNTERS) == len(RATE_LIMITS) == len(RATE_COUNTER_TTL_S)


def test_rate_counters_are_per_minute_and_per_utc_day() -> None:
    minute = int(NOW.timestamp()) // 60
    assert rate_counter_keys("acme", "tenant", "", NOW) == [
        f"tm:rate:acme:tenant::calls:m{minute}",
        f"tm:rate:acme:tenant::tokens:m{minute}",
        "tm:rate:acme:tenant::calls:d20250702",
    ]


def test_spend_values_carry_their_period_end() -> None:
    end = datetime(2025, 8, 1, tzinfo=UTC)
    raw = format_spend(Decimal("12.500000000000"), end)
    assert raw == f"12.500000000000 {int(end.timestamp() * 1000)}"
    assert spend_value(raw, NOW) == Decimal("12.5")
    assert spend_value(raw.encode(), NOW) == Decimal("12.5")
    assert spend_value(raw, end) == 0 and spend_value(None, NOW) == 0 and spend_value(b"", NOW) == 0
    assert spend_period_end_ms(raw.encode()) == int(end.timestamp() * 1000)


def test_held_entries_have_the_shape_the_reserve_script_parses() -> None:
    lua_pattern = re.compile(r"^(\d+):(\d+):?(\d*)$")  # '^(%d+):(%d+):?(%d*)$' in producers/quota.py
    reservation, committed = format_held(50_000_000, 1_000), format_held(40_000_000, 2_000, 1_500)
    assert reservation == "50000000:1000" and lua_pattern.match(reservation)
    parsed = lua_pattern.match(committed)
    assert committed == "40000000:2000:1500" and parsed and parsed.groups() == ("40000000", "2000", "1500")


def test_freshness_is_the_least_current_live_process_else_the_newest() -> None:
    now_ms = 10_000_000
    live_old, live_new = format_freshness(9_000_000, now_ms - 1_000), format_freshness(9_500_000, now_ms)
    dead = format_freshness(9_900_000, now_ms - LIVE_WITHIN_MS - 1)
    assert caught_up_ms({b"a": live_old.encode(), b"b": live_new.encode(), b"c": dead.encode()}, now_ms) == 9_000_000
    assert caught_up_ms({"c": dead, "d": format_freshness(9_800_000, 0), "e": "junk"}, now_ms) == 9_900_000
    assert caught_up_ms({}, now_ms) is None
    assert freshness_heartbeat_ms(live_old.encode()) == now_ms - 1_000 and freshness_heartbeat_ms("junk") is None


def test_stale_call_fields_name_a_budget_window() -> None:
    assert stale_calls_key("acme", "feature", "a:b") == "tm:stale_calls:acme:feature:a%3Ab"
    assert stale_calls_field("month", 1767225600000) == "month:1767225600000"


def test_the_worker_writes_budget_and_rate_limit_values_the_client_reads() -> None:
    budget = json.loads(Budget("acme", "tenant", "", "month", Decimal("10"), hard=True).redis_json())
    assert set(budget) == {"limit", "period", "hard", "on_stale"} and Decimal(budget["limit"]) == 10
    limits = json.loads(RateLimit("acme", "tenant", "", calls_per_minute=5, calls_per_day=100).redis_json())
    assert set(limits) <= set(RATE_LIMITS) and limits == {"calls_per_minute": 5, "calls_per_day": 100}
