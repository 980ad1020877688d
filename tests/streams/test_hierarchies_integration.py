"""Budget hierarchies against the real stack: the Postgres sink's rollups per team, API key, model and
budgeted tag; one reserve over tenant, team, user and API key budgets in the real Redis; and the worker
counting spend at those levels so that thresholds alert and hard budgets block.

Every expected amount is summed here from the events the test made, priced by genai-prices itself."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import psycopg
import pytest
import redis

from deploy.isolation import env_for
from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.producer import UsageProducer
from producers.quota import QuotaClient
from schemas.events import validate_event
from schemas.periods import period_end, period_start
from schemas.records import PricedEvent, money
from schemas.redis_keys import (
    budget_key,
    format_held,
    format_spend,
    freshness_key,
    held_key,
    rate_limit_key,
    spend_key,
    spend_value,
)
from sinks.postgres import ensure_tag_rollups, mark_tag_scopes_stale, rebuild_tag_rollups, set_time_zone, write_batch
from sinks.redis import write_freshness
from streams.budgets import Budget, RateLimit
from streams.lag import wait_for_sinks
from streams.meter import Sinks
from streams.pricing import PriceBook
from tests.helpers import worker_running


def price(event: dict[str, Any]) -> Decimal:
    """What genai-prices says the call cost, rounded as the ledger stores it."""
    usage = genai_prices.Usage(input_tokens=event["input_tokens"], output_tokens=event["output_tokens"])
    found = genai_prices.calc_price(
        usage, event["model"], provider_id=event["provider"], genai_request_timestamp=event["timestamp"]
    )
    return money(found.total_price)


def sums(events: list[dict[str, Any]], value_of: Callable[[dict[str, Any]], str | None]) -> dict[str, Decimal]:
    """Spend per value of one level, over the events that have one."""
    out: dict[str, Decimal] = {}
    for event in events:
        value = value_of(event)
        if value is not None:
            out[value] = out.get(value, Decimal(0)) + price(event)
    return out


LEVELS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "team": lambda e: e.get("team_id"),
    "api_key": lambda e: e.get("api_key_id"),
    "model": lambda e: f"{e['provider']}/{e['model']}",
    "tag:project": lambda e: e.get("tags", {}).get("project"),
}


def hierarchy_events(tenant: str, count: int, start: datetime, seed: int) -> list[dict[str, Any]]:
    """Calls spread over teams, keys, two models and two tags (a per-call ``run`` tag no budget names)."""
    rng = random.Random(seed)
    events = []
    for i in range(count):
        event: dict[str, Any] = {
            "event_id": f"{tenant}-{i}",
            "timestamp": start + timedelta(seconds=37 * i),
            "tenant_id": tenant,
            "provider": "openai",
            "model": rng.choice(["gpt-4o", "gpt-4o-mini"]),
            "input_tokens": rng.randint(100, 40_000),
            "output_tokens": rng.randint(0, 4_000),
            "tags": {"run": f"r{i}"},
        }
        if team := rng.choice(["search", "ads", None]):
            event["team_id"] = team
        if key := rng.choice(["key-1", "key-2", "key-3", None]):
            event["api_key_id"] = key
        if project := rng.choice(["apollo", "gemini", None]):
            event["tags"]["project"] = project
        events.append(event)
    return events


# ---------------------------------------------------------------- the Postgres sink
@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url) as connection:
        yield connection


def month_rollups(conn: psycopg.Connection, tenant: str, dimension: str) -> dict[str, Decimal]:
    rows = conn.execute(
        "SELECT dimension_value, sum(cost) FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = 'month'"
        " AND dimension = %s GROUP BY 1",
        (tenant, dimension),
    ).fetchall()
    conn.commit()
    return {value: cost for value, cost in rows}


def test_rollups_per_team_key_model_and_budgeted_tag_equal_the_events_sums(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"hier-{unique}"
    events = hierarchy_events(tenant, 120, datetime(2025, 8, 10, 6, tzinfo=UTC), seed=16)
    book = PriceBook()
    items = [PricedEvent(e, book.price(e)) for e in (validate_event(d) for d in events)]
    tagged = {(tenant, "project")}
    assert write_batch(conn, items[:60]).inserted == 60  # no budget names a tag yet
    assert month_rollups(conn, tenant, "tag:project") == {}
    assert write_batch(conn, items[60:], tagged).inserted == 60  # now one does
    assert month_rollups(conn, tenant, "tag:project") == sums(events[60:], LEVELS["tag:project"])
    # when a budget starts to name a tag, its rollups are rebuilt from the ledger: every call counts
    rebuild_tag_rollups(conn, tenant, "project")
    for dimension, value_of in LEVELS.items():
        assert month_rollups(conn, tenant, dimension) == sums(events, value_of), dimension
    assert month_rollups(conn, tenant, "tag:run") == {}  # a tag no budget names has no rollups at all
    (minutes,) = conn.execute(
        "SELECT count(*) FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity IN ('minute', 'hour')"
        " AND dimension NOT IN ('tenant', 'feature', 'model', 'user', 'environment')",
        (tenant,),
    ).fetchone() or (None,)
    assert minutes == 0  # no minute or hour windows per team, key or tag: nothing reads them
    # a replay counts nothing and reads back the totals of every window it touches, tags included
    replay = write_batch(conn, items[50:70], tagged)
    assert replay.inserted == 0
    replayed = {(r.dimension, r.dimension_value): r.cost for r in replay.rollups if r.granularity == "month"}
    for dimension in ("tag:project", "team", "api_key"):
        for value in sums(events[50:70], LEVELS[dimension]):
            assert replayed[(dimension, value)] == sums(events, LEVELS[dimension])[value]
    # a new time zone rebuilds the tenant's rollups, the budgeted tag's included
    set_time_zone(conn, tenant, "Asia/Tokyo")
    for dimension, value_of in LEVELS.items():
        assert month_rollups(conn, tenant, dimension) == sums(events, value_of), dimension


# ---------------------------------------------------------------- tag rebuilds at scale
def tagged_calls(tenant: str, count: int, start: datetime, prefix: str) -> list[dict[str, Any]]:
    """Calls of one tenant in one month, most with a ``project`` tag; few distinct token counts, so the
    independent sums price each distinct call once."""
    return [
        {
            "event_id": f"{prefix}-{i}",
            "timestamp": start + timedelta(seconds=i % 86_400, days=i % 20),
            "tenant_id": tenant,
            "provider": "openai",
            "model": ("gpt-4o", "gpt-4o-mini")[i % 2],
            "input_tokens": 1_000 * (i % 7 + 1),
            "output_tokens": 100 * (i % 5),
            "tags": {"project": ("apollo", "gemini", "vega")[i % 3]} if i % 4 else {},
        }
        for i in range(count)
    ]


def tag_sums(events: list[dict[str, Any]]) -> dict[str, Decimal]:
    """Spend per ``project`` value, pricing each distinct (model, tokens) once with genai-prices."""
    prices: dict[tuple[str, int, int], Decimal] = {}
    out: dict[str, Decimal] = {}
    for event in events:
        if project := event["tags"].get("project"):
            key = (event["model"], event["input_tokens"], event["output_tokens"])
            if key not in prices:
                prices[key] = price(event)
            out[project] = out.get(project, Decimal(0)) + prices[key]
    return out


def priced(book: PriceBook, events: list[dict[str, Any]]) -> list[PricedEvent]:
    return [PricedEvent(e, book.price(e)) for e in (validate_event(d) for d in events)]


def test_a_rebuild_of_a_large_tenant_does_not_block_other_tenants_and_misses_no_call(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    big, other = f"big-{unique}", f"other-{unique}"
    start = datetime(2025, 8, 1, tzinfo=UTC)
    book = PriceBook()
    bulk = tagged_calls(big, 50_000, start, f"{big}-bulk")
    items = priced(book, bulk)
    for first in range(0, len(items), 5_000):  # no budget names the tag yet: no tag rollups
        write_batch(conn, items[first : first + 5_000])
    assert month_rollups(conn, big, "tag:project") == {}
    named = {(big, "project"), (other, "project")}  # from now on a budget names the tag in both tenants
    during_big = tagged_calls(big, 2_000, start, f"{big}-during")
    other_calls = tagged_calls(other, 4_000, start, f"{other}-calls")
    big_items, other_items = priced(book, during_big), priced(book, other_calls)
    rebuilt = threading.Event()
    spans: dict[str, tuple[float, float]] = {}
    failures: list[BaseException] = []

    def rebuild() -> None:
        try:
            with psycopg.connect(settings.database_url) as own:
                began = time.monotonic()
                rebuild_tag_rollups(own, big, "project")
                spans["rebuild"] = (began, time.monotonic())
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            rebuilt.set()

    def write_big_meanwhile() -> None:  # the large tenant's own batches go on during the rebuild too
        try:
            with psycopg.connect(settings.database_url) as own:
                for first in range(0, len(big_items), 100):
                    write_batch(own, big_items[first : first + 100], named)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=rebuild), threading.Thread(target=write_big_meanwhile)]
    for thread in threads:
        thread.start()
    other_batches: list[tuple[float, float]] = []
    with psycopg.connect(settings.database_url) as own:
        for first in range(0, len(other_items), 100):  # until the rebuild is done, and the rest after it
            began = time.monotonic()
            write_batch(own, other_items[first : first + 100], named)
            other_batches.append((began, time.monotonic()))
            if rebuilt.is_set() and first >= 1_000:
                write_batch(own, other_items[first + 100 :], named)
                break
    for thread in threads:
        thread.join()
    assert not failures, failures
    began, ended = spans["rebuild"]
    during = [(b, e) for b, e in other_batches if b >= began and e <= ended]
    longest = max(e - b for b, e in other_batches)
    # the other tenant's batches kept committing while the rebuild ran, none waiting for it
    assert len(during) >= 3 and longest < (ended - began) / 2, (len(during), longest, ended - began)
    # every call counted once: the rebuild's, those written during it, and the other tenant's
    assert month_rollups(conn, big, "tag:project") == tag_sums(bulk + during_big)
    assert month_rollups(conn, other, "tag:project") == tag_sums(other_calls)


def tag_scope(conn: psycopg.Connection, tenant: str) -> tuple[str, datetime, datetime | None]:
    row = conn.execute(
        "SELECT state, rebuilt_at, stale_since FROM tokenmeter.tag_scopes WHERE tenant_id = %s AND tag_name = %s",
        (tenant, "project"),
    ).fetchone()
    conn.commit()
    assert row is not None
    return row[0], row[1], row[2]


def refresh_as_a_new_worker(settings: Settings, scopes: list[tuple[str, str, str]]) -> None:
    """What a starting stage 1 does for the budgets it reads back (``run_stage_one``), on new connections."""
    sinks = Sinks(settings)
    try:
        sinks.refresh_spend(scopes)
    finally:
        sinks.close()


def test_a_restart_does_not_rebuild_but_a_tag_named_again_after_a_gap_is_rebuilt(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    tenant = f"restart-{unique}"
    start = datetime(2025, 8, 1, tzinfo=UTC)
    book = PriceBook()
    calls = tagged_calls(tenant, 400, start, tenant)
    items = priced(book, calls)
    named = {(tenant, "project")}
    write_batch(conn, items[:200])  # before any budget names the tag
    scope = [(tenant, "tag:project", "apollo")]
    refresh_as_a_new_worker(settings, scope)  # its first budget: rebuilt
    state, rebuilt_at, stale_since = tag_scope(conn, tenant)
    assert state == "complete" and stale_since is None
    write_batch(conn, items[200:300], named)
    refresh_as_a_new_worker(settings, scope)  # a restarted worker reads the same budget back: nothing rebuilt
    assert tag_scope(conn, tenant) == (state, rebuilt_at, None)
    assert not ensure_tag_rollups(conn, tenant, "project")
    assert month_rollups(conn, tenant, "tag:project") == tag_sums(calls[:300])
    # the last budget goes: recorded stale before the batches stop counting the tag, which then miss calls
    mark_tag_scopes_stale(conn, named)
    state, _, stale_since = tag_scope(conn, tenant)
    assert state == "stale" and stale_since is not None
    write_batch(conn, items[300:])
    assert month_rollups(conn, tenant, "tag:project") == tag_sums(calls[:300])
    refresh_as_a_new_worker(settings, scope)  # named again: rebuilt, the gap's calls included
    state, again, stale_since = tag_scope(conn, tenant)
    assert state == "complete" and again > rebuilt_at and stale_since is None
    assert month_rollups(conn, tenant, "tag:project") == tag_sums(calls)


# ---------------------------------------------------------------- one reserve over the hierarchy
def own_redis(settings: Settings, db: int) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


def test_reserve_is_refused_by_the_tightest_of_tenant_team_user_and_api_key_budgets(
    stack: LocalStack, settings: Settings
) -> None:
    client = QuotaClient(own_redis(settings, 6))
    tenant = f"tight-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    end = period_end("month", period_start("month", now))
    now_ms = int(now.timestamp() * 1000)
    write_freshness(client.redis, freshness_key(client.settings.worker_id), "test-stage-1", now_ms, now_ms)
    # (dimension, value): (limit, spent, held by calls in flight) — as the worker and earlier calls left them
    levels = {
        ("tenant", ""): ("100", "40", "0"),
        ("team", "search"): ("20", "12", "2"),
        ("user", "u-1"): ("10", "6.5", "0"),
        ("api_key", "key-7"): ("8", "3", "2"),
    }
    for (dimension, value), (limit, spent, held) in levels.items():
        budget = Budget(tenant, dimension, value, "month", Decimal(limit), hard=True)
        client.redis.set(budget_key(tenant, dimension, value), budget.redis_json())
        client.redis.set(spend_key(tenant, dimension, value, "month"), format_spend(Decimal(spent), end, 5, "UTC"))
        if Decimal(held):
            entry = format_held(int(Decimal(held) * 10**9), now_ms + 600_000)
            client.redis.hset(held_key(tenant, dimension, value), "earlier-call", entry)
    room = {scope: Decimal(limit) - Decimal(spent) - Decimal(held) for scope, (limit, spent, held) in levels.items()}
    assert room == {("tenant", ""): 60, ("team", "search"): 6, ("user", "u-1"): Decimal("3.5"), ("api_key", "key-7"): 3}

    def reserve(amount: str, with_key: bool = True) -> Any:
        key = "key-7" if with_key else None
        return client.reserve(tenant, Decimal(amount), user_id="u-1", team="search", api_key=key, tokens=10)

    first = reserve("1")  # fits everywhere, and is held everywhere
    assert first.allowed and first.refused_by is None
    room = {scope: left - 1 for scope, left in room.items()}
    # whichever levels a call exceeds, the one with the least room is named: with the key, the key (the script
    # itself stops at the first level in order that refuses, the tenant for $70); without it, the user
    for amount, with_key in (("2.2", True), ("2.6", True), ("5.5", True), ("70", True), ("2.6", False), ("70", False)):
        refused = reserve(amount, with_key)
        applies = {scope: left for scope, left in room.items() if with_key or scope[0] != "api_key"}
        over = {scope: left for scope, left in applies.items() if left < Decimal(amount)}
        tightest = min(over, key=lambda scope: over[scope])
        assert not refused.allowed, amount
        assert (refused.refused_by["dimension"], refused.refused_by["value"]) == tightest, (amount, refused)
        assert refused.reason.startswith(f"hard budget of {refused.refused_by['label']} cannot take ${amount}")
        assert refused.as_json()["refused_by"] == refused.refused_by
    assert reserve("2").allowed  # $2 of room is left at the key: the refusals held nothing
    # check names the furthest-over exhausted budget too, once spend passes the limits
    client.redis.set(spend_key(tenant, "team", "search", "month"), format_spend(Decimal(21), end, 6, "UTC"))
    client.redis.set(spend_key(tenant, "api_key", "key-7", "month"), format_spend(Decimal(11), end, 6, "UTC"))
    decision = client.check(tenant, user_id="u-1", team="search", api_key="key-7")
    assert not decision.allowed and decision.refused_by is not None
    assert decision.refused_by["label"] == f"{tenant}/api_key=key-7" and decision.remaining == Decimal(-3)
    assert client.check(tenant, user_id="u-1").allowed  # the tenant and the user alone still have room


def test_rate_limits_at_a_tag_and_a_key_count_every_reservation_and_name_the_scope(
    stack: LocalStack, settings: Settings
) -> None:
    client = QuotaClient(own_redis(settings, 7))
    tenant = f"rates-{uuid.uuid4().hex[:6]}"
    limits = [
        RateLimit(tenant, "tag:project", "apollo", calls_per_minute=3),
        RateLimit(tenant, "api_key", "key-7", tokens_per_minute=1_000),
    ]
    for limit in limits:
        client.redis.set(rate_limit_key(tenant, limit.dimension, limit.value), limit.redis_json())
    apollo = {"project": "apollo", "run": "r1"}
    outcomes = [client.reserve(tenant, Decimal(0), tags=apollo, tokens=100) for _ in range(4)]
    assert [r.allowed for r in outcomes] == [True, True, True, False]  # the tag's 3 calls a minute
    assert outcomes[-1].refused_by == {
        "tenant_id": tenant,
        "dimension": "tag:project",
        "value": "apollo",
        "label": f"{tenant}/tag:project=apollo",
    }
    assert client.reserve(tenant, Decimal(0), tags={"project": "gemini"}, tokens=100).allowed  # another value
    by_key = [client.reserve(tenant, Decimal(0), api_key="key-7", tokens=400) for _ in range(3)]
    assert [r.allowed for r in by_key] == [True, True, False]  # 1,000 tokens a minute
    assert by_key[-1].refused_by is not None and by_key[-1].refused_by["dimension"] == "api_key"
    assert "tokens per minute is 1000 (800 used)" in by_key[-1].reason
    decision = client.check(tenant, api_key="key-7", tags=apollo)
    assert not decision.allowed and decision.refused_by is not None
    assert decision.refused_by["dimension"] == "tag:project"  # the first limit reached, in scope order


# ---------------------------------------------------------------- the worker
@pytest.fixture(scope="module")
def running(stack: LocalStack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with worker_running(settings, tmp_path_factory.mktemp("worker")) as (own, worker):
        with UsageProducer(own.model_copy(update={"spool_dir": tmp_path_factory.mktemp("spool")})) as producer:
            producer.record(call("warm-up", {}, datetime.now(UTC)))
        assert wait_for_sinks(own, timeout=120), worker.output()
        yield own


def call(tenant: str, attribution: dict[str, Any], when: datetime, model: str = "gpt-4o") -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "timestamp": when,
        "tenant_id": tenant,
        "provider": "openai",
        "model": model,
        "input_tokens": 2_000,
        "output_tokens": 300,
        **attribution,
    }


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "deploy", *args], env=env_for(settings), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_the_worker_counts_every_level_so_thresholds_alert_and_hard_budgets_block(
    running: Settings, tmp_path: Path
) -> None:
    tenant = f"levels-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    main = {"team_id": "search", "api_key_id": "key-1", "tags": {"project": "apollo", "run": "a"}}
    other = {"team_id": "ads", "api_key_id": "key-2", "tags": {"project": "gemini", "run": "b"}}
    before = [call(tenant, main, now - timedelta(seconds=i)) for i in range(4)]
    with UsageProducer(running.model_copy(update={"spool_dir": tmp_path / "before"})) as producer:
        for event in before:
            producer.record(event)
    assert wait_for_sinks(running, timeout=60)
    # one gpt-4o call of main costs $0.008: 2,000 in at $2.50/M, 300 out at $10/M
    assert price(before[0]) == Decimal("0.008")
    cli(running, "budget", "set", "--tenant", tenant, "--team", "search", "--limit", "0.1")
    cli(running, "budget", "set", "--tenant", tenant, "--api-key", "key-1", "--limit", "0.05", "--hard")
    cli(running, "budget", "set", "--tenant", tenant, "--tag", "project=apollo", "--limit", "1", "--hard")
    cli(running, "budget", "set", "--tenant", tenant, "--model", "openai/gpt-4o-mini", "--limit", "10")
    client = QuotaClient(running)
    budgeted = [("team", "search"), ("api_key", "key-1"), ("tag:project", "apollo"), ("model", "openai/gpt-4o-mini")]
    wait_until(lambda: all(client.redis.exists(budget_key(tenant, d, v)) for d, v in budgeted), "budgets not applied")

    def redis_spend(dimension: str, value: str) -> Decimal:
        return spend_value(client.redis.get(spend_key(tenant, dimension, value, "month")), datetime.now(UTC))

    # the tag's spend before its budget existed is counted too (rebuilt from the ledger)
    wait_until(lambda: redis_spend("tag:project", "apollo") == Decimal("0.032"), "tag spend not rebuilt")
    after = [call(tenant, main, now + timedelta(milliseconds=i)) for i in range(4)]
    after += [call(tenant, other, now + timedelta(milliseconds=i), "gpt-4o-mini") for i in range(3)]
    with UsageProducer(running.model_copy(update={"spool_dir": tmp_path / "after"})) as producer:
        for event in after:
            producer.record(event)
    assert wait_for_sinks(running, timeout=60)
    events = before + after
    with psycopg.connect(running.database_url) as conn:
        for dimension, value_of in LEVELS.items():
            expected = sums(events, value_of)
            assert month_rollups(conn, tenant, dimension) == expected, dimension
            for value, cost in expected.items():
                if (dimension, value) in budgeted:  # the quota check's copy in Redis says the same
                    wait_until(lambda d=dimension, v=value, c=cost: redis_spend(d, v) == c, f"{dimension}={value}", 5)
                elif dimension != "tag:project":  # unnamed models, teams and keys are not mirrored at all
                    assert not client.redis.exists(spend_key(tenant, dimension, value, "month")), (dimension, value)
        assert month_rollups(conn, tenant, "tag:run") == {}
    # key-1 spent 8 x $0.008 = $0.064 of its hard $0.05: blocked, and named whatever else the call names
    decision = client.check(tenant, team="search", api_key="key-1", tags={"project": "apollo", "run": "a"})
    assert not decision.allowed and decision.refused_by is not None, decision
    assert (decision.refused_by["dimension"], decision.refused_by["value"]) == ("api_key", "key-1")
    refused = client.reserve(tenant, Decimal("0.001"), team="search", api_key="key-1", tags={"project": "apollo"})
    assert not refused.allowed and refused.refused_by is not None and refused.refused_by["dimension"] == "api_key"
    assert client.check(tenant, team="ads", api_key="key-2", model="openai/gpt-4o-mini").allowed
    shown = json.loads(cli(running, "quota", "check", "--tenant", tenant, "--api-key", "key-1", "--format", "json"))
    assert shown["allowed"] is False and shown["refused_by"]["label"] == f"{tenant}/api_key=key-1"

    def fired() -> list[tuple[str, str, int, str]]:
        alerts = json.loads(cli(running, "alerts", "list", "--tenant", tenant, "--format", "json"))
        return sorted(
            (a["scope"]["dimension"], a["scope"]["value"], a["threshold_percent"], a["kind"])
            for a in alerts
            if a["kind"].startswith("budget")
        )

    # team search: $0.064 of $0.10 = 64 %; key-1: 128 % of a hard budget; apollo: 6.4 %; gpt-4o-mini: far below
    expected_alerts = [
        ("api_key", "key-1", 50, "budget.threshold"),
        ("api_key", "key-1", 80, "budget.threshold"),
        ("api_key", "key-1", 100, "budget.blocked"),
        ("team", "search", 50, "budget.threshold"),
    ]
    wait_until(lambda: fired() == expected_alerts, f"budget alerts: {fired()}", 30)
    # the tag's rollups are recorded complete; once its only budget goes they are recorded stale (a budget
    # naming the tag later rebuilds them), and no worker start rebuilt them meanwhile
    with psycopg.connect(running.database_url) as conn:
        state, rebuilt_at, _ = tag_scope(conn, tenant)
        assert state == "complete"
        cli(running, "budget", "delete", "--tenant", tenant, "--tag", "project=apollo")
        wait_until(lambda: tag_scope(conn, tenant)[0] == "stale", "tag scope not marked stale", 30)
        assert tag_scope(conn, tenant)[1] == rebuilt_at
