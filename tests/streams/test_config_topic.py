"""ConfigFollower against the real broker: bad config records are skipped and counted, never raised;
a store that is down makes it stop at the record and retry it, never skip it."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis
from confluent_kafka import Producer
from prometheus_client import REGISTRY

from deploy.isolation import isolated
from deploy.settings import Settings, kafka_config
from deploy.stack import LocalStack
from schemas.events import validate_event
from streams.budgets import Budget, RateLimit, parse_config_record
from streams.config_topic import ConfigFollower, TransientConfigError
from streams.overrides import override_follower
from streams.pricing import PriceBook
from tests.helpers import create_topic


def produce(settings: Settings, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(15) == 0


def rejected(topic: str) -> float:
    return REGISTRY.get_sample_value("tokenmeter_config_records_rejected_total", {"topic": topic}) or 0.0


def override(tenant: str, **changes: Any) -> bytes:
    body = {
        "tenant_id": tenant,
        "provider": "openai",
        "model": "gpt-4o",
        "effective_from": "2025-01-01T00:00:00Z",
        "input_mtok": "1",
        "output_mtok": "2",
        **changes,
    }
    return json.dumps(body).encode()


def test_bad_override_records_are_skipped_and_counted_and_the_good_ones_apply(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    own = isolated(settings, unique)
    topic = own.topic_price_overrides
    produce(
        own,
        topic,
        [
            (b"ovr-good", override("acme")),
            (b"ovr-comma", override("beta", input_mtok="3,5")),  # used to raise decimal.InvalidOperation
            (b"ovr-nan", override("beta", output_mtok="NaN")),
            (b"ovr-inf", override("beta", output_mtok="Infinity")),
            (b"ovr-negative", override("beta", output_mtok="-1")),
            (b"ovr-places", override("beta", output_mtok="0.0000000000001")),
            (b"ovr-huge", override("beta", output_mtok="1e40")),
            (b"ovr-control", override("be\x00ta")),
            (b"ovr-missing", json.dumps({"tenant_id": "beta"}).encode()),
            (b"ovr-bytes", b"\x00\xff not json"),
            (b"ovr-list", b"[1, 2, 3]"),
            (b"", override("beta")),  # no key
            (b"ovr-later", override("gamma", input_mtok="0.5")),
            (b"ovr-gone", override("delta")),
            (b"ovr-gone", None),  # tombstone
        ],
    )
    book = PriceBook()
    follower = override_follower(own, book)
    try:
        assert follower.catch_up(10.0) == 4  # acme, gamma, delta and its deletion
        assert follower.rejected == 11 and rejected(topic) == 11
        assert follower.catch_up(0.5) == 0  # nothing new, nothing re-read
    finally:
        follower.close()

    def source(tenant: str) -> str:
        event = validate_event(
            {
                "event_id": "e",
                "timestamp": datetime(2025, 7, 1, tzinfo=UTC),
                "tenant_id": tenant,
                "provider": "openai",
                "model": "gpt-4o",
                "input_tokens": 10**6,
                "output_tokens": 0,
            }
        )
        return book.price(event).source

    assert source("acme") == "override:ovr-good" and source("gamma") == "override:ovr-later"
    assert source("beta").startswith("genai-prices") and source("delta").startswith("genai-prices")


def test_any_exception_from_apply_is_skipped_and_budgets_keep_following(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    own = isolated(settings, unique)
    topic = own.topic_budgets
    acme = Budget("acme", "tenant", "", "month", Decimal(10))
    limit = RateLimit("acme", "tenant", "", calls_per_minute=60)
    produce(
        own,
        topic,
        [
            (acme.key.encode(), acme.to_json()),
            (b"not a json key", acme.to_json()),
            (
                b'["beta", "tenant", ""]',
                json.dumps(
                    {"tenant_id": "beta", "dimension": "tenant", "value": "", "period": "month", "limit": "1e-13"}
                ).encode(),
            ),
            (b'["beta", "tenant", ""]', b"{broken"),
            (b'["gamma", "tenant", ""]', acme.to_json()),  # a key and a value that disagree
            (b'["boom", "tenant", ""]', b"{}"),
            (limit.key.encode(), limit.to_json()),
        ],
    )
    budgets: dict[str, Budget] = {}
    limits: list[RateLimit] = []

    def apply(key: str, value: bytes | None) -> None:
        if key == '["boom", "tenant", ""]':
            raise ZeroDivisionError("an error no one planned for")  # not a ValueError: still only this record's
        record = parse_config_record(key, value)
        if isinstance(record.item, Budget):
            budgets[key] = record.item
        elif isinstance(record.item, RateLimit):
            limits.append(record.item)

    follower = ConfigFollower(kafka_config(own), topic, apply)
    try:
        assert follower.catch_up(10.0) == 2
    finally:
        follower.close()
    assert budgets == {acme.key: acme} and limits == [limit]
    assert follower.rejected == 5 and rejected(topic) == 5


@pytest.mark.parametrize(
    "failure", [TransientConfigError("redis is down"), redis.ConnectionError("refused"), TimeoutError("slow")]
)
def test_a_store_error_stops_at_the_record_and_the_next_catch_up_retries_it(
    stack: LocalStack, settings: Settings, unique: str, failure: Exception
) -> None:
    topic = f"test.config.{unique}"
    create_topic(settings, topic, partitions=3)
    keys = [f"k{i}".encode() for i in range(12)]
    produce(settings, topic, [(key, b"v1") for key in keys] + [(key, b"v2") for key in keys])
    seen: list[tuple[str, bytes | None]] = []
    failures = {"k5": 2}  # the store fails twice while k5's first value is applied

    def apply(key: str, value: bytes | None) -> None:
        if failures.get(key) and value == b"v1":
            failures[key] -= 1
            raise failure
        seen.append((key, value))

    follower = ConfigFollower(kafka_config(settings), topic, apply)
    try:
        total = follower.catch_up(10.0)
        assert ("k5", b"v1") not in seen and total < 24  # stopped at k5
        total += follower.catch_up(1.0)
        assert ("k5", b"v1") not in seen  # failed again: still not skipped
        while (more := follower.catch_up(1.0)) > 0:
            total += more
    finally:
        follower.close()
    assert total == 24 and follower.rejected == 0 and rejected(topic) == 0
    assert sorted(seen) == sorted({(key.decode(), v) for key in keys for v in (b"v1", b"v2")})  # each once
    for key in keys:  # and in order per key: the latest value is the one that stays
        values = [v for k, v in seen if k == key.decode()]
        assert values == [b"v1", b"v2"]


def test_the_worker_budget_follower_waits_for_redis_instead_of_crashing(stack: LocalStack, settings: Settings) -> None:
    """Redis down while budgets are applied used to crash the worker; now the record waits for Redis."""
    from schemas.redis_keys import budget_key
    from streams.app import budget_follower

    own = isolated(settings, f"rd{datetime.now(UTC).strftime('%H%M%S%f')}")
    budget = Budget("redis-down", "tenant", "", "month", Decimal("5"), hard=True)
    produce(own, own.topic_budgets, [(budget.key.encode(), budget.to_json())])
    budgets: dict[str, Budget] = {}
    down = budget_follower(own.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"}), budgets)
    assert down.catch_up(5.0) == 0  # no exception: Redis is unreachable, the record is not skipped
    assert down.catch_up(0.5) == 0 and down.rejected == 0
    down.close()
    up = budget_follower(own, budgets)
    assert up.catch_up(5.0) == 1
    assert budgets[budget.key] == budget
    stored = redis.Redis.from_url(own.redis_url).get(budget_key("redis-down", "tenant", ""))
    assert stored is not None and json.loads(stored)["limit"] == "5"
    up.close()


def test_read_to_end_applies_every_record_there_was_and_says_when_it_is_done(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    """What the stages wait for before pricing or judging budgets: every partition read to its end once."""
    topic = f"test.config.end.{unique}"
    create_topic(settings, topic, partitions=3)
    seen: dict[str, bytes | None] = {}
    empty = ConfigFollower(kafka_config(settings), topic, seen.__setitem__)
    try:
        assert not empty.caught_up
        assert empty.read_to_end(30.0) and empty.caught_up and seen == {}  # an empty topic is read at once
    finally:
        empty.close()
    produce(settings, topic, [(f"k{i}".encode(), f"v{i}".encode()) for i in range(500)])
    follower = ConfigFollower(kafka_config(settings), topic, seen.__setitem__)
    try:
        assert follower.read_to_end(30.0) and follower.caught_up
        assert seen == {f"k{i}": f"v{i}".encode() for i in range(500)}
    finally:
        follower.close()
    stopped = ConfigFollower(kafka_config(settings), topic, seen.__setitem__)
    try:  # asked to stop (SIGTERM) before it got anywhere: it says it did not finish
        assert not stopped.read_to_end(30.0, stop=lambda: True) and not stopped.caught_up
    finally:
        stopped.close()


def test_read_to_end_finishes_on_a_topic_written_to_all_the_time(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    """The goal is the end the topic had when the read began: records written meanwhile do not move it (a
    worker must start however busy config.budgets is)."""
    topic = f"test.config.busy.{unique}"
    create_topic(settings, topic, partitions=2)
    produce(settings, topic, [(f"old{i}".encode(), b"v") for i in range(200)])
    writing = threading.Event()
    writing.set()

    def keep_writing() -> None:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 0})
        n = 0
        while writing.is_set():
            producer.produce(topic, key=f"new{n % 50}".encode(), value=b"v")
            producer.poll(0)
            n += 1
            time.sleep(0.002)
        producer.flush(10)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    seen: dict[str, bytes | None] = {}
    follower = ConfigFollower(kafka_config(settings), topic, seen.__setitem__)
    try:
        time.sleep(0.5)  # the writer is going
        assert follower.read_to_end(30.0), "never caught up with a busy topic"
        assert {f"old{i}" for i in range(200)} <= set(seen)
    finally:
        writing.clear()
        writer.join(15)
        follower.close()


def test_read_to_end_gives_up_on_a_missing_topic_after_its_timeout(
    stack: LocalStack, settings: Settings, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    follower = ConfigFollower(kafka_config(settings), f"test.config.missing.{unique}", lambda *_: None)
    started = time.monotonic()
    try:
        assert not follower.read_to_end(3.0) and not follower.caught_up
    finally:
        follower.close()
    assert 3.0 <= time.monotonic() - started < 30.0
    tries = [r for r in caplog.records if "cannot read it to its end yet" in r.getMessage()]
    assert 1 <= len(tries) <= 8, len(tries)  # a new consumer every half second or so, not a hot loop


def test_the_budgets_stage_two_starts_with_are_read_without_redis(stack: LocalStack, settings: Settings) -> None:
    """read_budgets (before the worker's Faust app starts): every budget, bad records skipped, Redis not asked."""
    from streams.app import read_budgets

    own = isolated(settings, f"rb{datetime.now(UTC).strftime('%H%M%S%f')}")
    kept = [Budget(f"tenant-{n}", "tenant", "", "month", Decimal(n + 1)) for n in range(30)]
    gone = Budget("gone", "tenant", "", "month", Decimal(1))
    limit = RateLimit("tenant-1", "tenant", "", calls_per_minute=100)
    produce(
        own,
        own.topic_budgets,
        [(b.key.encode(), b.to_json()) for b in [*kept, gone]]
        + [(gone.key.encode(), None), (b"budget:bad", b"{not json"), (limit.key.encode(), limit.to_json())],
    )
    budgets: dict[str, Budget] = {}
    down = own.model_copy(update={"redis_url": "redis://127.0.0.1:9/0"})
    assert read_budgets(down, budgets)
    assert budgets == {b.key: b for b in kept}


class _FakePartitionLog:
    """One partition of a config topic as a consumer sees it: records at some offsets, an end offset that may
    lie beyond the last of them (the tail compacted away), a leader that may not answer, a fetcher that may
    never deliver."""

    def __init__(self, offsets: list[int], end: int, leader_answers: bool = True, delivers: bool = True) -> None:
        self.records = {offset: (f"k{offset}".encode(), b"v") for offset in offsets}
        self.end, self.leader_answers, self.delivers = end, leader_answers, delivers
        self.next_offset = -1001  # OFFSET_INVALID: nothing fetched yet

    # the parts of confluent_kafka.Consumer that ConfigFollower uses
    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("t", 0)]

    def get_watermark_offsets(self, tp: Any, timeout: float = 0, cached: bool = False) -> tuple[int, int]:
        if not self.leader_answers:
            raise RuntimeError("KafkaError{code=_TIMED_OUT}")
        return 0, self.end

    def position(self, partitions: list[Any]) -> list[Any]:
        from confluent_kafka import TopicPartition

        return [TopicPartition("t", 0, self.next_offset)]

    def consume(self, count: int, timeout: float) -> list[Any]:
        if not self.delivers:
            return []
        start = max(self.next_offset, 0)
        found = [offset for offset in sorted(self.records) if offset >= start][:count]
        if found:
            self.next_offset = found[-1] + 1
        return [_FakeMessage(offset, *self.records[offset]) for offset in found]

    def close(self) -> None:
        pass


