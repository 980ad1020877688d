"""How far behind the worker is: committed offsets of its consumer group against the topic ends.

The worker commits a batch's offsets only after Postgres and Redis hold it, so "committed offset ≥
end offset at the time of the call" means everything produced before the call has reached the sinks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from deploy.settings import Settings, kafka_config
from producers.kafka_logging import logged
from streams.meter import meter_group

T = TypeVar("T")


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int  # -1: nothing committed yet
    start: int  # the oldest offset still in the topic
    end: int

    @property
    def lag(self) -> int:
        return self.end - max(self.committed, self.start)


def _consumer(settings: Settings, group: str) -> Consumer:
    return Consumer(kafka_config(settings, **{"group.id": group, "enable.auto.commit": False}, **logged()))


def with_broker_retries(call: Callable[[], T], within_s: float = 30.0) -> T:
    """Retry a broker query while leadership or the group coordinator settles: right after start-up or
    topic creation, or while the cluster moves a dead broker's partitions to another (seconds)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            error = exc.args[0]
            if time.monotonic() > deadline or (not error.retriable() and error.code() not in _TRANSIENT):
                raise
            time.sleep(0.2)


_TRANSIENT = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    # The partition's leader went away (a broker down): the query is retried once a new leader is known.
    KafkaError._DESTROY_BROKER,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
)


def measure_lag(settings: Settings, topic: str | None = None, group: str | None = None) -> list[PartitionLag]:
    topic = topic or settings.topic_raw
    group = group or meter_group(settings)
    consumer = _consumer(settings, group)
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise RuntimeError(f"topic {topic} does not exist; run `tokenmeter topics ensure`")
        partitions = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
        committed = with_broker_retries(lambda: list(consumer.committed(partitions, timeout=10)))
        result = []
        for tp in committed:
            low, high = with_broker_retries(
                partial(consumer.get_watermark_offsets, TopicPartition(topic, tp.partition), timeout=10)
            )
            offset = tp.offset if tp.offset >= 0 else -1
            result.append(PartitionLag(topic, tp.partition, offset, low, high))
        return result
    finally:
        consumer.close()


def wait_for_sinks(
    settings: Settings,
    timeout: float,
    topic: str | None = None,
    group: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> bool:
    """Wait until everything produced before the call is committed by the worker; False on timeout."""
    targets = {p.partition: p.end for p in measure_lag(settings, topic, group)}
    deadline = time.monotonic() + timeout
    while True:
        current = measure_lag(settings, topic, group)
        behind = sum(max(0, targets[p.partition] - max(p.committed, p.start)) for p in current)
        if on_progress is not None:
            on_progress(behind)
        if behind == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
