"""Stage 1's commit protocol, without any server: ``Meter.run_once`` over in-memory clients.

The order *sinks → produce → flush → commit* is what makes a replay harmless (DESIGN §5): offsets are
committed only after Postgres and Redis hold the batch and Kafka has acknowledged every output. On a
failure the batch is rewound (seek to its first offsets), nothing is committed and the next call
replays it; a record no stage can handle is dead-lettered alone and the rest is billed.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.settings import Settings, kafka_config
from deploy.stack import LocalStack
from schemas.records import Alert, PricedEvent, Rollup
from sinks.postgres import BatchResult
from sinks.redis import forget_keys
from streams.health import Health
from streams.meter import (
    Commits,
    Meter,
    OutputsNotDelivered,
    RewindFailed,
    Sinks,
    Stopping,
    describe_postgres_failure,
)
from streams.pricing import PriceBook

TOPIC = "usage.raw"


class FakeMessage:
    def __init__(self, partition: int, offset: int, value: bytes, key: bytes = b"acme") -> None:
        self._partition, self._offset, self._value, self._key = partition, offset, value, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)


class FakeConsumer:
    """Hands out queued messages; records commits and seeks in the shared log."""

    def __init__(self, log: list[str], batches: list[list[FakeMessage]]) -> None:
        self.log, self.batches = log, batches
        self.committed_offsets: dict[tuple[str, int], int] = {}

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        return self.batches.pop(0) if self.batches else []

    def assignment(self) -> list[TopicPartition]:
        return []

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return partitions

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple:
        return (0, 0)

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        return partitions

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool = True) -> None:
        for tp in offsets:
            self.committed_offsets[(tp.topic, tp.partition)] = tp.offset
        waited = "" if asynchronous else " (synchronous)"
        self.log.append("commit " + ",".join(f"{tp.partition}@{tp.offset}" for tp in offsets) + waited)

    def seek(self, partition: TopicPartition) -> None:
        self.log.append(f"seek {partition.partition}@{partition.offset}")

    def close(self) -> None:
        pass


class FakeProducer:
    """Queues outputs until ``flush``, which acknowledges them (or fails them with ``fail_with``)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.queued: list[tuple[str, bytes, Callable[[Any, Any], None]]] = []
        self.delivered: list[tuple[str, bytes]] = []
        self.fail_with: KafkaError | None = None

    def produce(self, topic: str, *, value: bytes, key: bytes | None, on_delivery: Callable[[Any, Any], None]) -> None:
        self.log.append(f"produce {topic}")
        self.queued.append((topic, value, on_delivery))

    def flush(self, timeout: float = 0) -> int:
        self.log.append("flush")
        for topic, value, callback in self.queued:
            callback(self.fail_with, None)
            if self.fail_with is None:
                self.delivered.append((topic, value))
        self.queued.clear()
        return 0

    def poll(self, timeout: float = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.queued)


