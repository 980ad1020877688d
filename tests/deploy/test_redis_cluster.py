"""Everything that talks to Redis, against a real local Redis Cluster of three masters
(``tests/redis_cluster.py``, ``TOKENMETER_REDIS_CLUSTER=true``): quota checks and reservations answer as on
a single node, the sink's spend and freshness land whatever slot a tenant hashes to, the dashboard finds
keys on every primary, and a worker keeps each tenant's spend equal to its Postgres rollups."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from confluent_kafka import Producer

from deploy.dashboard import budgets, tenant_spend
from deploy.isolation import WorkerProcess, isolated
from deploy.settings import Settings, redis_client
from deploy.stack import LocalStack
from producers.quota import QuotaClient, QuotaDecision
from schemas.periods import period_start
from schemas.records import Rollup
from schemas.redis_keys import budget_key, escape_part, freshness_key, rate_limit_key, spend_key, spend_value
from sinks import redis as redis_sink
from sinks.redis import prune_freshness, spend_writes, write_freshness, write_spend
from streams.budgets import Budget, RateLimit
from streams.lag import wait_for_sinks
from tests.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.integration

HOSTILE = "}{evil:%7D{"  # would break the hash tag if braces were not escaped


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRedisCluster]:
    local = LocalRedisCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
def on_cluster(cluster: LocalRedisCluster, settings: Settings) -> Settings:
    cluster.flush()
    return settings.model_copy(
        update={"redis_url": cluster.url, "redis_cluster": True, "worker_id": f"w{uuid.uuid4().hex[:8]}"}
    )


@pytest.fixture
def single_node(stack: LocalStack, settings: Settings) -> Settings:
    url = settings.redis_url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url, "worker_id": f"w{uuid.uuid4().hex[:8]}"})


def rollup(tenant: str, granularity: str, start: datetime, dimension: str, value: str, calls: int, cost: str) -> Rollup:
    zero = Decimal(0)
    return Rollup(tenant, granularity, start, dimension, value, calls, 0, 1, 1, 0, 0, zero, zero, Decimal(cost), "UTC")


def decision(d: QuotaDecision) -> dict[str, Any]:
    answer = d.as_json()
    answer.pop("data_age_s")  # measured on the clock: differs between two runs
    return answer


def quota_story(settings: Settings, tenant: str, now: datetime) -> list[Any]:
    """What the worker writes, then checks and reservations of a service: budgets, held amounts, rate
    limits and stale data. Returns every answer."""
    sink = redis_client(settings)
    client = QuotaClient(settings)
    month, day = period_start("month", now), period_start("day", now)
    write_spend(
        sink,
        [
            rollup(tenant, "month", month, "tenant", "", 40, "9.5"),
            rollup(tenant, "day", day, "tenant", "", 4, "1.25"),
            rollup(tenant, "day", day, "feature", "chat", 3, "4.5"),
        ],
        now,
    )
    now_ms = int(now.timestamp() * 1000)
    freshness = freshness_key(settings.worker_id)
    write_freshness(sink, freshness, "stage-1", now_ms - 500, now_ms)
    sink.set(
        budget_key(tenant, "tenant", ""), Budget(tenant, "tenant", "", "month", Decimal(10), hard=True).redis_json()
    )
    sink.set(budget_key(tenant, "feature", "chat"), Budget(tenant, "feature", "chat", "day", Decimal(5)).redis_json())
    sink.set(rate_limit_key(tenant, "user", "u1"), RateLimit(tenant, "user", "u1", calls_per_minute=3).redis_json())
    answers: list[Any] = [
        decision(client.check(tenant, now=now)),
        decision(client.check(tenant, "chat", "u1", now=now)),
    ]

    def reserve(amount: str, user: str = "u1") -> Any:
        made = client.reserve(tenant, Decimal(amount), "chat", user, tokens=100, now=now)
        answers.append((made.allowed, made.reason, len(made.keys)))
        return made

    first = reserve("0.3")
    reserve("0.3")  # 9.5 spent + 0.3 held + 0.3 > 10
    client.release(first)
    third = reserve("0.3")
    client.commit(third, Decimal("0.25"), settle_s=60)
    reserve("0.2")  # 9.5 + 0.25 committed + 0.2
    reserve("0.01")  # the user's third call this minute
    answers.append(decision(client.check(tenant, "chat", "u1", now=now)))
    # The pipeline counts the committed call: spend takes it over from the held amount.
    write_spend(sink, [rollup(tenant, "month", month, "tenant", "", 41, "9.75")], now)
    write_freshness(sink, freshness, "stage-1", now_ms + 600_000, now_ms)  # past the commit's settle time
    reserve("0.2", user="u2")  # 9.75 + 0.2 still held + 0.2
    reserve("0.05", user="u2")
    # Spend data ten minutes old under a hard budget that blocks then.
    hard_blocking = Budget(tenant, "tenant", "", "month", Decimal(10), hard=True, on_stale="block")
    sink.set(budget_key(tenant, "tenant", ""), hard_blocking.redis_json())
    write_freshness(sink, freshness, "stage-1", now_ms - 600_000, now_ms)
    reserve("0.01", user="u3")
    answers.append(decision(client.check(tenant, now=now)))
    sink.delete(freshness)  # no worker has ever reported
    answers.append(decision(client.check(tenant, now=now)))
    reserve("0.01", user="u3")
    return answers


@pytest.mark.parametrize("name", ["acme", HOSTILE])
def test_quota_answers_on_the_cluster_are_those_of_a_single_node(
    single_node: Settings, on_cluster: Settings, name: str
) -> None:
    tenant = f"{name}-{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    expected = quota_story(single_node, tenant, now)
    assert quota_story(on_cluster, tenant, now) == expected
    allowed = [answer[0] for answer in expected if isinstance(answer, tuple)]
    assert allowed == [True, False, True, True, False, False, True, False, False]
    assert "calls per minute is 3" in expected[6][1] and expected[7]["reason"].startswith("rate limit of")
    assert "$9.75 spent and $0.2 held" in expected[8][1]
    assert "stale" in expected[10][1] and not expected[11]["allowed"] and expected[11]["stale"]
    cluster = redis_client(on_cluster)
    assert isinstance(cluster, redis.RedisCluster)
    keys = list(cluster.scan_iter(match=f"tm:{{{escape_part(tenant)}}}:*"))
    assert len(keys) > 10 and len({cluster.keyslot(key) for key in keys}) == 1  # one tenant, one slot


def test_spend_of_many_tenants_is_written_slot_by_slot(on_cluster: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    client = redis_client(on_cluster)
    assert isinstance(client, redis.RedisCluster)
    now = datetime.now(UTC)
    month, week, day = (period_start(p, now) for p in ("month", "week", "day"))
    tenants = [f"t{i}" for i in range(200)] + [HOSTILE, "{t1}", "t1}"]

    def rollups(calls: int, cost: str) -> list[Rollup]:
        return [
            rollup(t, granularity, start, dimension, value, calls, cost)
            for t in tenants
            for granularity, start in (("month", month), ("week", week), ("day", day))
            for dimension, value in (("tenant", ""), ("feature", "f}{"))
        ]

    monkeypatch.setattr(redis_sink, "_CHUNK", 4)  # several script calls per slot, too
    newer = spend_writes(rollups(5, "2.5"), now)
    assert write_spend(client, rollups(5, "2.5"), now) == len(newer) == len(tenants) * 6
    assert len({client.get_node_from_key(key).name for key in newer}) == 3  # the tenants spread over every node
    keys = list(newer)
    assert client.mget_nonatomic(keys) == [newer[key][0].encode() for key in keys]
    write_spend(client, rollups(4, "9"), now)  # an older batch, late: nothing changes
    assert client.mget_nonatomic(keys) == [newer[key][0].encode() for key in keys]
    write_spend(client, [], now, forget=keys[:100])  # keys of many slots, deleted
    assert client.exists(*keys[:100]) == 0 and client.exists(*keys[100:]) == len(keys) - 100


def test_freshness_and_the_dashboard_on_the_cluster(on_cluster: Settings) -> None:
    client = redis_client(on_cluster)
    now = datetime.now(UTC)
    now_ms = int(now.timestamp() * 1000)
    key = freshness_key(on_cluster.worker_id)
    write_freshness(client, key, "alive", now_ms - 2_000, now_ms)
    write_freshness(client, key, "gone", now_ms - 9_000_000, now_ms - 7_200_000)
    prune_freshness(client, key, now_ms)
    assert set(client.hgetall(key)) == {b"alive"}
    assert 1.5 < (QuotaClient(on_cluster).check("acme", now=now).data_age_s or 0) < 3
    tenants = [f"dash{i}" for i in range(30)] + [HOSTILE]
    write_spend(client, [rollup(t, "month", period_start("month", now), "tenant", "", 2, "3.5") for t in tenants], now)
    client.set(
        budget_key(HOSTILE, "tenant", ""), Budget(HOSTILE, "tenant", "", "month", Decimal(7), hard=True).redis_json()
    )
    client.set("tm:spend:olduntagged:tenant::month", "99 99999999999999")  # the layout before: not read
    shown = tenant_spend(client, now)
    assert {row["tenant_id"] for row in shown} == set(tenants)
    assert all(row["month"]["exact"] == "3.5" for row in shown)
    [budget] = budgets(client, now)
    assert (budget["tenant_id"], budget["percent"], budget["spent"]["exact"]) == (HOSTILE, "50.0", "3.5")


def test_the_worker_keeps_spend_on_the_cluster_equal_to_postgres(
    stack: LocalStack, settings: Settings, cluster: LocalRedisCluster, tmp_path: Path
) -> None:
    cluster.flush()
    unique = uuid.uuid4().hex[:8]
    own = isolated(settings, unique, redis_url=cluster.url, redis_cluster=True)
    tenants = [f"cl-{unique}-{i}" for i in range(5)] + [f"{HOSTILE}{unique}"]
    budget = Budget(tenants[0], "tenant", "", "month", Decimal(1000), hard=True)
    producer = Producer({"bootstrap.servers": own.kafka_bootstrap})
    producer.produce(own.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        now = datetime.now(UTC)
        for i in range(300):  # keyless JSON: one tenant's events spread over every partition
            event = {
                "event_id": f"{unique}-{i}",
                "tenant_id": tenants[i % len(tenants)],
                "provider": "openai",
                "model": "gpt-4o",
                "timestamp": (now - timedelta(seconds=i % 50)).isoformat(),
                "input_tokens": 1000 + i,
                "output_tokens": 50 + i,
                "feature": f"f{i % 3}",
            }
            producer.produce(own.topic_raw, value=json.dumps(event).encode())
        assert producer.flush(30) == 0
        assert wait_for_sinks(own, timeout=180), worker.output()
        client = redis_client(own)
        quota = QuotaClient(own)
        with psycopg.connect(own.database_url) as conn:
            for tenant in tenants:
                row = conn.execute(
                    "SELECT cost FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = 'month'"
                    " AND dimension = 'tenant' AND window_start = %s",
                    (tenant, period_start("month", datetime.now(UTC))),
                ).fetchone()
                assert row is not None and row[0] > 0, tenant
                assert spend_value(client.get(spend_key(tenant, "tenant", "", "month")), datetime.now(UTC)) == row[0]
                assert quota.check(tenant).spent == row[0]
        deadline = time.monotonic() + 60  # the budget follower runs beside stage 1
        while quota.check(tenants[0]).limit is None:
            assert time.monotonic() < deadline and worker.alive(), worker.output()
            time.sleep(0.2)
        answer = quota.check(tenants[0])
        assert answer.allowed and not answer.stale and answer.limit == 1000
        assert worker.alive(), worker.output()
    finally:
        worker.stop()
