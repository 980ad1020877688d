"""QuotaClient against the real Redis with a prepaid balance: reservations keep concurrent callers
within the balance, and a call's cost stays held until the balance has counted it."""

from __future__ import annotations

import json
import queue
import time
import uuid
from decimal import Decimal

import pytest
import redis

from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.quota import QuotaClient, Reservation
from schemas.redis_keys import budget_key, freshness_key, spend_key
from sinks.credits import mirror_balance
from sinks.redis import write_freshness
from tests.deploy.test_redis_cluster import cluster  # noqa: F401  (the module-scoped cluster fixture)
from tests.producers.test_quota_integration import in_parallel, own_redis, pipeline_caught_up
from tests.redis_cluster import LocalRedisCluster


def worker_mirrors(client: QuotaClient, tenant: str, balance: str) -> None:
    """What the worker writes after deriving the balance from Postgres: counted up to now."""
    assert mirror_balance(client.redis, tenant, Decimal(balance), int(time.time() * 1000))


def test_fifty_concurrent_reservers_overdraw_a_prepaid_balance_by_at_most_what_they_reserved(
    stack: LocalStack, settings: Settings
) -> None:
    tenant = f"prepaid-{uuid.uuid4().hex[:8]}"
    settings = own_redis(settings, 14)
    clients = [QuotaClient(settings, redis.Redis.from_url(settings.redis_url)) for _ in range(50)]
    pipeline_caught_up(clients[0])
    worker_mirrors(clients[0], tenant, "1.00")
    # check-then-call: every caller sees $1.00 and goes ahead — $2.50 spent of a $1.00 balance
    naive = in_parallel(50, lambda: clients[0].check(tenant))
    assert all(d.allowed and d.credit_balance == Decimal(1) for d in naive)  # type: ignore[attr-defined]
    pool: queue.SimpleQueue[QuotaClient] = queue.SimpleQueue()  # a client (connection) per caller
    for each in clients:
        pool.put(each)
    reservations: list[Reservation] = in_parallel(50, lambda: pool.get().reserve(tenant, Decimal("0.05")))  # type: ignore[assignment]
    allowed = [r for r in reservations if r.allowed]
    assert len(allowed) == 20, [r.reason for r in reservations][:3]  # $1.00 / $0.05, not one more
    assert sum((r.amount for r in allowed), Decimal(0)) <= Decimal("1.00")
    refused = next(r for r in reservations if not r.allowed)
    assert f"prepaid balance of {tenant} cannot take $0.05: $1 left and $1 held" in refused.reason

    client = clients[0]
    for reservation in allowed:  # each call cost $0.04: $0.80 spent, held until the balance counts it
        client.commit(reservation, Decimal("0.04"), settle_s=0.2)
    time.sleep(0.3)
    pipeline_caught_up(client)  # the spend has counted the calls, but the balance not yet
    assert not client.reserve(tenant, Decimal("0.21")).allowed  # 0.80 still held against $1.00
    worker_mirrors(client, tenant, "0.20")  # the worker derived $1.00 - $0.80, counted up to now
    assert not client.reserve(tenant, Decimal("0.21")).allowed
    last = client.reserve(tenant, Decimal("0.20"))
    assert last.allowed  # the held $0.80 was released: the balance has it now
    client.release(last)


def test_check_reports_the_balance_and_says_no_once_it_is_used_up(stack: LocalStack, settings: Settings) -> None:
    client = QuotaClient(own_redis(settings, 15))
    pipeline_caught_up(client)
    postpaid = client.check("postpaid-tenant")
    assert postpaid.allowed and postpaid.credit_balance is None and postpaid.as_json()["prepaid"] is False
    worker_mirrors(client, "wallet", "0.000000001")
    left = client.check("wallet")
    assert left.allowed and left.as_json()["credit_balance"] == "0.000000001" and left.as_json()["prepaid"] is True
    assert not client.reserve("wallet", Decimal("0.000000002")).allowed
    worker_mirrors(client, "wallet", "0")
    spent = client.check("wallet")
    assert not spent.allowed and "prepaid balance of wallet is used up" in spent.reason
    assert spent.refused_by is not None and spent.refused_by["dimension"] == "tenant"
    assert not client.reserve("wallet", Decimal("0.000000001")).allowed
    assert not client.reserve("wallet", Decimal(0)).allowed  # used up: a $0 estimate is refused too, as check says


