"""Versioned spend writes against the real Redis: a write that arrives after a newer one (two stage-1
writers of one tenant, or a worker finishing a batch after it lost its partitions) leaves the newer value."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
import redis

from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent, Rollup
from schemas.redis_keys import spend_key, spend_value, spend_write_wins
from sinks.postgres import write_batch
from sinks.redis import _SET_NEWER, write_spend
from streams.pricing import PriceBook
from tests.schemas.test_redis_keys import SPEND_WRITE_CASES

NOW = datetime(2025, 7, 2, 12, tzinfo=UTC)


@pytest.fixture
def client(stack: LocalStack, settings: Settings) -> Iterator[redis.Redis]:
    own = redis.Redis.from_url(settings.redis_url.rsplit("/", 1)[0] + "/9")
    own.flushdb()
    yield own
    own.close()


def rollup(
    granularity: str, start: datetime, calls: int, cost: str, tenant: str = "acme", time_zone: str = "UTC"
) -> Rollup:
    zero = Decimal(0)
    return Rollup(tenant, granularity, start, "tenant", "", calls, 0, 1, 1, 0, 0, zero, zero, Decimal(cost), time_zone)


def stored(client: redis.Redis, period: str, tenant: str = "acme") -> str:
    raw = client.get(spend_key(tenant, "tenant", "", period))
    assert isinstance(raw, bytes)
    return raw.decode()


@pytest.mark.parametrize(("value", "before", "wins"), SPEND_WRITE_CASES)
def test_the_lua_rule_is_the_python_rule(client: redis.Redis, value: str, before: str | None, wins: bool) -> None:
    key = spend_key("acme", "tenant", "", "month")
    if before is not None:
        client.set(key, before)
    client.register_script(_SET_NEWER)(keys=[key], args=[value, 60])
    assert (client.get(key) == value.encode()) is wins is spend_write_wins(value, before)


def test_an_older_write_after_a_newer_one_leaves_the_newer(client: redis.Redis) -> None:
    month = datetime(2025, 7, 1, tzinfo=UTC)
    newer, older = rollup("month", month, 10, "5.5"), rollup("month", month, 7, "3.25")
    write_spend(client, [newer], NOW)
    write_spend(client, [older], NOW)  # the slower writer lands last
    assert spend_value(stored(client, "month"), NOW) == Decimal("5.5")
    key = spend_key("acme", "tenant", "", "month")
    client.expire(key, 5)
    assert write_spend(client, [newer], NOW) == 1  # the same version again: rewritten, expiry renewed
    assert spend_value(stored(client, "month"), NOW) == Decimal("5.5") and client.ttl(key) > 86_400
    write_spend(client, [rollup("month", month, 11, "5.75")], NOW)
    assert spend_value(stored(client, "month"), NOW) == Decimal("5.75")


def test_a_new_period_replaces_an_ended_one_and_never_the_other_way(client: redis.Redis) -> None:
    yesterday, today = datetime(2025, 7, 1, tzinfo=UTC), datetime(2025, 7, 2, tzinfo=UTC)
    before_midnight, after_midnight = today - timedelta(seconds=1), today + timedelta(seconds=1)
    write_spend(client, [rollup("day", yesterday, 900, "90")], before_midnight)
    write_spend(client, [rollup("day", today, 1, "0.5")], after_midnight)  # fewer calls, but a later period
    assert spend_value(stored(client, "day"), after_midnight) == Decimal("0.5")
    write_spend(client, [rollup("day", yesterday, 901, "91")], before_midnight)  # a batch delayed past midnight
    assert spend_value(stored(client, "day"), after_midnight) == Decimal("0.5")


def test_a_time_zone_change_is_written_whichever_way_the_period_end_moves(client: redis.Redis) -> None:
    """``tenant set --timezone`` rebuilds the windows: Berlin's month ends an hour or two before UTC's, and
    its call count may be lower; versions of different zones do not compare, the last write wins."""
    write_spend(client, [rollup("month", datetime(2025, 7, 1, tzinfo=UTC), 50, "20")], NOW)
    berlin_month = datetime(2025, 6, 30, 22, tzinfo=UTC)
    write_spend(client, [rollup("month", berlin_month, 49, "19.5", time_zone="Europe/Berlin")], NOW)
    assert stored(client, "month").endswith(" 49 Europe/Berlin")
    assert spend_value(stored(client, "month"), NOW) == Decimal("19.5")


def test_the_value_of_the_version_before_is_replaced(client: redis.Redis) -> None:
    end_ms = int(datetime(2025, 8, 1, tzinfo=UTC).timestamp() * 1000)
    client.set(spend_key("acme", "tenant", "", "month"), f"99 {end_ms}")
    write_spend(client, [rollup("month", datetime(2025, 7, 1, tzinfo=UTC), 1, "1")], NOW)
    assert spend_value(stored(client, "month"), NOW) == Decimal(1)


def test_redis_keeps_the_later_postgres_total_whatever_order_two_writers_land_in(
    client: redis.Redis, settings: Settings
) -> None:
    """Two batches of one tenant committed one after the other (keyless input on two partitions): the Redis
    writes land in the opposite order, and Redis still holds the later absolute total."""
    tenant = f"versioned-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    book = PriceBook()

    def batch(first: int) -> list[PricedEvent]:
        events = [
            validate_event(
                {
                    "event_id": f"{tenant}-{i}",
                    "timestamp": now - timedelta(seconds=i),
                    "tenant_id": tenant,
                    "provider": "openai",
                    "model": "gpt-4o",
                    "input_tokens": 1000 + i,
                    "output_tokens": 100,
                }
            )
            for i in range(first, first + 5)
        ]
        return [PricedEvent(event, book.price(event)) for event in events]

    with psycopg.connect(settings.database_url) as conn:
        earlier = write_batch(conn, batch(0))
        later = write_batch(conn, batch(5))
        month = conn.execute(
            "SELECT cost, calls FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = 'month'"
            " AND dimension = 'tenant' ORDER BY window_start DESC LIMIT 1",
            (tenant,),
        ).fetchone()
    assert month is not None and month[1] == 10
    write_spend(client, later.rollups)
    write_spend(client, earlier.rollups)
    assert spend_value(stored(client, "month", tenant), datetime.now(UTC)) == month[0]