class FakeSinks:
    """Postgres and Redis in memory: a ledger keyed by event id (duplicates insert nothing)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.note: Callable[[str], None] | None = None
        self.ledger: dict[str, Decimal] = {}
        self.fail: Callable[[Sequence[PricedEvent]], None] = lambda _batch: None
        self.forgotten: list[str] = []  # spend keys deleted
        self.forgotten_on: list[str] = []  # by which thread (name prefix)

    def write(
        self,
        priced: Sequence[PricedEvent],
        should_stop: Callable[[], bool] | None = None,
        live: Callable[[Sequence[Rollup], list[str]], list[Rollup]] | None = None,
    ) -> BatchResult:
        self.log.append(f"sinks {len(priced)}")
        self.fail(priced)
        new = [p for p in priced if p.event.event_id not in self.ledger]
        for p in new:
            self.ledger[p.event.event_id] = p.price.total_cost
        month = datetime(2025, 7, 1, tzinfo=UTC)
        total = sum(self.ledger.values(), Decimal(0))
        rollup = Rollup("acme", "month", month, "tenant", "", len(self.ledger), 0, 0, 0, 0, 0, total, 0, total)
        return BatchResult(len(new), [rollup])

    def refresh_spend(self, scopes: Sequence[tuple[str, str, str]]) -> None:
        pass

    def store_alerts(self, alerts: Sequence[Alert], should_stop: Callable[[], bool] | None = None) -> set[str]:
        return {a.alert_id for a in alerts}

    def write_freshness(self, key: str, member: str, caught_up_ms: int, now_ms: int) -> None:
        pass

    def prune_freshness(self, key: str, now_ms: int) -> None:
        pass

    def forget_freshness(self, key: str, member: str) -> None:
        pass

    def forget_spend(self, keys: Sequence[str]) -> None:
        self.log.append(f"forget {len(keys)}")
        self.forgotten += keys
        self.forgotten_on.append(threading.current_thread().name.split("_")[0])

    def close(self) -> None:
        pass


def usage(event_id: str, input_tokens: int = 1000) -> bytes:
    when = datetime(2025, 7, 2, tzinfo=UTC) + timedelta(seconds=len(event_id))
    return json.dumps(
        {
            "event_id": event_id,
            "timestamp": when.isoformat(),
            "tenant_id": "acme",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": input_tokens,
            "output_tokens": 100,
        }
    ).encode()


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook()


def make(batches: list[list[FakeMessage]], book: PriceBook) -> tuple[Meter, list[str], FakeProducer, FakeSinks]:
    log: list[str] = []
    producer, sinks = FakeProducer(log), FakeSinks(log)
    meter = Meter(Settings(), FakeConsumer(log, batches), producer, sinks, book)
    return meter, log, producer, sinks


def kinds(log: list[str]) -> list[str]:
    """The log with repeated entries collapsed: the order of the steps."""
    steps: list[str] = []
    for entry in log:
        step = entry.split(" ")[0]
        if not steps or steps[-1] != step:
            steps.append(step)
    return steps


def test_a_batch_goes_to_the_sinks_then_kafka_and_is_committed_only_after_kafka_acknowledged_it(
    book: PriceBook,
) -> None:
    batch = [FakeMessage(0, 10, usage("a")), FakeMessage(0, 11, b"{not json"), FakeMessage(1, 5, usage("bb"))]
    meter, log, producer, sinks = make([batch], book)

    assert meter.run_once() == 0  # taken and in the sinks (on the sink thread): nothing committed yet
    assert meter.in_flight == 3 and not any(entry.startswith("commit") for entry in log)
    assert meter.drain() == 3  # published, flushed, committed

    assert kinds(log) == ["sinks", "produce", "flush", "commit"]
    assert log[0] == "sinks 2"  # the malformed message never reaches a sink
    assert log[-1] == "commit 0@12,1@6"  # the next offset of each partition
    topics = sorted(topic for topic, _ in producer.delivered)
    settings = Settings()
    assert topics == sorted([settings.topic_dlq, settings.topic_priced, settings.topic_priced, settings.topic_rollups])
    # gpt-4o in July 2025: $2.50 / $10 per million tokens
    assert sinks.ledger == {"a": Decimal("0.0035"), "bb": Decimal("0.0035")}


@pytest.mark.parametrize(
    "failure",
    [psycopg.OperationalError("connection refused"), OutputsNotDelivered("broker down")],
    ids=["postgres down", "kafka outputs not delivered"],
)
def test_a_transient_failure_rewinds_the_batch_commits_nothing_and_the_next_call_replays_it(
    book: PriceBook, failure: Exception
) -> None:
    batch = [FakeMessage(0, 10, usage("a")), FakeMessage(1, 5, usage("bb")), FakeMessage(1, 6, usage("ccc"))]
    meter, log, _producer, sinks = make([batch, batch], book)

    def fail_once(_batch: Sequence[PricedEvent]) -> None:
        sinks.fail = lambda _b: None
        raise failure

    sinks.fail = fail_once
    meter.run_once()
    with pytest.raises(type(failure)):
        meter.drain()
    assert not any(entry.startswith(("commit", "produce")) for entry in log)
    assert log[-2:] == ["seek 0@10", "seek 1@5"]  # back to the first message of each partition

    log.clear()
    assert meter.run_once() == 0  # the replay, taken
    assert meter.drain() == 3
    assert kinds(log) == ["sinks", "produce", "flush", "commit"]
    assert log[-1] == "commit 0@11,1@7"
    assert sorted(sinks.ledger) == ["a", "bb", "ccc"]


def test_outputs_kafka_does_not_acknowledge_hold_the_commit_back(book: PriceBook) -> None:
    batch = [FakeMessage(0, 3, usage("a"))]
    meter, log, producer, sinks = make([batch, batch], book)
    producer.fail_with = KafkaError(KafkaError._MSG_TIMED_OUT)

    meter.run_once()
    with pytest.raises(OutputsNotDelivered):
        meter.drain()
    assert kinds(log) == ["sinks", "produce", "flush", "seek"]  # sinks done, outputs lost, no commit

    producer.fail_with = None
    log.clear()
    assert meter.run_once() == 0
    assert meter.drain() == 1
    assert kinds(log) == ["sinks", "produce", "flush", "commit"]
    assert sinks.ledger == {"a": Decimal("0.0035")}  # the replay inserted nothing twice


def test_a_record_no_sink_accepts_is_dead_lettered_alone_and_the_rest_is_billed_and_committed(
    book: PriceBook,
) -> None:
    batch = [FakeMessage(0, offset, usage(f"e{offset}")) for offset in range(8)]
    meter, log, producer, sinks = make([batch], book)

    def refuse_poison(priced: Sequence[PricedEvent]) -> None:
        if any(p.event.event_id == "e5" for p in priced):
            raise ValueError("a value the sink refuses")

    sinks.fail = refuse_poison
    assert meter.run_once() == 0
    assert meter.drain() == 8  # failed in the sinks: processed again alone, split until the record is found

    assert sorted(sinks.ledger) == [f"e{i}" for i in range(8) if i != 5]
    settings = Settings()
    dead = [value for topic, value in producer.delivered if topic == settings.topic_dlq]
    assert len(dead) == 1 and b"a value the sink refuses" in dead[0]
    assert log[-1] == "commit 0@8" and sum(entry.startswith("commit") for entry in log) == 1
    assert meter.stats.rejected == 1 and meter.stats.consumed == 8


def test_the_next_batch_is_prepared_while_one_is_in_the_sinks_and_each_is_committed_in_order(
    book: PriceBook,
) -> None:
    first = [FakeMessage(0, 0, usage("a")), FakeMessage(1, 0, usage("dup"))]
    second = [FakeMessage(0, 1, usage("b")), FakeMessage(1, 1, usage("dup"))]  # a producer retry of "dup"
    meter, log, producer, sinks = make([first, second], book)
    second_in_sinks = threading.Event()
    sinks.fail = lambda priced: second_in_sinks.set() if any(p.event.event_id == "b" for p in priced) else None
    flushed_while_second_in_sinks: list[bool] = []
    flush = producer.flush

    def flush_once_the_second_is_in_the_sinks(timeout: float = 0) -> int:
        # The first batch's outputs are flushed while the second is written: without the overlap this waits
        # in vain (the second would only go to the sinks after the first is committed).
        if not flushed_while_second_in_sinks:
            flushed_while_second_in_sinks.append(second_in_sinks.wait(10))
        return flush(timeout)

    producer.flush = flush_once_the_second_is_in_the_sinks  # type: ignore[method-assign]
    assert meter.run_once() == 0
    assert meter.run_once() == 2  # the second taken and prepared, sent on, the first committed meanwhile
    assert meter.in_flight == 2  # the second, in the sinks: behind until committed
    assert meter.drain() == 2

    assert flushed_while_second_in_sinks == [True]
    first_commit = log.index("commit 0@1,1@1")
    assert log.index("flush") < first_commit  # the first batch's outputs are acknowledged before its commit
    assert sum(entry == "produce usage.priced" for entry in log[:first_commit]) == 2
    assert [entry for entry in log if entry.startswith(("sinks", "commit"))] == [
        "sinks 2",
        "sinks 1",  # "dup" is still in the sinks with the first batch when the second is prepared: not fresh
        "commit 0@1,1@1",
        "commit 0@2,1@2",
    ]
    priced = [value for topic, value in producer.delivered if topic == Settings().topic_priced]
    assert len(priced) == 3 and sorted(sinks.ledger) == ["a", "b", "dup"]


def test_when_publishing_a_batch_fails_the_one_already_sent_to_the_sinks_is_rewound_and_counted_once(
    book: PriceBook,
) -> None:
    first = [FakeMessage(0, 0, usage("a"))]
    second = [FakeMessage(0, 1, usage("b")), FakeMessage(2, 7, usage("c"))]
    meter, log, producer, sinks = make([first, second, [*first, *second]], book)
    meter.run_once()
    producer.fail_with = KafkaError(KafkaError._MSG_TIMED_OUT)
    with pytest.raises(OutputsNotDelivered):
        meter.run_once()  # the second went to the sinks, then the first's outputs were not delivered
    assert "sinks 2" in log and not any(entry.startswith("commit") for entry in log)
    seeks = [entry for entry in log if entry.startswith("seek")]
    assert sorted(seeks) == ["seek 0@0", "seek 0@1", "seek 2@7"]
    assert meter.in_flight == 0 and meter.drain() == 0  # nothing left in the sinks

    assert meter.stats.inserted == 3  # the first's row, and the second's, which its replay finds in already

    producer.fail_with = None
    log.clear()
    assert meter.run_once() == 0 and meter.drain() == 3  # the replay: the second's rows are in already
    assert log[-1] == "commit 0@2,2@8" and sorted(sinks.ledger) == ["a", "b", "c"]
    priced = [value for topic, value in producer.delivered if topic == Settings().topic_priced]
    assert len(priced) == 3
    assert meter.stats.inserted == 3


def test_an_interrupt_while_publishing_leaves_the_batch_sent_on_early_uncommitted(book: PriceBook) -> None:
    first = [FakeMessage(0, 0, usage("a"))]
    second = [FakeMessage(0, 1, usage("b"))]
    meter, log, producer, _sinks = make([first, second], book)

    def interrupted(timeout: float = 0) -> int:
        raise KeyboardInterrupt

    meter.run_once()
    producer.flush = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        meter.run_once()  # the second went to the sinks, then the first's flush was interrupted
    assert meter.drain() == 0  # a drain on the way out commits nothing past the first batch
    assert not any(entry.startswith("commit") for entry in log)


def test_when_the_batch_in_the_sinks_fails_the_one_taken_meanwhile_is_rewound_too(book: PriceBook) -> None:
    first = [FakeMessage(0, 0, usage("a"))]
    second = [FakeMessage(0, 1, usage("b")), FakeMessage(2, 7, usage("c"))]
    meter, log, _producer, sinks = make([first, second, [*first, *second]], book)

    def down(_batch: Sequence[PricedEvent]) -> None:
        raise psycopg.OperationalError("connection refused")

    sinks.fail = down
    meter.run_once()
    with pytest.raises(psycopg.OperationalError):
        meter.run_once()
    assert not any(entry.startswith(("commit", "produce")) for entry in log)
    seeks = [entry for entry in log if entry.startswith("seek")]
    assert sorted(seeks) == ["seek 0@0", "seek 0@1", "seek 2@7"]
    assert [entry for entry in seeks if entry.startswith("seek 0@")][-1] == "seek 0@0"  # the earliest wins

    sinks.fail = lambda _b: None
    log.clear()
    assert meter.run_once() == 0 and meter.drain() == 3
    assert log[-1] == "commit 0@2,2@8" and sorted(sinks.ledger) == ["a", "b", "c"]


class UnseekableConsumer(FakeConsumer):
    """Seeks fail (as librdkafka's do for a partition no longer assigned); ``owned`` is the assignment."""

    def __init__(self, log: list[str], batches: list[list[FakeMessage]], owned: list[int]) -> None:
        super().__init__(log, batches)
        self.owned = owned

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("usage.raw", p) for p in self.owned]

    def seek(self, partition: TopicPartition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "Erroneous state"))


