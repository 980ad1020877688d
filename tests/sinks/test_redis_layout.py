"""The Redis layout and the quota decision, without a server."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from producers.quota import decide
from schemas.records import Rollup
from schemas.redis_keys import budget_key, spend_key, spend_value
from sinks.redis import spend_writes


def test_keys_escape_separators_so_scopes_never_collide() -> None:
    a = spend_key("a:b", "feature", "c", "day")
    b = spend_key("a", "feature", "b:c", "day")
    assert a != b and a.count(":") == b.count(":")
    assert budget_key("t:1", "user", "") != budget_key("t", "user", "1:")


def _rollup(
    granularity: str, start: datetime, dimension: str = "tenant", cost: str = "2.5", time_zone: str = "UTC"
) -> Rollup:
    return Rollup(
        "acme", granularity, start, dimension, "", 1, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal(cost), time_zone
    )


def test_spend_writes_cover_open_periods_of_quota_scopes_only() -> None:
    now = datetime(2025, 7, 2, 12, tzinfo=UTC)
    writes = spend_writes(
        [
            _rollup("day", datetime(2025, 7, 2, tzinfo=UTC)),
            _rollup("month", datetime(2025, 7, 1, tzinfo=UTC)),
            _rollup("day", datetime(2025, 6, 1, tzinfo=UTC)),  # ended: not written
            _rollup("hour", datetime(2025, 7, 2, 11, tzinfo=UTC)),
            _rollup("day", datetime(2025, 7, 2, tzinfo=UTC), "model"),
        ],
        now,
    )
    # a model is a quota scope too (budget hierarchies), so a model window given is written; which are given
    # is stage 1's choice (only named models: streams.live.LiveScopes.mirrored); an hour window never is
    assert sorted(writes) == [
        "tm:{acme}:spend:model::day",
        "tm:{acme}:spend:tenant::day",
        "tm:{acme}:spend:tenant::month",
    ]
    value, ttl = writes["tm:{acme}:spend:tenant::day"]
    end = datetime(2025, 7, 3, tzinfo=UTC)
    assert ttl == 36 * 3600  # to the end of the day plus a day
    assert value == f"2.5 {int(end.timestamp() * 1000)} 1 UTC"  # then its version: calls so far, zone


def test_spend_values_carry_the_end_of_their_period_in_the_tenants_zone() -> None:
    tokyo_day = datetime(2025, 7, 1, 15, tzinfo=UTC)  # 2025-07-02 00:00 in Tokyo
    now = datetime(2025, 7, 2, 10, tzinfo=UTC)  # 19:00 in Tokyo
    writes = spend_writes([_rollup("day", tokyo_day, time_zone="Asia/Tokyo")], now)
    value, _ = writes[spend_key("acme", "tenant", "", "day")]
    assert value.endswith(" 1 Asia/Tokyo")
    assert spend_value(value, now) == Decimal("2.5")
    assert spend_value(value, datetime(2025, 7, 2, 15, tzinfo=UTC)) == 0  # Tokyo's next day: reset
    assert spend_value(None, now) == 0


def test_only_the_window_open_now_is_written() -> None:
    now = datetime(2025, 7, 2, 0, 0, 30, tzinfo=UTC)
    late = _rollup("day", datetime(2025, 7, 1, tzinfo=UTC), cost="9")
    ahead = _rollup("day", datetime(2025, 7, 3, tzinfo=UTC), cost="5")  # a clock running ahead
    writes = spend_writes([_rollup("day", datetime(2025, 7, 2, tzinfo=UTC), cost="1"), late, ahead], now)
    assert writes[spend_key("acme", "tenant", "", "day")][0].startswith("1 ")


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