class _FakeMessage:
    def __init__(self, offset: int, key: bytes, value: bytes) -> None:
        self._offset, self._key, self._value = offset, key, value

    def error(self) -> None:
        return None

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


def _follower_on(partition_log: _FakePartitionLog, seen: dict[str, bytes | None]) -> ConfigFollower:
    follower = ConfigFollower({}, "t", seen.__setitem__)
    follower._consumer = partition_log  # type: ignore[assignment]
    return follower


def test_read_to_end_takes_a_tail_compacted_away_as_the_end() -> None:
    """Records 0-2, end offset 5 (3 and 4 cleaned away): nothing after 2 will ever come. Waiting for offset 5
    would stop every start of the worker for good (exit 3, restart, the same again)."""
    seen: dict[str, bytes | None] = {}
    follower = _follower_on(_FakePartitionLog([0, 1, 2], end=5), seen)
    assert follower.read_to_end(30.0) and follower.caught_up
    assert seen == {"k0": b"v", "k1": b"v", "k2": b"v"}


def test_read_to_end_waits_for_a_partition_it_could_not_fetch_from_or_whose_leader_is_silent() -> None:
    """Not the compacted tail: nothing fetched at all (position unknown), or the leader not answering."""
    for partition_log in (
        _FakePartitionLog([0, 1, 2], end=3, delivers=False),
        _FakePartitionLog([0, 1, 2], end=3, leader_answers=False),
    ):
        follower = _follower_on(partition_log, {})
        assert not follower.read_to_end(2.0) and not follower.caught_up
