"""The Redis key contract shared by the pipeline (writer) and the quota client (reader)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from redis.crc import key_slot

from schemas.periods import PERIODS
from schemas.redis_keys import (
    LIVE_WITHIN_MS,
    RATE_COUNTER_TTL_S,
    RATE_COUNTERS,
    RATE_LIMITS,
    SCOPE_KEYS,
    ScopeKey,
    budget_key,
    budget_pattern,
    caught_up_ms,
    escape_part,
    format_freshness,
    format_held,
    format_spend,
    freshness_heartbeat_ms,
    held_key,
    parse_scope_key,
    rate_counter_keys,
    rate_limit_key,
    scope_keys,
    spend_key,
    spend_pattern,
    spend_period_end_ms,
    spend_value,
    spend_version,
    spend_write_wins,
    stale_calls_field,
    stale_calls_key,
    unescape_part,
)
from streams.budgets import Budget, RateLimit

NOW = datetime(2025, 7, 2, 12, 30, tzinfo=UTC)


def test_names_are_escaped_so_no_two_scopes_share_a_key() -> None:
    assert escape_part("a:b%c") == "a%3Ab%25c"
    assert escape_part("{a}") == "%7Ba%7D"
    assert spend_key("a:b", "feature", "c", "day") != spend_key("a", "feature", "b:c", "day")
    assert budget_key("t:1", "user", "") != budget_key("t", "user", "1:")
    assert stale_calls_key("a%3A", "tenant", "") != stale_calls_key("a:", "tenant", "")
    assert spend_key("acme", "feature", "search", "month") == "tm:{acme}:spend:feature:search:month"


# Names that try to end the hash tag early, open a second one, or pass for an escape.
HOSTILE = ["}", "{", "{}", "}{", "a}b", "{victim}", "x}:{y", "%7D", "%7B", "a%7Db", "}}}", "{{", "a:b%c", "%", "u:1"]


@pytest.mark.parametrize("tenant", [*HOSTILE, "acme", "ACME", "é"])
def test_every_key_of_a_tenant_is_in_its_hash_slot(tenant: str) -> None:
    """Redis Cluster hashes the text between the first '{' and the next '}': that must be the whole
    (escaped) tenant id, whatever it contains, so one quota call touches one slot."""
    tag = "{" + escape_part(tenant) + "}"
    keys = [key for value in ("", "v}", "{v", "a:b") for key in scope_keys(tenant, "user", value, NOW)]
    keys += [stale_calls_key(tenant, "feature", "}"), spend_key(tenant, "tenant", "", "month")]
    for key in keys:
        first, close = key.index("{"), key.index("}")
        assert key[first : close + 1] == tag, key
        assert key_slot(key.encode()) == key_slot(tag[1:-1].encode()), key
        scope = parse_scope_key(key)
        assert scope is not None and scope.tenant_id == tenant, key
    assert len({key_slot(key.encode()) for key in keys}) == 1


def test_escaping_is_reversible_and_keeps_tenants_apart() -> None:
    assert len({escape_part(name) for name in HOSTILE}) == len(HOSTILE)
    for name in HOSTILE:
        assert unescape_part(escape_part(name)) == name
        assert not set(escape_part(name)) & set(":{}")
    assert len({budget_key(name, "tenant", "") for name in HOSTILE}) == len(HOSTILE)


def test_keys_parse_back_into_their_scope() -> None:
    assert parse_scope_key(spend_key("a}:b", "feature", "x:{y}", "week")) == ScopeKey(
        "spend", "a}:b", "feature", "x:{y}", "week"
    )
    assert parse_scope_key(budget_key("{t}", "tenant", "")) == ScopeKey("budget", "{t}", "tenant", "", "")
    minute = rate_counter_keys("t", "user", "u", NOW)[0]
    assert parse_scope_key(minute) == ScopeKey("rate", "t", "user", "u", f"calls:m{int(NOW.timestamp()) // 60}")
    # The layout before hash tags, and the freshness hash, are no tenant's keys.
    assert parse_scope_key("tm:spend:acme:tenant::month") is None
    assert parse_scope_key("tm:freshness:tokenmeter") is None


def test_scan_patterns_are_built_from_the_key_functions() -> None:
    assert spend_pattern("tenant", "", "month") == "tm:{*}:spend:tenant::month"
    assert spend_key("acme", "tenant", "", "month").startswith("tm:{") and budget_pattern() == "tm:{*}:budget:*"
    assert spend_pattern("feature", "a*b?[c]:d", "day") == r"tm:{*}:spend:feature:a\*b\?\[c\]%3Ad:day"


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
        f"tm:{{acme}}:rate:tenant::calls:m{minute}",
        f"tm:{{acme}}:rate:tenant::tokens:m{minute}",
        "tm:{acme}:rate:tenant::calls:d20250702",
    ]


def test_spend_values_carry_their_period_end_and_version() -> None:
    end = datetime(2025, 8, 1, tzinfo=UTC)
    end_ms = int(end.timestamp() * 1000)
    raw = format_spend(Decimal("12.500000000000"), end, 42, "Europe/Berlin")
    assert raw == f"12.500000000000 {end_ms} 42 Europe/Berlin"
    assert spend_version(raw) == spend_version(raw.encode()) == ("Europe/Berlin", end_ms, 42)
    for value in (raw, f"12.500000000000 {end_ms}"):  # the format before versions is still read
        assert spend_value(value, NOW) == Decimal("12.5")
        assert spend_value(value.encode(), NOW) == Decimal("12.5")
        assert spend_value(value, end) == 0
        assert spend_period_end_ms(value.encode()) == end_ms
    assert spend_value(None, NOW) == 0 and spend_value(b"", NOW) == 0
    assert spend_version(f"12.5 {end_ms}") is None and spend_version(None) is None and spend_version("junk") is None


def _spend(calls: int, end_ms: int = 2_000, zone: str = "UTC", amount: str = "1") -> str:
    return f"{amount} {end_ms} {calls} {zone}"


# (a write, what Redis holds, whether the write replaces it); the Lua copy of the rule is run on these
# cases too (tests/sinks/test_redis_versioned_writes.py).
SPEND_WRITE_CASES: list[tuple[str, str | bytes | None, bool]] = [
    (_spend(5), None, True),  # nothing there
    (_spend(5), b"", True),
    (_spend(5, amount="2"), _spend(4), True),  # a later total of the same window
    (_spend(4), _spend(5, amount="2"), False),  # an older batch, after a newer one
    (_spend(5), _spend(5), True),  # the same total again (a replay): idempotent
    (_spend(1, end_ms=3_000), _spend(900), True),  # a new period replaces the one that ended
    (_spend(900), _spend(1, end_ms=3_000), False),  # an ended period never replaces the open one
    (_spend(1, end_ms=1_000, zone="Asia/Tokyo"), _spend(9), True),  # another zone: the last write wins
    (_spend(9), _spend(1, end_ms=1_000, zone="Asia/Tokyo"), True),
    (_spend(1), "7.5 2000", True),  # the format before versions is replaced
    (_spend(1), "junk", True),
    ("7.5 2000", _spend(1), True),
    (_spend(2**40, end_ms=1_767_225_600_000), _spend(2**40 - 1, end_ms=1_767_225_600_000), True),  # big
    (_spend(2**40 - 1, end_ms=1_767_225_600_000), _spend(2**40, end_ms=1_767_225_600_000), False),
]


@pytest.mark.parametrize(("value", "stored", "wins"), SPEND_WRITE_CASES)
def test_a_spend_write_never_replaces_a_newer_value(value: str, stored: str | bytes | None, wins: bool) -> None:
    assert spend_write_wins(value, stored) is wins
    assert spend_write_wins(value, stored.encode() if isinstance(stored, str) else stored) is wins


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
    assert stale_calls_key("acme", "feature", "a:b") == "tm:{acme}:stale_calls:feature:a%3Ab"
    assert stale_calls_field("month", 1767225600000) == "month:1767225600000"


def test_the_worker_writes_budget_and_rate_limit_values_the_client_reads() -> None:
    budget = json.loads(Budget("acme", "tenant", "", "month", Decimal("10"), hard=True).redis_json())
    assert set(budget) == {"limit", "period", "hard", "on_stale"} and Decimal(budget["limit"]) == 10
    limits = json.loads(RateLimit("acme", "tenant", "", calls_per_minute=5, calls_per_day=100).redis_json())
    assert set(limits) <= set(RATE_LIMITS) and limits == {"calls_per_minute": 5, "calls_per_day": 100}
