"""Shared helpers for integration tests against the real local stack."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.isolation import WorkerProcess, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from streams.lag import with_broker_retries


def create_topic(settings: Settings, name: str, partitions: int = 2) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(timeout=30)


def read_all(settings: Settings, topic: str, expect: int | None = None, timeout: float = 30.0) -> list[bytes]:
    """Every committed message of a topic from the beginning (stops at `expect` or when caught up)."""
    return [value for _key, value in read_keyed(settings, topic, expect, timeout)]


def read_keyed(
    settings: Settings, topic: str, expect: int | None = None, timeout: float = 30.0
) -> list[tuple[bytes | None, bytes]]:
    """``read_all`` with each message's key."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {
            p.partition: with_broker_retries(partial(consumer.get_watermark_offsets, p, timeout=10))[1] for p in parts
        }
        consumer.assign(parts)
        values: list[tuple[bytes | None, bytes]] = []
        deadline = time.monotonic() + timeout
        positions = dict.fromkeys(ends, 0)
        while time.monotonic() < deadline:
            if expect is None and all(positions[p] >= ends[p] for p in ends):
                break
            if expect is not None and len(values) >= expect:
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                raise KafkaException(msg.error())
            positions[msg.partition()] = msg.offset() + 1
            values.append((msg.key(), msg.value()))
        return values
    finally:
        consumer.close()


def kafka_beside(settings: Settings, home: Path, port_offset: int, nodes: int = 1, secure: bool = False) -> LocalStack:
    """A second local Kafka (``nodes`` nodes, SASL/SCRAM when ``secure``) on ports ``port_offset`` above the
    session stack's, state under ``home``, started; Postgres and Redis stay the session stack's."""
    base = settings.model_copy(
        update={
            "home": home,
            "kafka_port": settings.kafka_port + port_offset,
            "kafka_controller_port": settings.kafka_controller_port + port_offset,
        }
    )
    bootstrap = ",".join(f"127.0.0.1:{base.local_kafka_port(n)}" for n in range(1, nodes + 1))
    local = LocalStack(base.model_copy(update={"kafka_bootstrap": bootstrap}))
    local.start_kafka(progress=lambda _m: None, nodes=nodes, secure=secure)
    return local


@contextmanager
def worker_running(settings: Settings, work_dir: Path) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker on its own topics and group (``deploy.isolation.isolated``) for a module's tests; fails the
    tests if it died meanwhile."""
    own = isolated(settings, uuid.uuid4().hex[:10])
    worker = WorkerProcess(own, work_dir)
    worker.start()
    try:
        yield own, worker
        alive = worker.alive()
    finally:
        worker.stop()
    assert alive, "the worker died during the tests:\n" + worker.output()