def test_a_hard_budget_and_the_balance_are_checked_in_one_script(stack: LocalStack, settings: Settings) -> None:
    """Whichever is tighter refuses; a refused call holds nothing anywhere."""
    client = QuotaClient(own_redis(settings, 15))
    pipeline_caught_up(client)
    tenant = f"both-{uuid.uuid4().hex[:6]}"
    client.redis.set(budget_key(tenant, "tenant", ""), json.dumps({"limit": "0.5", "period": "month", "hard": True}))
    worker_mirrors(client, tenant, "0.3")
    first = client.reserve(tenant, Decimal("0.2"), feature="search")
    assert first.allowed
    by_credit = client.reserve(tenant, Decimal("0.2"), feature="search")
    assert not by_credit.allowed and "prepaid balance" in by_credit.reason
    worker_mirrors(client, tenant, "5")
    by_budget = client.reserve(tenant, Decimal("0.31"), feature="search")
    assert not by_budget.allowed and "hard budget" in by_budget.reason
    assert client.reserve(tenant, Decimal("0.3"), feature="search").allowed  # 0.2 + 0.3 fits both


@pytest.mark.parametrize("tenant", ["wallet", "}{evil:%7D{"])
def test_the_balance_is_checked_in_the_tenants_slot_on_a_cluster(
    stack: LocalStack,
    settings: Settings,
    cluster: LocalRedisCluster,  # noqa: F811  (the fixture imported above)
    tenant: str,
) -> None:
    """The credits key shares the tenant's hash slot with its other keys: one script, one node."""
    cluster.flush()
    on_cluster = settings.model_copy(update={"redis_url": cluster.url, "redis_cluster": True, "worker_id": "wc"})
    client = QuotaClient(on_cluster)
    now_ms = int(time.time() * 1000)
    write_freshness(client.redis, freshness_key("wc"), "stage-1", now_ms, now_ms)
    assert mirror_balance(client.redis, tenant, Decimal("0.10"), now_ms)
    assert not mirror_balance(client.redis, tenant, Decimal("5"), now_ms - 1)  # an older balance never wins
    assert client.check(tenant, "chat").credit_balance == Decimal("0.1")
    made = [client.reserve(tenant, Decimal("0.03"), "chat") for _ in range(4)]
    assert [r.allowed for r in made] == [True, True, True, False]
    assert "$0.1 left and $0.09 held" in made[3].reason
    client.release(made[0])
    assert client.reserve(tenant, Decimal("0.03"), "chat").allowed


def test_a_cost_the_spend_counted_is_not_held_again_by_budgets_while_the_balance_lags(
    stack: LocalStack, settings: Settings
) -> None:
    """A committed cost stays held for the balance until the balance has counted it, but a hard budget of a
    prepaid tenant's feature reads the spend, which already has it: held there too, it would count twice."""
    client = QuotaClient(own_redis(settings, 15))
    tenant = f"lag-{uuid.uuid4().hex[:6]}"
    client.redis.set(
        budget_key(tenant, "feature", "search"), json.dumps({"limit": "1", "period": "month", "hard": True})
    )
    pipeline_caught_up(client)
    worker_mirrors(client, tenant, "10")  # counted up to now
    call = client.reserve(tenant, Decimal("0.8"), feature="search")
    assert call.allowed
    client.commit(call, Decimal("0.8"), settle_s=0.1)
    time.sleep(0.3)
    # The pipeline has counted the call ($0.80 of the feature's month), the balance not yet (mirror unchanged).
    far = int(time.time() * 1000) + 86_400_000
    client.redis.set(spend_key(tenant, "feature", "search", "month"), f"0.8 {far} 1 UTC")
    pipeline_caught_up(client)
    fits = client.reserve(tenant, Decimal("0.15"), feature="search")  # 0.80 + 0.15 <= 1: fits the budget
    assert fits.allowed, fits.reason
    client.release(fits)
    over = client.reserve(tenant, Decimal("0.25"), feature="search")  # 0.80 + 0.25 > 1
    assert not over.allowed and "hard budget" in over.reason
    # For the balance the $0.80 is still held: $10 - 0.80 held leaves $9.20.
    assert not client.reserve(tenant, Decimal("9.3")).allowed