@pytest.mark.parametrize("owned", [[], [0]])
def test_a_failed_batch_that_cannot_be_rewound_stops_stage_one_unless_its_partition_was_revoked(
    book: PriceBook, owned: list[int]
) -> None:
    """Going on after a failed rewind of a partition still ours would commit past the failed batch."""
    batch = [FakeMessage(0, 10, usage("a"))]
    log: list[str] = []
    sinks = FakeSinks(log)
    meter = Meter(Settings(), UnseekableConsumer(log, [batch], owned), FakeProducer(log), sinks, book)

    def fail(_batch: Sequence[PricedEvent]) -> None:
        raise psycopg.OperationalError("server closed the connection")

    sinks.fail = fail
    meter.run_once()
    expected = RewindFailed if owned else psycopg.OperationalError  # revoked: its new owner replays it
    with pytest.raises(expected):
        meter.drain()
    assert not any(entry.startswith("commit") for entry in log)


class JustAssignedConsumer(FakeConsumer):
    """Partition 0 has a position; partition 1 none yet (just assigned or rewound): committed at 40."""

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("usage.raw", 0), TopicPartition("usage.raw", 1)]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("usage.raw", 0, 90), TopicPartition("usage.raw", 1, OFFSET_INVALID)]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple:
        return (0, 100)

    def committed(self, partitions: list[TopicPartition], timeout: float = 0) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 40) for tp in partitions]


