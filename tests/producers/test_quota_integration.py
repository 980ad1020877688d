"""QuotaClient against the real Redis: reservations keep concurrent callers within a hard budget."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import redis

from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.quota import QuotaClient
from schemas.periods import period_end, period_start
from schemas.records import Rollup
from schemas.redis_keys import budget_key, freshness_key, rate_limit_key, spend_key
from sinks.redis import write_freshness, write_spend
from streams.pricing import estimate_cost


def nearly_spent(client: QuotaClient, tenant: str) -> None:
    """A $10 hard monthly budget with $9.90 spent, as the worker would have written it."""
    now = datetime.now(UTC)
    client.redis.set(budget_key(tenant, "tenant", ""), json.dumps({"limit": "10", "period": "month", "hard": True}))
    end = period_end("month", period_start("month", now))
    client.redis.set(spend_key(tenant, "tenant", "", "month"), f"9.900000000000 {int(end.timestamp() * 1000)}", ex=3600)


def in_parallel(count: int, call: object) -> list[object]:
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def own_redis(settings: Settings, db: int) -> Settings:
    """A Redis database of its own (emptied): no worker of another test reports freshness into it."""
    url = settings.redis_url.rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return settings.model_copy(update={"redis_url": url})


def pipeline_caught_up(client: QuotaClient, behind_s: float = 0.0) -> None:
    """Write what a stage-1 process writes after a batch: the spend is complete up to now - behind_s."""
    now_ms = int(time.time() * 1000)
    key = freshness_key(client.settings.worker_id)
    write_freshness(client.redis, key, "test-stage-1", now_ms - int(behind_s * 1000), now_ms)


def test_fifty_concurrent_reservers_overrun_by_at_most_what_is_in_flight(stack: LocalStack, settings: Settings) -> None:
    tenant = f"reserve-{uuid.uuid4().hex[:8]}"
    settings = own_redis(settings, 12)
    clients = [QuotaClient(settings, redis.Redis.from_url(settings.redis_url)) for _ in range(50)]
    nearly_spent(clients[0], tenant)
    # check-then-call: every caller sees $0.10 left and goes ahead — $2.40 over a $10 budget
    naive = in_parallel(50, lambda: clients[0].check(tenant).allowed)
    assert all(naive)
    # reserve-then-call: the script lets through only what fits
    it = iter(clients)
    lock = threading.Lock()

    def reserve_one() -> object:
        with lock:
            client = next(it)
        return client.reserve(tenant, Decimal("0.05"))

    reservations = in_parallel(50, reserve_one)
    allowed = [r for r in reservations if r.allowed]  # type: ignore[attr-defined]
    assert len(allowed) == 2, [r.reason for r in reservations][:3]  # type: ignore[attr-defined]
    refused = next(r for r in reservations if not r.allowed)  # type: ignore[attr-defined]
    assert "$9.9 spent and $0.1 held" in refused.reason  # type: ignore[attr-defined]
    client = clients[0]
    client.release(allowed[0])  # type: ignore[arg-type]
    again = client.reserve(tenant, Decimal("0.05"))
    assert again.allowed
    pipeline_caught_up(client)
    client.commit(again, Decimal("0.01"), settle_s=0.3)  # the call cost less than estimated
    assert client.reserve(tenant, Decimal("0.05")).allowed is False  # 9.90 + 0.05 + 0.01 + 0.05 > 10
    time.sleep(0.5)
    assert client.reserve(tenant, Decimal("0.05")).allowed is False  # time alone does not free it
    pipeline_caught_up(client)  # the pipeline has counted everything produced until now (here: nothing)
    assert client.reserve(tenant, Decimal("0.05")).allowed


def hard_budget(client: QuotaClient, tenant: str, on_stale: str, spent: str = "9.9") -> None:
    now = datetime.now(UTC)
    budget = {"limit": "10", "period": "month", "hard": True, "on_stale": on_stale}
    client.redis.set(budget_key(tenant, "tenant", ""), json.dumps(budget))
    end = period_end("month", period_start("month", now))
    client.redis.set(spend_key(tenant, "tenant", "", "month"), f"{spent} {int(end.timestamp() * 1000)}", ex=3600)


def test_stale_spend_data_follows_each_hard_budgets_policy(stack: LocalStack, settings: Settings) -> None:
    """DESIGN §4.7: the answer says how old the spend is; hard budgets follow on_stale when it is stale."""
    client = QuotaClient(own_redis(settings, 11).model_copy(update={"quota_stale_after_s": 10.0}))
    for policy in ("allow", "allow_reserved", "block"):
        hard_budget(client, f"stale-{policy}", policy, spent="1")
    pipeline_caught_up(client, behind_s=1.0)
    fresh = {policy: client.check(f"stale-{policy}") for policy in ("allow", "allow_reserved", "block")}
    assert all(d.allowed and not d.stale and 0.9 < (d.data_age_s or 0) < 5 for d in fresh.values()), fresh
    pipeline_caught_up(client, behind_s=61.0)  # e.g. Postgres down for a minute: stage 1 holds its batches
    stale = {policy: client.check(f"stale-{policy}") for policy in ("allow", "allow_reserved", "block")}
    assert all(d.stale and 60 < (d.data_age_s or 0) < 65 for d in stale.values())
    assert stale["allow"].allowed
    assert not stale["allow_reserved"].allowed and "only reserved calls" in stale["allow_reserved"].reason
    assert not stale["block"].allowed and "blocks while its spend data is stale" in stale["block"].reason
    assert client.reserve("stale-allow", Decimal("0.01")).allowed
    assert client.reserve("stale-allow_reserved", Decimal("0.01")).allowed
    refused = client.reserve("stale-block", Decimal("0.01"))
    assert not refused.allowed and "stale" in refused.reason and "61s old" in refused.reason
    client.redis.delete(freshness_key(client.settings.worker_id))  # no worker ever reported: as stale as it gets
    unknown = client.check("stale-block")
    assert unknown.stale and unknown.data_age_s is None and not unknown.allowed


def test_committed_costs_stay_held_through_an_outage_until_the_pipeline_counts_them(
    stack: LocalStack, settings: Settings
) -> None:
    """allow_reserved under a long outage: spend in Redis stops moving, but what each call cost stays
    held, so reservations still cannot overrun the budget."""
    client = QuotaClient(own_redis(settings, 10))
    tenant = "outage"
    hard_budget(client, tenant, "allow_reserved", spent="9.0")
    pipeline_caught_up(client, behind_s=120.0)  # the pipeline stopped counting two minutes ago
    made = 0
    while True:
        reservation = client.reserve(tenant, Decimal("0.30"))
        if not reservation.allowed:
            break
        client.commit(reservation, Decimal("0.25"), settle_s=0)  # each call cost $0.25
        made += 1
    assert made == 3  # 9.00 + 3 × 0.25 = 9.75; a fourth reservation of 0.30 would pass 10
    assert "$0.75 held" in reservation.reason
    time.sleep(1.0)
    assert not client.reserve(tenant, Decimal("0.30")).allowed  # still held: nothing has counted them yet


def test_pre_call_estimate_uses_todays_price() -> None:
    assert estimate_cost("openai", "gpt-4o", 1000, max_output_tokens=100) == Decimal("0.0035")
    assert estimate_cost("acme-ai", "mystery", 10) is None


def test_rate_limits_count_reservations_across_clients(stack: LocalStack, settings: Settings) -> None:
    tenant = f"rate-{uuid.uuid4().hex[:8]}"
    first, second = QuotaClient(settings), QuotaClient(settings)  # two service replicas
    limits = {"calls_per_minute": 3, "tokens_per_minute": 10_000, "calls_per_day": None}
    first.redis.set(rate_limit_key(tenant, "feature", "chat"), json.dumps(limits))
    now = datetime.now(UTC).replace(second=5)
    made = [c.reserve(tenant, Decimal(0), feature="chat", tokens=1000, now=now) for c in (first, second, first)]
    assert all(r.allowed for r in made)
    refused = second.reserve(tenant, Decimal(0), feature="chat", tokens=1000, now=now)
    assert not refused.allowed and "calls per minute is 3" in refused.reason
    check = first.check(tenant, feature="chat", now=now)
    assert not check.allowed and "rate limit" in check.reason
    assert first.check(tenant, feature="search", now=now).allowed  # other features are not limited
    later = now + timedelta(minutes=1)
    big = first.reserve(tenant, Decimal(0), feature="chat", tokens=20_000, now=later)
    assert not big.allowed and "tokens per minute" in big.reason
    assert first.reserve(tenant, Decimal(0), feature="chat", tokens=5_000, now=later).allowed


def test_a_late_spend_write_cannot_unblock_a_spent_hard_budget(stack: LocalStack, settings: Settings) -> None:
    """Two stage-1 writers of one tenant: the batch that reached $10.20 lands first, an older one ($9.80)
    after it. Check and reserve keep deciding on the newer total."""
    client = QuotaClient(own_redis(settings, 13))
    tenant = f"late-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    month = period_start("month", now)
    client.redis.set(budget_key(tenant, "tenant", ""), json.dumps({"limit": "10", "period": "month", "hard": True}))
    pipeline_caught_up(client)

    def written_by_a_batch(calls: int, cost: str) -> Rollup:
        zero = Decimal(0)
        return Rollup(tenant, "month", month, "tenant", "", calls, 0, 1, 1, 0, 0, zero, zero, Decimal(cost), "UTC")

    write_spend(client.redis, [written_by_a_batch(102, "10.2")], now)
    write_spend(client.redis, [written_by_a_batch(98, "9.8")], now)
    decision = client.check(tenant, now=now)
    assert not decision.allowed and decision.spent == Decimal("10.2")
    assert not client.reserve(tenant, Decimal("0.01"), now=now).allowed
