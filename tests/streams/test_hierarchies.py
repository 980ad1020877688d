"""Budget hierarchies without a broker: scopes at team, API key, model and tag level, their Redis keys,
budget records, the live tag dimensions stage 1 follows, and the quota client's pure decisions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.cli import _budget_scope
from producers.quota import _scopes, decide, tightest_budget
from schemas.periods import period_end, period_start
from schemas.records import Rollup
from schemas.redis_keys import (
    budget_key,
    format_held,
    format_spend,
    is_scope_dimension,
    parse_scope_key,
    scope_keys,
    spend_key,
    spend_pattern,
    tag_dimension,
    to_nano,
)
from sinks.redis import forget_keys, spend_writes
from streams.budgets import Budget, budget_alerts, parse_budget, parse_config_record
from streams.live import LiveScopes, NamedScopes

NOW = datetime(2025, 7, 15, 12, tzinfo=UTC)
MONTH_END = period_end("month", period_start("month", NOW))


# ---------------------------------------------------------------- scopes and their Redis keys
def test_new_fixed_dimensions_keep_the_plain_key_layout() -> None:
    assert budget_key("acme", "team", "search") == "tm:{acme}:budget:team:search"
    assert budget_key("acme", "api_key", "key-7") == "tm:{acme}:budget:api_key:key-7"
    assert spend_key("acme", "model", "openai/gpt-4o", "day") == "tm:{acme}:spend:model:openai/gpt-4o:day"
    parsed = parse_scope_key("tm:{acme}:budget:api_key:key-7")
    assert parsed is not None and (parsed.dimension, parsed.value) == ("api_key", "key-7")


def test_tag_names_with_colons_and_equals_signs_get_keys_of_their_own() -> None:
    a = budget_key("acme", tag_dimension("a:b"), "c")
    b = budget_key("acme", tag_dimension("a"), "b:c")
    assert a == "tm:{acme}:budget:tag%3Aa%3Ab:c" and b == "tm:{acme}:budget:tag%3Aa:b%3Ac" and a != b
    # a tag named like a fixed dimension is still a tag scope
    assert budget_key("acme", tag_dimension("team"), "x") != budget_key("acme", "team", "x")
    assert spend_pattern(tag_dimension("p*"), "v", "month") == r"tm:{*}:spend:tag%3Ap\*:v:month"


printable = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=64)


@given(tenant=printable, name=printable, value=printable)
def test_every_tag_scope_key_parses_back_to_its_scope(tenant: str, name: str, value: str) -> None:
    now = NOW
    for key in scope_keys(tenant, tag_dimension(name), value, now):
        parsed = parse_scope_key(key)
        assert parsed is not None, key
        assert (parsed.tenant_id, parsed.dimension, parsed.value) == (tenant, f"tag:{name}", value)


def test_scope_dimensions() -> None:
    for dimension in ("tenant", "feature", "user", "environment", "team", "api_key", "model", "tag:x", "tag:a=b"):
        assert is_scope_dimension(dimension), dimension
    for dimension in ("tag:", "region", "", "Team", "tags"):
        assert not is_scope_dimension(dimension), dimension


# ---------------------------------------------------------------- budget records
@pytest.mark.parametrize(
    ("dimension", "value"),
    [("team", "search"), ("api_key", "key-7"), ("model", "openai/gpt-4o"), ("tag:project", "apollo=1:2")],
)
def test_budgets_at_every_new_level_round_trip_through_the_config_topic(dimension: str, value: str) -> None:
    budget = Budget("acme", dimension, value, "month", Decimal("12.5"), hard=True)
    assert parse_budget(budget.to_json()) == budget
    record = parse_config_record(budget.key, budget.to_json())
    assert record.scope == ("acme", dimension, value) and record.item == budget


@pytest.mark.parametrize(
    ("dimension", "value", "reason"),
    [
        ("tag:", "x", "scope must be one of"),
        ("tag:" + "n" * 65, "x", "a tag name must be 1-64 characters"),
        ("tag:p", "v" * 257, "at most 256 characters"),
        ("tag:p\x07", "x", "scope: control character U+0007"),
        ("tag:p", "", "the others need one"),
        ("team", "t" * 201, "at most 200 characters"),
        ("model", "m" * 402, "at most 401 characters"),
        ("region", "x", "scope must be one of"),
    ],
)
def test_bad_scopes_are_refused_with_a_reason(dimension: str, value: str, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        Budget("acme", dimension, value, "month", Decimal(1))
    assert reason in str(info.value)
    record = json.dumps({"tenant_id": "acme", "dimension": dimension, "value": value, "period": "month", "limit": "1"})
    with pytest.raises(ValueError):  # the same record from the topic is skipped by the worker, not applied
        parse_budget(record.encode())


def rollup(dimension: str, value: str, cost: str, granularity: str = "month") -> Rollup:
    start = period_start(granularity, NOW)
    return Rollup("acme", granularity, start, dimension, value, 3, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal(cost))


def test_thresholds_fire_at_each_level_of_a_hierarchy() -> None:
    budgets = [
        Budget("acme", "team", "search", "month", Decimal(10)),
        Budget("acme", "api_key", "key-7", "month", Decimal(4), hard=True),
        Budget("acme", "tag:project", "apollo", "month", Decimal(2)),
        Budget("acme", "model", "openai/gpt-4o", "month", Decimal(100)),
    ]
    spent = {"team": "8.5", "api_key": "4", "tag:project": "1.2", "model": "30"}
    values = {b.dimension: b.value for b in budgets}
    alerts = budget_alerts({b.key: b for b in budgets}, [rollup(d, values[d], c) for d, c in spent.items()], NOW)
    fired = sorted((a.scope["dimension"], a.threshold_percent, a.kind) for a in alerts)
    # 8.5/10 = 85 %, 4/4 = 100 % of a hard budget, 1.2/2 = 60 %, 30/100 = 30 %
    assert fired == [
        ("api_key", 50, "budget.threshold"),
        ("api_key", 80, "budget.threshold"),
        ("api_key", 100, "budget.blocked"),
        ("tag:project", 50, "budget.threshold"),
        ("team", 50, "budget.threshold"),
        ("team", 80, "budget.threshold"),
    ]
    assert any("acme/tag:project=apollo has spent $1.2" in a.message for a in alerts)


def test_spend_of_every_scope_dimension_is_mirrored_and_forgotten() -> None:
    rollups = [rollup(d, v, "1") for d, v in (("team", "t"), ("api_key", "k"), ("tag:p", "v"), ("region", "x"))]
    written = spend_writes(rollups, NOW)
    assert sorted(written) == sorted(
        spend_key("acme", d, v, "month") for d, v in (("team", "t"), ("api_key", "k"), ("tag:p", "v"))
    )
    assert forget_keys([("acme", "tag:p", "v")]) == [
        spend_key("acme", "tag:p", "v", p) for p in ("day", "week", "month")
    ]


# ---------------------------------------------------------------- the tags stage 1 makes rollups for
def test_named_scopes_track_the_tag_names_budgets_name() -> None:
    named = NamedScopes()
    named.add(("acme", "tag:project", "apollo"))
    named.add(("acme", "tag:project", "gemini"))
    named.add(("acme", "team", "search"))
    named.add(("beta", "tag:a=b", "x"))
    named.add(("acme", "tag:project", "apollo"))  # again: no double count
    assert named.tag_dimensions == {("acme", "project"), ("beta", "a=b")}
    named.discard(("acme", "tag:project", "apollo"))
    assert named.tag_dimensions == {("acme", "project"), ("beta", "a=b")}  # gemini still names it
    named.discard(("acme", "tag:project", "gemini"))
    named.discard(("acme", "tag:project", "never-named"))
    named.discard(("beta", "tag:a=b", "x"))
    assert named == {("acme", "team", "search")}
    # unnamed, but still counted until recorded stale in Postgres and retired (stage 1 does both in order)
    assert named.unnamed_tags() == {("acme", "project"), ("beta", "a=b")} == named.tag_dimensions
    named.add(("beta", "tag:a=b", "y"))  # named again before the retirement: it stays
    named.retire(named.unnamed_tags() | {("beta", "a=b")})
    assert named.tag_dimensions == {("beta", "a=b")} and named.unnamed_tags() == frozenset()


def test_tags_recorded_complete_are_counted_until_known_unnamed() -> None:
    named = NamedScopes()
    named.keep([("acme", "project"), ("acme", "region")])  # what Postgres records complete at the start
    named.add(("acme", "tag:project", "apollo"))  # the budgets read back
    assert named.tag_dimensions == {("acme", "project"), ("acme", "region")}
    assert named.unnamed_tags() == {("acme", "region")}
    named.retire(named.unnamed_tags())
    assert named.tag_dimensions == {("acme", "project")}


def test_named_scopes_change_only_through_add_and_discard() -> None:
    named = NamedScopes([("acme", "tag:p", "v"), ("acme", "user", "u")])
    for mutator in ("update", "clear", "pop", "remove", "difference_update", "intersection_update", "__ior__"):
        assert not hasattr(named, mutator), mutator
    assert not isinstance(named, set)
    assert named.tag_dimensions == {("acme", "p")}
    joined = named | {("beta", "tag:q", "w")}  # a new NamedScopes with its own bookkeeping; named unchanged
    assert isinstance(joined, NamedScopes) and joined.tag_dimensions == {("acme", "p"), ("beta", "q")}
    assert named.tag_dimensions == {("acme", "p")} and len(named) == 2 and ("acme", "user", "u") in named
    assert named - {("acme", "tag:p", "v")} == {("acme", "user", "u")}


def test_values_of_budgeted_tags_teams_and_keys_are_bounded_like_users() -> None:
    live = LiveScopes(per_tenant=2)
    live.named.add(("acme", "tag:req", "vip"))
    day = [rollup("tag:req", v, "1", "day") for v in ("vip", "r1", "r2", "r3")]
    evicted = live.observe(day)
    assert evicted == [("acme", "tag:req", "r1")]  # vip dropped out of the recent list but a budget names it
    assert [r.dimension_value for r in day if live.live(r)] == ["vip", "r2", "r3"]
    teams = [rollup("team", f"t{i}", "1", "day") for i in range(3)]
    assert live.observe(teams) == [("acme", "team", "t0")]


def test_redis_mirrors_models_teams_and_keys_only_for_named_values() -> None:
    """A quota check reads their spend only when a budget names them: unnamed ones would cost three keys
    per active value and batch in every workload (stage 2 still gets their recent windows)."""
    live = LiveScopes(per_tenant=10)
    live.named.add(("acme", "model", "openai/gpt-4o"))
    live.named.add(("acme", "team", "search"))
    windows = [
        rollup("model", "openai/gpt-4o", "1", "day"),
        rollup("model", "openai/gpt-4o-mini", "1", "day"),
        rollup("team", "search", "1", "day"),
        rollup("team", "ads", "1", "day"),
        rollup("api_key", "key-1", "1", "day"),
        rollup("user", "u-1", "1", "day"),
        rollup("tag:req", "r1", "1", "day"),
        rollup("tenant", "", "1", "day"),
    ]
    live.observe(windows)
    assert [(r.dimension, r.dimension_value) for r in windows if live.mirrored(r)] == [
        ("model", "openai/gpt-4o"),
        ("team", "search"),
        ("user", "u-1"),
        ("tag:req", "r1"),
        ("tenant", ""),
    ]
    assert all(live.live(r) for r in windows)  # stage 2's selection is unchanged


# ---------------------------------------------------------------- the quota client's decisions
def test_scopes_of_a_call_are_the_tenant_then_every_level_given() -> None:
    scopes = _scopes(
        "search", "u-1", "prod", team="t", api_key="k", model="openai/gpt-4o", tags={"z": "1", "a": "2", "e": ""}
    )
    assert scopes == [
        ("tenant", ""),
        ("feature", "search"),
        ("user", "u-1"),
        ("environment", "prod"),
        ("team", "t"),
        ("api_key", "k"),
        ("model", "openai/gpt-4o"),
        ("tag:a", "2"),
        ("tag:z", "1"),
    ]
    assert _scopes(None, None) == [("tenant", "")]
    with pytest.raises(TypeError, match="team must be a string"):
        _scopes(None, None, team=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tags are non-empty names"):
        _scopes(None, None, tags={"p": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at most 32 tags"):
        _scopes(None, None, tags={f"t{i}": "v" for i in range(33)})
    with pytest.raises(ValueError, match="tag names are at most 64 characters"):
        _scopes(None, None, tags={"n" * 65: "v"})
    with pytest.raises(ValueError, match="the team is longer than any budget scope"):
        _scopes(None, None, team="t" * 10_000)
    assert _scopes(None, None, tags={"p": "v" * 256}, model="m" * 401)[1:] == [
        ("model", "m" * 401),
        ("tag:p", "v" * 256),
    ]


def budget_json(limit: str, hard: bool = True, period: str = "month") -> str:
    return json.dumps({"limit": limit, "period": period, "hard": hard})


def spend_value_text(amount: str) -> str:
    return format_spend(Decimal(amount), MONTH_END, 1, "UTC")


def test_the_tightest_hard_budget_the_call_does_not_fit_is_named() -> None:
    expires = int((NOW + timedelta(minutes=5)).timestamp() * 1000)
    expired = int((NOW - timedelta(minutes=5)).timestamp() * 1000)
    # tenant $100 ($50 spent), team $20 ($15), user $10 ($9.50), key $5 ($1 spent, $3.80 held, $9 expired)
    budgets = [budget_json("100"), budget_json("20"), budget_json("10"), budget_json("5"), budget_json("0.1", False)]
    spend = [{"month": spend_value_text(s)} for s in ("50", "15", "9.5", "1", "7")]
    held = [
        {},
        {},
        {},
        {b"r1": format_held(to_nano(Decimal("3.8")), expires), b"r2": format_held(to_nano(Decimal(9)), expired)},
        {},
    ]
    # rooms: 50, 5, 0.5, 0.2 (and a soft budget, which never refuses)
    assert tightest_budget(budgets, spend, held, to_nano(Decimal("0.1")), NOW) is None
    key_held = to_nano(Decimal("3.8"))
    assert tightest_budget(budgets, spend, held, to_nano(Decimal("0.3")), NOW) == (3, to_nano(Decimal(1)), key_held)
    assert tightest_budget(budgets, spend, held, to_nano(Decimal(1)), NOW)[0] == 3  # type: ignore[index]
    assert tightest_budget(budgets, spend, held, to_nano(Decimal(60)), NOW)[0] == 3  # type: ignore[index]
    # spend of an ended period counts nothing
    old = [{"month": format_spend(Decimal(50), NOW - timedelta(days=1), 1, "UTC")}]
    assert tightest_budget(budgets[:1], old, held[:1], to_nano(Decimal(99)), NOW) is None


def test_check_names_the_exhausted_hard_budget_furthest_over() -> None:
    scopes: list[Any] = [("tenant", ""), ("team", "t"), ("user", "u"), ("api_key", "k")]
    budgets = [budget_json("100"), budget_json("10"), budget_json("5"), budget_json("1", hard=False)]
    spend = {(d, v, p): Decimal(0) for d, v in scopes for p in ("day", "week", "month")}
    spend |= {("tenant", "", "month"): Decimal(20), ("team", "t", "month"): Decimal(11)}
    spend |= {("user", "u", "month"): Decimal(8), ("api_key", "k", "month"): Decimal(3)}
    decision = decide("acme", scopes, budgets, spend)
    assert not decision.allowed and decision.scope == "acme/user=u" and decision.remaining == Decimal(-3)
    assert decision.refused_by == {"tenant_id": "acme", "dimension": "user", "value": "u", "label": "acme/user=u"}
    assert decision.as_json()["refused_by"]["dimension"] == "user"
    allowed = decide("acme", scopes[:2], budgets[:2], {**spend, ("team", "t", "month"): Decimal(4)})
    assert allowed.allowed and allowed.refused_by is None and allowed.scope == "acme/team=t"


# ---------------------------------------------------------------- the command line's scope options
def test_scope_options_name_one_level() -> None:
    assert _budget_scope() == ("tenant", "")
    assert _budget_scope(team="search", feature=None) == ("team", "search")
    assert _budget_scope(api_key="key-7") == ("api_key", "key-7")
    assert _budget_scope(model="openai/gpt-4o") == ("model", "openai/gpt-4o")
    assert _budget_scope(tag="project=apollo=1") == ("tag:project", "apollo=1")  # split at the first '='
    for bad in ({"team": "a", "user": "b"}, {"tag": "noequals"}, {"tag": "=v"}, {"tag": "n="}):
        with pytest.raises(SystemExit):
            _budget_scope(**bad)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["budget", "set", "--tenant", "acme", "--team", "a", "--api-key", "b", "--limit", "1"], "at most one of"),
        (["budget", "set", "--tenant", "acme", "--tag", "project", "--limit", "1"], "--tag takes name=value"),
        (["budget", "set", "--tenant", "acme", "--tag", "p=" + "v" * 257, "--limit", "1"], "at most 256 characters"),
        (["budget", "set", "--tenant", "acme", "--api-key", "k\x00", "--limit", "1"], "control character U+0000"),
        (["limit", "set", "--tenant", "acme", "--model", "m" * 402, "--calls-per-day", "5"], "at most 401"),
        (["budget", "delete", "--tenant", "acme", "--team", "a", "--tag", "p=v"], "at most one of"),
    ],
)
def test_the_command_line_refuses_bad_hierarchy_scopes_in_one_line(args: list[str], reason: str) -> None:
    from click.testing import CliRunner

    from deploy.cli import cli

    result = CliRunner().invoke(cli, args)  # fails before it would reach Kafka
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and reason in result.output


def test_a_scopes_first_budget_asks_for_a_rebuild_even_after_a_rate_limit_named_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tag named by a rate limit only has rollups since then: its first budget must rebuild them from the
    ledger (``Sinks.refresh_spend``); a changed budget or a rate limit does not."""
    import streams.meter as meter
    from streams.budgets import RateLimit

    captured: list[Any] = []
    monkeypatch.setattr(meter, "kafka_config", lambda settings: {})
    monkeypatch.setattr(meter, "ConfigFollower", lambda config, topic, apply: captured.append(apply))
    named = NamedScopes()
    budgeted: list[tuple[str, str, str]] = []
    meter.scope_follower(meter.Settings(), named, budgeted)
    apply = captured[0]
    scope = ("acme", "tag:project", "apollo")
    limit = RateLimit(*scope, calls_per_minute=5)
    apply(limit.key, limit.to_json())
    assert budgeted == [] and named.tag_dimensions == {("acme", "project")}
    budget = Budget(*scope, "month", Decimal(10), hard=True)
    apply(budget.key, budget.to_json())
    assert budgeted == [scope]  # the first budget: rebuilt, although the scope was named already
    apply(budget.key, Budget(*scope, "month", Decimal(20), hard=True).to_json())
    assert budgeted == [scope]  # a new limit of the same budget: nothing to rebuild
    apply(budget.key, None)
    apply(budget.key, budget.to_json())
    assert budgeted == [scope, scope]  # deleted and set again: asked again (a rebuild is idempotent)