def test_a_partition_without_a_position_counts_as_behind_from_its_commit(book: PriceBook) -> None:
    log: list[str] = []
    meter = Meter(Settings(), JustAssignedConsumer(log, []), FakeProducer(log), FakeSinks(log), book)
    assert meter.behind() == 10 + 60


class NeverFetchedConsumer(JustAssignedConsumer):
    """Both partitions hold positions, but partition 1 was never fetched: no cached end offset."""

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition("usage.raw", 0, 90), TopicPartition("usage.raw", 1, 40)]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple:
        if partition.partition == 1 and cached:
            return (-1001, -1001)
        return (0, 100)


def test_a_partition_never_fetched_counts_as_behind_by_the_end_the_broker_reports(book: PriceBook) -> None:
    """A partition held but not fetched used to count as caught up, so a stall there was never reported."""
    log: list[str] = []
    meter = Meter(Settings(), NeverFetchedConsumer(log, []), FakeProducer(log), FakeSinks(log), book)
    assert meter.behind() == 10 + 60


class OnePartitionStuckConsumer(NeverFetchedConsumer):
    """Partition 0 moves on every look; partition 1 stays at 40 of 100."""

    def __init__(self, log: list[str], batches: list[list[FakeMessage]]) -> None:
        super().__init__(log, batches)
        self.looks = 0

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self.looks += 1
        return [TopicPartition("usage.raw", 0, 50 + self.looks), TopicPartition("usage.raw", 1, 40)]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = 0, cached: bool = False) -> tuple:
        return (0, 100)


