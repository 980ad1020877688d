"""Stage 1's failure policy on the real stack: a record that a later stage cannot handle is isolated
and dead-lettered while the rest of its batch is billed; a backfill spanning months is billed in its
months; oversized input and fan-out never produce a message Kafka would refuse."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
from confluent_kafka import Producer
from genai_prices import Usage, calc_price

from deploy.isolation import isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas import codec
from schemas.events import UsageEvent
from schemas.records import PriceResult, Rollup
from streams.meter import ROLLUPS_PER_MESSAGE, Meter, build_meter, rollup_messages, write_rollup_batch
from streams.pricing import PriceBook
from tests.helpers import read_all

pytestmark = pytest.mark.integration


class PoisonedBook(PriceBook):
    """Prices like the real book, except: model ``explodes`` raises, and model ``nul-source`` gets a price
    source with a NUL byte, which Postgres refuses (a real DataError from COPY)."""

    def price(self, event: UsageEvent) -> PriceResult:
        if event.model == "explodes":
            raise ArithmeticError("a pricing bug that only this record reaches")
        if event.model == "nul-source":
            return super().price(replace_model(event, "gpt-4o"))._replace(source="bad\x00source")
        return super().price(event)


def replace_model(event: UsageEvent, model: str) -> UsageEvent:
    return event.model_copy(update={"model": model})


def usage(tenant: str, **fields: object) -> dict[str, object]:
    return {
        "event_id": uuid.uuid4().hex,
        "tenant_id": tenant,
        "provider": "openai",
        "model": "gpt-4o",
        "timestamp": datetime.now(UTC).isoformat(),
        "input_tokens": 1000,
        "output_tokens": 100,
        **fields,
    }


def send(settings: Settings, events: list[dict[str, object]] | list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "message.max.bytes": 2_000_000})
    for event in events:
        value = event if isinstance(event, bytes) else json.dumps(event).encode()
        producer.produce(settings.topic_raw, key=b"k", value=value)
    assert producer.flush(30) == 0


def drain(meter: Meter, expect: int, rounds: int = 400) -> None:
    for _ in range(rounds):
        meter.run_once(0.2)
        if meter.stats.consumed >= expect:
            return
    raise AssertionError(f"consumed {meter.stats.consumed} of {expect}")


@pytest.fixture
def own(stack: LocalStack, settings: Settings) -> Settings:
    return isolated(settings, uuid.uuid4().hex[:10])


@pytest.fixture
def meter(own: Settings) -> Iterator[Meter]:
    m = build_meter(own, PoisonedBook())
    yield m
    m.close()


def ledger(settings: Settings, tenant: str) -> dict[str, tuple[Decimal, str]]:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id, total_cost, price_status FROM tokenmeter.ledger WHERE tenant_id = %s", (tenant,)
        ).fetchall()
    return {event_id: (cost, status) for event_id, cost, status in rows}


def test_a_record_no_stage_can_handle_is_dead_lettered_and_the_rest_of_its_batch_is_billed(
    own: Settings, meter: Meter
) -> None:
    tenant = f"poison-{uuid.uuid4().hex[:6]}"
    good = [usage(tenant) for _ in range(60)]
    bad = [usage(tenant, model="explodes"), usage(tenant, model="nul-source")]
    batch = good[:20] + bad[:1] + good[20:45] + bad[1:] + good[45:]
    send(own, batch)
    drain(meter, len(batch))
    billed = ledger(own, tenant)
    assert set(billed) == {e["event_id"] for e in good}  # every good event once, the poisoned ones not at all
    letters = [codec.decode("dead_letter", v) for v in read_all(own, own.topic_dlq, expect=2)]
    assert sorted(json.loads(d["original_value"])["model"] for d in letters) == ["explodes", "nul-source"]
    assert all(d["stage"] == "process" and "cannot be processed" in d["reason"] for d in letters)
    assert any("ArithmeticError" in d["reason"] for d in letters)
    assert any("DataError" in d["reason"] or "NUL" in d["reason"] or "0x00" in d["reason"] for d in letters)
    with psycopg.connect(own.database_url) as conn:
        calls = conn.execute(
            "SELECT calls FROM tokenmeter.rollups WHERE tenant_id = %s AND granularity = 'month'"
            " AND dimension = 'tenant'",
            (tenant,),
        ).fetchone()
    assert calls == (60,)


def test_a_backfill_of_sessions_over_three_months_in_one_batch_is_billed_in_its_months(
    own: Settings, meter: Meter
) -> None:
    """The batch that crashed the runaway rule (KeyError) and then looped stage 1 forever."""
    tenant = f"backfill-{uuid.uuid4().hex[:6]}"
    start = datetime(2025, 4, 3, 9, 0, tzinfo=UTC)
    events = [
        usage(tenant, timestamp=(start + timedelta(hours=7 * i)).isoformat(), session_id=f"s{i % 9}", trace_id=f"t{i}")
        for i in range(300)
    ]
    events += [usage(tenant, session_id="agent-loop") for _ in range(40)]  # and a live loop among them
    send(own, events)
    drain(meter, len(events))
    billed = ledger(own, tenant)
    assert len(billed) == len(events)
    expected: dict[str, Decimal] = {}
    for e in events:
        at = datetime.fromisoformat(str(e["timestamp"]))
        price = calc_price(
            Usage(input_tokens=1000, output_tokens=100), "gpt-4o", provider_id="openai", genai_request_timestamp=at
        )
        expected[at.strftime("%Y-%m")] = expected.get(at.strftime("%Y-%m"), Decimal(0)) + price.total_price
    with psycopg.connect(own.database_url) as conn:
        rows = conn.execute(
            "SELECT to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM'), cost FROM tokenmeter.rollups"
            " WHERE tenant_id = %s AND granularity = 'month' AND dimension = 'tenant'",
            (tenant,),
        ).fetchall()
    months = dict(rows)
    assert months == expected
    assert len(months) >= 4  # April to July 2025, plus this month
    assert meter.stats.batches >= 1


def test_rollup_messages_of_a_tenant_with_thousands_of_users_stay_far_under_the_broker_limit() -> None:
    at = datetime(2025, 7, 1, tzinfo=UTC)
    rollups = [
        Rollup(
            "acme" * 50,
            "day",
            at,
            "user",
            f"user-{i:05d}" + "x" * 180,
            1,
            0,
            10,
            1,
            0,
            0,
            Decimal(0),
            Decimal(0),
            Decimal("0.000123456789"),
        )
        for i in range(5000)
    ]
    messages = rollup_messages(rollups)
    assert len(messages) == 5000 // ROLLUPS_PER_MESSAGE
    assert sum(len(records) for _, _, records in messages) == 5000
    sizes = [len(write_rollup_batch({"tenant_id": t, "time_zone": z, "rollups": r})) for t, z, r in messages]
    assert max(sizes) < 400_000  # the broker takes ~1 MB; the unsplit message was 1.48 MB for 5,000 users


def test_a_message_near_the_size_limit_becomes_a_small_dead_letter(own: Settings, meter: Meter) -> None:
    tenant = f"huge-{uuid.uuid4().hex[:6]}"
    huge = json.dumps(usage(tenant, feature="f" * 900_000)).encode()
    ok = usage(tenant)
    send(own, [huge, json.dumps(ok).encode()])
    drain(meter, 2)
    assert set(ledger(own, tenant)) == {ok["event_id"]}
    (letter,) = [codec.decode("dead_letter", v) for v in read_all(own, own.topic_dlq, expect=1)]
    assert letter["truncated"] and letter["original_size"] == len(huge) and "exceeds" in letter["reason"]
