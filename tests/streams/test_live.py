"""The bounded live scopes: most recent values per tenant and dimension, plus every value a budget names."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from schemas.records import Rollup
from schemas.redis_keys import spend_key
from sinks.redis import forget_keys
from streams.live import LiveScopes


def day(tenant: str, dimension: str, value: str, granularity: str = "day") -> Rollup:
    return Rollup(
        tenant,
        granularity,
        datetime(2025, 7, 1, tzinfo=UTC),
        dimension,
        value,
        1,
        0,
        1,
        1,
        0,
        0,
        Decimal(0),
        Decimal(0),
        Decimal("0.1"),
    )


def test_only_the_most_recent_values_of_each_tenant_stay_live_and_budgets_keep_theirs() -> None:
    live = LiveScopes(per_tenant=2)
    live.named.add(("acme", "user", "vip"))
    assert live.observe([day("acme", "user", "vip"), day("acme", "user", "a"), day("acme", "user", "b")]) == []
    evicted = live.observe([day("acme", "user", "c"), day("acme", "user", "a"), day("beta", "user", "x")])
    assert evicted == [("acme", "user", "b")]  # "vip" left the recent list too, but a budget names it
    assert [v for v in ("vip", "a", "b", "c") if live.live(day("acme", "user", v, "hour"))] == ["vip", "a", "c"]
    assert live.live(day("acme", "tenant", "")) and live.live(day("beta", "user", "x"))
    assert live.tracked() == 3
    assert forget_keys(evicted) == [spend_key("acme", "user", "b", p) for p in ("day", "week", "month")]
    # models have spend keys since budgets may name them (budget hierarchies); Redis holds them only for
    # named models (``LiveScopes.mirrored``), whose keys are deleted like any scope's when forgotten
    assert forget_keys([("acme", "model", "openai/gpt-4o")]) == [
        spend_key("acme", "model", "openai/gpt-4o", p) for p in ("day", "week", "month")
    ]