def test_a_partition_that_waits_without_moving_holds_back_the_stages_progress(
    book: PriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of the other partitions are no progress for it: its fetch is restarted, and supervision sees it
    stuck if that does not help."""
    clock = [1_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    log: list[str] = []
    consumer = OnePartitionStuckConsumer(log, [])
    meter = Meter(Settings(), consumer, FakeProducer(log), FakeSinks(log), book)
    meter.behind()
    clock[0] += 200.0
    meter.behind()
    assert meter.stuck_since() == 1_000.0
    assert log == []  # flagged; the consuming thread restarts its fetch, where it stands, once
    meter.run_once()
    meter.run_once()
    assert log == ["seek 1@40"]
    health = Health(120.0)
    health.stage("stage 1 (metering)").progressed(meter.behind(), since=meter.stuck_since())
    reason = health.stuck()
    assert reason is not None and re.search(r"made no progress for 200s with \d+ messages behind", reason), reason
    clock[0] += 1.0  # partition 1 moves at last: progress is now
    moved = [TopicPartition("usage.raw", 0, 100), TopicPartition("usage.raw", 1, 41)]
    monkeypatch.setattr(consumer, "position", lambda partitions: moved)
    health.stage("stage 1 (metering)").progressed(meter.behind(), since=meter.stuck_since())
    assert meter.stuck_since() == clock[0] and health.stuck() is None


@pytest.mark.integration
def test_on_a_real_broker_a_partition_assigned_but_not_yet_fetched_is_behind(
    stack: LocalStack, settings: Settings
) -> None:
    """librdkafka knows no end offset of a partition it has not fetched; the broker does."""
    topic = f"behind.{uuid.uuid4().hex[:10]}"
    admin = AdminClient(kafka_config(settings))
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    producer = Producer(kafka_config(settings))
    for n in range(10):
        producer.produce(topic, value=str(n).encode(), partition=0)
    assert producer.flush(30) == 0
    consumer = Consumer({**kafka_config(settings), "group.id": f"g{topic}", "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        consumer.assign([TopicPartition(topic, 0, 3)])  # held, never consumed from
        log: list[str] = []
        meter = Meter(settings, consumer, FakeProducer(log), FakeSinks(log), PriceBook())
        assert meter.behind() == 7
    finally:
        consumer.close()
        admin.delete_topics([topic])


@pytest.mark.parametrize(
    "failure",
    [
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
    ],
)
def test_a_redis_cluster_failover_is_waited_out_not_taken_for_a_refusal(
    failure: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py raises these as ResponseError subclasses; they pass with the failover, so the spend is
    written after a retry instead of being skipped as refused."""
    from streams import meter as meter_module

    attempts: list[int] = []

    def flaky_write(*_args: object, **_kwargs: object) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise failure
        return 0

    monkeypatch.setattr(meter_module, "write_spend", flaky_write)
    assert meter_module.transient_reason(failure) == "redis"
    meter_module.Sinks(Settings()).write_spend([])
    assert len(attempts) == 2
    assert meter_module.transient_reason(redis.ResponseError("WRONGTYPE")) is None  # a real refusal stays one


def test_a_runaway_loop_found_batch_after_batch_is_stored_once_not_on_every_batch(book: PriceBook) -> None:
    """Each batch of a running loop finds it again (same id: conversation and hour); stage 1's thread used to
    wait for a Postgres round trip storing it on every batch."""

    def looping(event_id: str) -> bytes:
        fields = json.loads(usage(event_id))
        return json.dumps({**fields, "timestamp": "2025-07-02T10:00:05+00:00", "session_id": "agent-7"}).encode()

    first = [FakeMessage(0, n, looping(f"a{n}")) for n in range(40)]
    second = [FakeMessage(0, 40 + n, looping(f"b{n}")) for n in range(40)]
    meter, _log, producer, sinks = make([first, second], book)
    stored: list[list[str]] = []
    sinks.store_alerts = lambda alerts, _stop=None: (
        stored.append([a.alert_id for a in alerts]),
        {a.alert_id for a in alerts},
    )[1]  # type: ignore[method-assign]
    meter.run_once()
    meter.run_once()
    meter.drain()
    assert stored == [["anomaly.runaway_loop:acme:agent-7:2025-07-02T10:00:00+00:00"]]
    runaway = [v for topic, v in producer.delivered if topic == Settings().topic_alerts_anomaly]
    assert len(runaway) == 1  # published once, when first stored


def test_a_stopping_process_does_not_commit_a_batch_whose_runaway_alerts_postgres_did_not_take(
    book: PriceBook,
) -> None:
    """Storing the alerts gives up once stopping (it must not hang); the batch then is not committed
    without them (runaway detection is optional, but stopping is not its failure): it is replayed."""
    looping = [
        json.dumps({**json.loads(usage(f"a{n}")), "timestamp": "2025-07-02T10:00:05+00:00", "session_id": "s"})
        for n in range(40)
    ]
    meter, log, _producer, sinks = make([[FakeMessage(0, n, v.encode()) for n, v in enumerate(looping)]], book)

    def away(_alerts: Sequence[Alert], should_stop: Callable[[], bool] | None = None) -> set[str]:
        meter.stopping = True  # SIGTERM during the outage
        assert should_stop is not None and should_stop()
        raise psycopg.OperationalError("connection refused")

    sinks.store_alerts = away  # type: ignore[method-assign]
    meter.run_once()
    with pytest.raises(Stopping):
        meter.drain()
    assert not any(entry.startswith("commit") for entry in log)
    assert log[-1] == "seek 0@0"


class HoldingConsumer(FakeConsumer):
    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("usage.raw", 0), TopicPartition("usage.raw", 1)]


