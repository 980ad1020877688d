"""Budget rules without a broker."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from sinks.postgres import Rollup
from streams.budgets import Budget, budget_alerts, budget_id, crossed, parse_budget

MONTH = datetime(2025, 7, 1, tzinfo=UTC)


def spend(cost: str, dimension: str = "tenant", value: str = "", granularity: str = "month") -> Rollup:
    return Rollup("acme", granularity, MONTH, dimension, value, 1, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal(cost))


def test_thresholds_crossed_at_each_level() -> None:
    budget = Budget("acme", "tenant", "", "month", Decimal(10), hard=True)
    assert crossed(budget, Decimal("2.5")) == []
    assert crossed(budget, Decimal("6.25")) == [50]
    assert crossed(budget, Decimal("9.25")) == [50, 80]
    assert crossed(budget, Decimal("10")) == [50, 80, 100]


def test_budget_alerts_have_stable_ids_per_scope_period_and_threshold() -> None:
    budgets = {b.key: b for b in [Budget("acme", "tenant", "", "month", Decimal(10), hard=True),
                                  Budget("acme", "feature", "search", "day", Decimal(1))]}  # fmt: skip
    windows = [spend("10.25"), spend("0.6", "feature", "search"), spend("0.6", "feature", "search", "day"),
               spend("99", "user", "u1")]  # fmt: skip
    alerts = budget_alerts(budgets, windows, MONTH)
    ids = [a["alert_id"] for a in alerts]
    assert len(ids) == len(set(ids)) == 4
    tenant = [a for a in alerts if a["scope"]["dimension"] == "tenant"]
    assert [a["threshold_percent"] for a in tenant] == [50, 80, 100]
    assert [a["kind"] for a in tenant] == ["budget.threshold", "budget.threshold", "budget.blocked"]
    assert tenant[2]["current"] == Decimal("10.25") and tenant[2]["limit"] == Decimal(10)
    assert "102.5%" in tenant[2]["message"] and "blocked" in tenant[2]["message"]
    feature = [a for a in alerts if a["scope"]["dimension"] == "feature"]
    assert [(a["period"], a["threshold_percent"]) for a in feature] == [("day:2025-07-01", 50)]
    assert budget_alerts(budgets, [spend("10.25")], MONTH)[0]["alert_id"] == ids[0]  # the same id again


def test_budgets_round_trip_and_reject_nonsense() -> None:
    budget = Budget("acme", "user", "u:1", "week", Decimal("12.50"), thresholds=(25, 100))
    assert parse_budget(budget.to_json()) == budget
    assert budget.key == budget_id("acme", "user", "u:1")
    for bad in [dict(dimension="team", value="x"), dict(period="year"), dict(limit=Decimal(0)),
                dict(dimension="tenant", value="x"), dict(thresholds=())]:  # fmt: skip
        with pytest.raises(ValueError):
            Budget(**{**dict(tenant_id="acme", dimension="feature", value="f", period="month", limit=Decimal(1)),
                      **bad})  # type: ignore[arg-type]  # fmt: skip


def test_budget_periods_are_named_by_the_tenants_local_calendar() -> None:
    budgets = {b.key: b for b in [Budget("acme", "tenant", "", "month", Decimal(10))]}
    november_in_tokyo = datetime(2025, 10, 31, 15, tzinfo=UTC)  # 1 November, 00:00 in Tokyo
    window = Rollup("acme", "month", november_in_tokyo, "tenant", "", 1, 0, 1, 1, 0, 0, Decimal(0), Decimal(0),
                    Decimal(6), "Asia/Tokyo")  # fmt: skip
    (alert,) = budget_alerts(budgets, [window], november_in_tokyo)
    assert alert["period"] == "month:2025-11-01" and alert["details"]["time_zone"] == "Asia/Tokyo"
    assert alert["details"]["window_start"] == november_in_tokyo.isoformat()


def test_config_records_are_budgets_or_rate_limits_and_none_when_deleted() -> None:
    from streams.budgets import RateLimit, parse_config_record

    budget = Budget("acme", "feature", "search", "day", Decimal(2))
    assert parse_config_record(budget.key, budget.to_json()).item == budget
    deleted = parse_config_record(budget.key, None)
    assert (deleted.kind, deleted.scope, deleted.item) == ("budget", ("acme", "feature", "search"), None)
    limit = RateLimit("acme", "tenant", "", calls_per_minute=60)
    record = parse_config_record(limit.key, limit.to_json())
    assert (record.kind, record.scope, record.item) == ("rate_limit", ("acme", "tenant", ""), limit)
    assert parse_config_record(limit.key, None).item is None
