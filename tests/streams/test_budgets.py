"""Budget rules without a broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from schemas.records import Rollup
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
    budgets = {
        b.key: b
        for b in [
            Budget("acme", "tenant", "", "month", Decimal(10), hard=True),
            Budget("acme", "feature", "search", "day", Decimal(1)),
        ]
    }
    windows = [
        spend("10.25"),
        spend("0.6", "feature", "search"),
        spend("0.6", "feature", "search", "day"),
        spend("99", "user", "u1"),
    ]
    alerts = budget_alerts(budgets, windows, MONTH)
    ids = [a.alert_id for a in alerts]
    assert len(ids) == len(set(ids)) == 4
    tenant = [a for a in alerts if a.scope["dimension"] == "tenant"]
    assert [a.threshold_percent for a in tenant] == [50, 80, 100]
    assert [a.kind for a in tenant] == ["budget.threshold", "budget.threshold", "budget.blocked"]
    assert tenant[2].current == Decimal("10.25") and tenant[2].limit == Decimal(10)
    assert "102.5%" in tenant[2].message and "blocked" in tenant[2].message
    feature = [a for a in alerts if a.scope["dimension"] == "feature"]
    assert [(a.period, a.threshold_percent) for a in feature] == [("day:2025-07-01", 50)]
    assert budget_alerts(budgets, [spend("10.25")], MONTH)[0].alert_id == ids[0]  # the same id again


def test_budgets_round_trip_and_reject_nonsense() -> None:
    budget = Budget("acme", "user", "u:1", "week", Decimal("12.50"), thresholds=(25, 100))
    assert parse_budget(budget.to_json()) == budget
    assert budget.key == budget_id("acme", "user", "u:1")
    for bad in [
        dict(dimension="region", value="x"),
        dict(period="year"),
        dict(limit=Decimal(0)),
        dict(dimension="tenant", value="x"),
        dict(thresholds=()),
    ]:
        with pytest.raises(ValueError):
            Budget(
                **{**dict(tenant_id="acme", dimension="feature", value="f", period="month", limit=Decimal(1)), **bad}
            )  # type: ignore[arg-type]


def test_budget_periods_are_named_by_the_tenants_local_calendar() -> None:
    budgets = {b.key: b for b in [Budget("acme", "tenant", "", "month", Decimal(10))]}
    november_in_tokyo = datetime(2025, 10, 31, 15, tzinfo=UTC)  # 1 November, 00:00 in Tokyo
    window = Rollup(
        "acme",
        "month",
        november_in_tokyo,
        "tenant",
        "",
        1,
        0,
        1,
        1,
        0,
        0,
        Decimal(0),
        Decimal(0),
        Decimal(6),
        "Asia/Tokyo",
    )
    (alert,) = budget_alerts(budgets, [window], november_in_tokyo)
    assert alert.period == "month:2025-11-01" and alert.details["time_zone"] == "Asia/Tokyo"
    assert alert.details["window_start"] == november_in_tokyo.isoformat()


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


# ---------------------------------------------------------------- records from config.budgets, whoever wrote them
def budget_record(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "tenant_id": "acme",
        "dimension": "feature",
        "value": "search",
        "period": "month",
        "limit": "10",
        "hard": False,
        "thresholds": [50, 80, 100],
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"limit": "3,5"}, "limit: '3,5' is not a decimal number"),
        ({"limit": "NaN"}, "limit must be a finite amount"),
        ({"limit": "Infinity"}, "limit must be a finite amount"),
        ({"limit": "-1"}, "limit must be more than zero"),
        ({"limit": "0"}, "limit must be more than zero"),
        ({"limit": "1e-13"}, "limit has more than 12 decimal places"),
        ({"limit": "0.0000000000001"}, "limit has more than 12 decimal places"),
        ({"limit": "1e15"}, "limit must be below 1,000,000,000,000,000"),
        ({"limit": "9" * 400}, "limit must be below"),
        ({"limit": None}, "limit must be a decimal string, got nothing"),
        ({"limit": ...}, "limit is required"),
        ({"limit": [10]}, "limit must be a decimal string, got list"),
        ({"limit": True}, "limit must be a decimal string, got bool"),
        ({"tenant_id": ...}, "tenant_id must be a string, got nothing"),
        ({"tenant_id": 7}, "tenant_id must be a string, got int"),
        ({"tenant_id": ""}, "tenant_id must be 1-200 characters"),
        ({"tenant_id": "ac\x00me"}, "tenant_id: control character U+0000 at position 2"),
        ({"value": "se\ud800arch"}, "value: lone surrogate U+D800 at position 2"),
        ({"value": "x" * 201}, "the scope value must be at most 200 characters"),
        ({"dimension": ...}, "dimension must be a string, got nothing"),
        ({"dimension": "region"}, "scope must be one of"),
        ({"dimension": "tenant"}, "a tenant budget has no scope value"),
        ({"period": "year"}, "period must be one of"),
        ({"period": ...}, "period must be a string"),
        ({"hard": "false"}, "hard must be true or false"),
        ({"hard": 1}, "hard must be true or false"),
        ({"thresholds": ["50"]}, "thresholds must be a list of whole percentages"),
        ({"thresholds": [50.5]}, "thresholds must be a list of whole percentages"),
        ({"thresholds": [True]}, "thresholds must be a list of whole percentages"),
        ({"thresholds": 50}, "thresholds must be a list of whole percentages"),
        ({"thresholds": []}, "thresholds are whole percentages between 1 and 1000"),
        ({"thresholds": [0, 50]}, "thresholds are whole percentages between 1 and 1000"),
        ({"thresholds": [1001]}, "thresholds are whole percentages between 1 and 1000"),
    ],
)
def test_bad_budget_records_are_value_errors_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_budget(budget_record(**changes))
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[]", "JSON object, got list"),
        (b"12", "JSON object, got int"),
        (b'{"tenant_id": "acme", "limit": NaN}', "tenant_id|limit|dimension"),
    ],
)
def test_bytes_that_are_not_a_budget_object_are_value_errors(value: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_budget(value)


def test_budget_records_keep_exact_limits_that_alerts_can_encode() -> None:
    from schemas import codec

    budget = parse_budget(budget_record(dimension="tenant", value="", limit="0.000000000001000", thresholds=[100]))
    assert budget.limit == Decimal("1E-12") and budget.thresholds == (100,)
    assert parse_budget(budget_record(limit=12.5, thresholds=[80, 50, 80])).thresholds == (50, 80)
    assert str(parse_budget(budget_record(limit="1E+3")).limit) == "1000"  # plain for Redis and its Lua script
    (alert,) = budget_alerts({budget.key: budget}, [spend("1")], MONTH)
    codec.record_writer("alert")(alert.to_avro())  # a 13th decimal place used to fail right here, in stage 2


def test_budgets_built_in_code_follow_the_same_rules() -> None:
    scope = dict(tenant_id="acme", dimension="tenant", value="", period="month")
    for limit, reason in [
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (Decimal("1e-13"), "decimal places"),
        (Decimal(10**15), "below"),
        (10, "must be a Decimal"),
        (10.5, "must be a Decimal"),
    ]:
        with pytest.raises(ValueError, match=reason):
            Budget(**scope, limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="whole percentages"):
        Budget(**scope, limit=Decimal(1), thresholds=(50.5,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tenant: control character U\\+001B"):
        Budget(**{**scope, "tenant_id": "\x1b[31macme"}, limit=Decimal(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"calls_per_minute": 0}, "each a whole number from 1"),
        ({"calls_per_minute": -5}, "each a whole number from 1"),
        ({"calls_per_minute": 1.5}, "each a whole number"),
        ({"calls_per_minute": True}, "each a whole number"),
        ({"calls_per_minute": "60"}, "each a whole number"),
        ({"tokens_per_minute": 10**13}, "each a whole number"),
        ({"calls_per_minute": None}, "give at least one limit"),
        ({"burst": 5}, "unknown rate limit fields: 'burst'"),
        ({"tenant_id": None}, "tenant_id must be a string"),
        ({"dimension": "region"}, "scope must be one of"),
        ({"tenant_id": "a\x7f"}, "tenant_id: control character U+007F"),
    ],
)
def test_bad_rate_limit_records_are_value_errors_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    from streams.budgets import parse_rate_limit

    body = {"tenant_id": "acme", "dimension": "tenant", "value": "", "calls_per_minute": 60, **changes}
    with pytest.raises(ValueError) as info:
        parse_rate_limit(json.dumps(body).encode())
    assert reason in str(info.value)
    for bad in (b"not json", b"[1]", b'"x"'):
        with pytest.raises(ValueError):
            parse_rate_limit(bad)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("acme", "is not a JSON list"),
        ("", "is not a JSON list"),
        ('"abc"', "is not a JSON list"),
        ("[" * 100_000, "is not a JSON list"),
        ('["acme", "tenant"]', "is not a JSON list"),
        ('["acme", "tenant", 1]', "is not a JSON list"),
        ('{"tenant": "acme"}', "is not a JSON list"),
        ("ratelimit:nope", "is not a JSON list"),
        ('["acme", "region", "x"]', "scope must be one of"),
        ('["ac\\u0000me", "tenant", ""]', "control character U+0000"),
        ('["acme", "tenant", ""]', "the key names scope ['acme', 'tenant', '']"),
        ('ratelimit:["acme", "feature", "chat"]', "unknown rate limit fields"),
    ],
)
def test_config_record_keys_are_json_scopes_that_match_their_value(key: str, reason: str) -> None:
    from streams.budgets import parse_config_record

    with pytest.raises(ValueError) as info:
        parse_config_record(key, budget_record())  # the value is the budget of acme/feature=search
    assert reason in str(info.value)


def test_deleting_needs_only_a_key_of_the_right_shape() -> None:
    from streams.budgets import parse_config_record

    # An older writer may have left a scope today's rules refuse; its tombstone must still clear it.
    record = parse_config_record('["ac\\u0001me", "team", "x"]', None)
    assert (record.kind, record.scope, record.item) == ("budget", ("ac\x01me", "team", "x"), None)
    with pytest.raises(ValueError, match="is not a JSON list"):
        parse_config_record("garbage", None)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["budget", "set", "--tenant", "acme", "--limit", "3,5"], "--limit: '3,5' is not a decimal number"),
        (["budget", "set", "--tenant", "acme", "--limit", "NaN"], "--limit must be a finite amount"),
        (["budget", "set", "--tenant", "acme", "--limit", "-1"], "--limit must be more than zero"),
        (
            ["budget", "set", "--tenant", "acme", "--limit", "0.0000000000001"],
            "--limit has more than 12 decimal places",
        ),
        (["budget", "set", "--tenant", "acme", "--limit", "1e20"], "--limit must be below"),
        (["budget", "set", "--tenant", "acme", "--limit", "5", "--thresholds", "50,x"], "--thresholds: '50,x'"),
        (["budget", "set", "--tenant", "ac\x01me", "--limit", "5"], "tenant: control character U+0001"),
        (["limit", "set", "--tenant", "acme", "--calls-per-minute", "0"], "each a whole number from 1"),
        (
            ["limit", "set", "--tenant", "acme", "--feature", "a\x85", "--calls-per-minute", "5"],
            "feature: control character U+0085",
        ),
    ],
)
def test_the_command_line_refuses_bad_budgets_and_limits_in_one_line(args: list[str], reason: str) -> None:
    from click.testing import CliRunner

    from deploy.cli import cli

    result = CliRunner().invoke(cli, args)  # fails before it would reach Kafka
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and reason in result.output


def test_an_overrun_after_stale_allowed_calls_is_reported_once_per_window() -> None:
    from datetime import UTC, datetime

    from schemas.records import Rollup
    from streams.budgets import overrun_alerts

    month = datetime(2025, 7, 1, tzinfo=UTC)

    def spent(cost: str) -> Rollup:
        return Rollup("acme", "month", month, "tenant", "", 10, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal(cost))

    hard = Budget("acme", "tenant", "", "month", Decimal(5), hard=True)
    (alert,) = overrun_alerts({hard.key: hard}, [spent("7.5")], month, lambda _b, _r: 12)
    assert alert.kind == "budget.overrun_during_outage" and alert.details["overrun"] == "2.5"
    assert "12 calls were allowed while the spend data was stale" in alert.message
    assert overrun_alerts({hard.key: hard}, [spent("4.9")], month, lambda _b, _r: 12) == []  # not over
    assert overrun_alerts({hard.key: hard}, [spent("7.5")], month, lambda _b, _r: 0) == []  # no stale calls
    soft = Budget("acme", "tenant", "", "month", Decimal(5))
    blocking = Budget("acme", "tenant", "", "month", Decimal(5), hard=True, on_stale="block")
    for other in (soft, blocking):  # only hard budgets that let stale calls through overrun that way
        assert overrun_alerts({other.key: other}, [spent("7.5")], month, lambda _b, _r: 12) == []