def test_a_commit_kafka_refused_is_made_again_for_the_partitions_still_held(book: PriceBook) -> None:
    """A refused asynchronous commit (a rebalance) is lost; a partition kept but quiet would stay uncommitted."""
    first = [FakeMessage(0, 10, usage("a")), FakeMessage(1, 5, usage("bb"))]
    log: list[str] = []
    consumer = HoldingConsumer(log, [first, []])
    meter = Meter(Settings(), consumer, FakeProducer(log), FakeSinks(log), book)
    meter.run_once()
    meter.drain()
    assert log[-1] == "commit 0@11,1@6"
    generation = KafkaError(KafkaError.ILLEGAL_GENERATION)
    meter.commits.answered(generation, [TopicPartition("usage.raw", 0, 11), TopicPartition("usage.raw", 1, 6)])
    meter.run_once()  # nothing new arrives on either partition
    assert log[-1] == "commit 0@11,1@6"
    log.clear()
    meter.run_once()
    assert not any(entry.startswith("commit") for entry in log)  # once per refusal


@dataclass
class RefusedPartition:
    """A TopicPartition as on_commit reports one Kafka refused (its ``error`` cannot be set on the real one)."""

    topic: str
    partition: int
    offset: int
    error: KafkaError


def test_commits_answered_without_an_error_leave_nothing_to_retry() -> None:
    commits = Commits()
    commits.asked({("usage.raw", 0): 11})
    commits.answered(None, [TopicPartition("usage.raw", 0, 11)])
    assert commits.to_retry({("usage.raw", 0)}) == []
    commits.asked({("usage.raw", 1): 3})
    refused = RefusedPartition("usage.raw", 0, 11, KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    commits.answered(None, [refused])  # type: ignore[list-item]
    retry = commits.to_retry({("usage.raw", 0)})  # partition 1 went to another process meanwhile
    assert [(tp.partition, tp.offset) for tp in retry] == [(0, 11)]


def test_a_statement_refused_for_the_schema_is_worded_as_such_not_as_postgres_being_away() -> None:
    missing = describe_postgres_failure(psycopg.errors.UndefinedTable('relation "tokenmeter.ledger" does not exist'))
    assert missing.startswith("Postgres refused the statement (SQLSTATE 42P01: relation")
    assert "run `tokenmeter db migrate`" in missing
    away = describe_postgres_failure(psycopg.OperationalError("connection refused"))
    assert away == "Postgres unavailable (connection refused)"


class RebalancingConsumer(HoldingConsumer):
    """The second consume revokes partition 1 (librdkafka calls on_revoke inside consume), then hands out
    its batch."""

    def __init__(self, log: list[str], batches: list[list[FakeMessage]]) -> None:
        super().__init__(log, batches)
        self.on_revoke: Callable[[object, list[TopicPartition]], None] | None = None
        self.consumes = 0

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.consumes += 1
        if self.consumes == 2 and self.on_revoke is not None:
            self.log.append("revoke 1")
            self.on_revoke(self, [TopicPartition("usage.raw", 1)])
        return super().consume(num_messages, timeout)


def test_partitions_are_handed_over_after_the_batch_in_the_sinks_is_committed(book: PriceBook) -> None:
    """Their next owner starts after it: no replay, so no second dead letter or usage.priced message."""
    first = [FakeMessage(0, 10, usage("a")), FakeMessage(1, 5, b"{not json")]
    second = [FakeMessage(0, 11, usage("b"))]
    log: list[str] = []
    consumer = RebalancingConsumer(log, [first, second])
    meter = Meter(Settings(), consumer, FakeProducer(log), FakeSinks(log), book)
    consumer.on_revoke = meter.partitions_revoked
    meter.run_once()  # the first batch goes to the sinks
    meter.run_once()  # the revoke comes while it is there
    meter.drain()
    # The first batch's "sinks" entry comes from the sink thread, maybe after "revoke 1": left out of the order.
    handed_over = log.index("commit 0@11,1@6 (synchronous)")
    assert kinds(log[handed_over - 2 :]) == ["produce", "flush", "commit", "sinks", "produce", "flush", "commit"]
    assert log.index("revoke 1") < log.index("produce usage.priced") and log.count("commit 0@11,1@6 (synchronous)") == 1
    assert log[-1] == "commit 0@12"
    assert ("usage.raw", 1) not in meter.commits.finished  # its next owner commits it from now on


def test_a_batch_that_fails_while_partitions_are_handed_over_fails_the_run_and_is_replayed(book: PriceBook) -> None:
    first = [FakeMessage(0, 10, usage("a"))]
    second = [FakeMessage(0, 11, usage("b"))]
    log: list[str] = []
    consumer = RebalancingConsumer(log, [first, second])
    sinks = FakeSinks(log)
    meter = Meter(Settings(), consumer, FakeProducer(log), sinks, book)
    consumer.on_revoke = meter.partitions_revoked

    def fail(_batch: Sequence[PricedEvent]) -> None:
        raise psycopg.OperationalError("server closed the connection")

    sinks.fail = fail
    meter.run_once()  # the first batch goes to the sinks, and fails there
    with pytest.raises(psycopg.OperationalError):
        meter.run_once()
    assert not any(entry.startswith("commit") for entry in log)
    seeks = [entry for entry in log if entry.startswith("seek")]
    assert seeks[-1] == "seek 0@10" and "seek 0@11" not in seeks  # from the failed batch on: nothing passed over


def test_a_partition_waiting_behind_a_full_queue_is_not_taken_for_stuck(
    book: PriceBook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a backlog, consume returns full batches and a partition's messages may wait behind others' for a while."""
    clock = [1_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    log: list[str] = []
    consumer = OnePartitionStuckConsumer(log, [])
    meter = Meter(Settings(), consumer, FakeProducer(log), FakeSinks(log), book)
    meter._queue_drained = False  # what _consume notes after a full batch
    meter.behind()
    clock[0] += 200.0
    meter.behind()
    assert meter.stuck_since() == clock[0] and not meter._fetch_restarts


class UserSinks(FakeSinks):
    """Writes each event's user day window and lets the meter's live scopes choose what Redis mirrors."""

    def write(
        self,
        priced: Sequence[PricedEvent],
        should_stop: Callable[[], bool] | None = None,
        live: Callable[[Sequence[Rollup], list[str]], list[Rollup]] | None = None,
    ) -> BatchResult:
        super().write(priced, should_stop, live)
        day = datetime(2025, 7, 2, tzinfo=UTC)
        rollups = [
            Rollup(p.event.tenant_id, "day", day, "user", p.event.user_id or "", 1, 0, 0, 0, 0, 0, *[Decimal(0)] * 3)
            for p in priced
        ]
        forget: list[str] = []
        assert live is not None
        live(rollups, forget)
        self.forgotten += forget
        return BatchResult(len(priced), rollups)


def user_usage(event_id: str, tenant: str, user: str) -> bytes:
    record = json.loads(usage(event_id))
    return json.dumps({**record, "tenant_id": tenant, "user_id": user}).encode()


def test_a_tenant_handed_over_with_its_partition_takes_its_live_user_spend_keys_along(book: PriceBook) -> None:
    """Else every process that ever held a tenant's partition keeps up to live_values_per_tenant of its
    users' spend keys in Redis until their windows expire. Budgeted users are kept (their keys too). The
    tenant is the events', whatever the producer keyed by (here tenant and user, as a hot tenant may)."""
    first = [
        FakeMessage(0, 10, user_usage("a", "acme", "ann"), key=b"acme/ann"),
        FakeMessage(1, 5, user_usage("b", "globex", "bob"), key=b"globex/bob"),
        FakeMessage(1, 6, user_usage("c", "globex", "cy"), key=b"globex/cy"),
    ]
    second = [FakeMessage(0, 11, user_usage("d", "acme", "dee"), key=b"acme/dee")]
    log: list[str] = []
    consumer = RebalancingConsumer(log, [first, second])
    sinks = UserSinks(log)
    meter = Meter(Settings(), consumer, FakeProducer(log), sinks, book)
    meter.live.named.add(("globex", "user", "cy"))  # a budget names cy
    consumer.on_revoke = meter.partitions_revoked
    meter.run_once()
    meter.run_once()  # partition 1 (globex) is revoked while the first batch is in the sinks
    meter.drain()
    assert log.index("forget 3") > log.index("commit 0@11,1@7 (synchronous)")  # after the hand-over commit
    # bob's spend keys (each period's), deleted on the sink thread; not cy's (a budget names cy), not acme's
    assert sorted(sinks.forgotten) == sorted(forget_keys([("globex", "user", "bob")]))
    assert sinks.forgotten_on == ["sinks"]
    assert sorted((t, v) for (t, _d), values in meter.live._recent.items() for v in values) == [
        ("acme", "ann"),
        ("acme", "dee"),
    ]
    assert meter._partition_tenants == {(0, "acme")}


def test_a_tenant_another_held_partition_still_brings_stays_tracked(book: PriceBook) -> None:
    first = [
        FakeMessage(0, 10, user_usage("a", "acme", "ann")),
        FakeMessage(1, 5, user_usage("b", "acme", "bob")),
    ]
    log: list[str] = []
    consumer = RebalancingConsumer(log, [first, []])
    sinks = UserSinks(log)
    meter = Meter(Settings(), consumer, FakeProducer(log), sinks, book)
    consumer.on_revoke = meter.partitions_revoked
    meter.run_once()
    meter.run_once()
    assert meter._partition_tenants == {(0, "acme")}  # partition 1's pair went with it
    assert sinks.forgotten == [] and meter.live.tracked() == 2


def test_lost_partitions_and_a_stopping_process_leave_the_spend_keys(book: PriceBook) -> None:
    """Lost: the next owner may be writing those keys already. Stopping: a deploy must not empty every
    recent user's live spend; the keys stay as after a crash, until their windows expire."""
    log: list[str] = []
    consumer = HoldingConsumer(log, [[FakeMessage(0, 10, user_usage("a", "acme", "ann"))]])
    sinks = UserSinks(log)
    meter = Meter(Settings(), consumer, FakeProducer(log), sinks, book)
    meter.run_once()
    meter.drain()
    meter.partitions_lost(consumer, [TopicPartition("usage.raw", 0)])
    assert sinks.forgotten == [] and meter.live.tracked() == 0  # no longer tracked here
    consumer.batches.append([FakeMessage(1, 3, user_usage("b", "globex", "bob"))])
    meter.run_once()
    meter.drain()
    meter.close()
    meter.partitions_revoked(consumer, [TopicPartition("usage.raw", 1)])  # what consumer.close() calls
    assert sinks.forgotten == [] and meter.live.tracked() == 0


def test_storing_alerts_gives_up_while_postgres_is_away_once_the_process_stops() -> None:
    """Without ``should_stop`` a SIGTERM during a Postgres outage left stage 1 retrying here for ever."""
    sinks = Sinks(Settings(database_url="postgresql://postgres@127.0.0.1:9/nowhere"))
    alert = Alert(
        alert_id="anomaly.runaway_loop:acme:s-1:2025-07-02T10:00:00+00:00",
        kind="anomaly.runaway_loop",
        tenant_id="acme",
        scope={"conversation": "s-1"},
        period="minute:2025-07-02T10:00:00+00:00",
        current=Decimal(1),
        baseline=Decimal(0),
        message="acme/s-1: a loop?",
        details={},
        created_at=datetime(2025, 7, 2, 10, tzinfo=UTC),
    )
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        sinks.store_alerts([alert], should_stop=lambda: True)
    assert time.monotonic() - started < 10
