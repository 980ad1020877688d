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
from producers.quota import QuotaClient, budget_key, estimate_cost, rate_limit_key
from sinks.redis import spend_key
from streams.periods import period_end, period_start


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


def test_fifty_concurrent_reservers_overrun_by_at_most_what_is_in_flight(stack: LocalStack, settings: Settings) -> None:
    tenant = f"reserve-{uuid.uuid4().hex[:8]}"
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
    client.commit(again, Decimal("0.01"), settle_s=0.3)  # the call cost less than estimated
    assert client.reserve(tenant, Decimal("0.05")).allowed is False  # 9.90 + 0.05 + 0.01 + 0.05 > 10
    time.sleep(0.4)  # settled: the pipeline has counted it (here: nobody did, so it is gone)
    assert client.reserve(tenant, Decimal("0.05")).allowed


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
