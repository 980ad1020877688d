"""The local stack answers real clients: confluent-kafka, psycopg and redis-py."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from deploy.isolation import drop_isolated, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from deploy.topics import ensure_topics
from sinks.migrate import available_migrations, migrate


def test_kafka_round_trip(stack: LocalStack, settings: Settings, unique: str) -> None:
    topic = f"test.roundtrip.{unique}"
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    producer.produce(topic, value=b"hello", key=b"tenant-a")
    assert producer.flush(20) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"g-{unique}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    got = None
    deadline = time.monotonic() + 30
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got = (msg.key(), msg.value())
    consumer.close()
    assert got == (b"tenant-a", b"hello")


def test_topics_ensure_is_idempotent(stack: LocalStack, settings: Settings) -> None:
    again = ensure_topics(settings)
    assert {c.action for c in again} == {"unchanged"}
    meta = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10)
    assert len(meta.topics[settings.topic_raw].partitions) == settings.topic_partitions


def test_created_topics_are_usable_when_ensure_returns(stack: LocalStack, settings: Settings, unique: str) -> None:
    # A caller (a worker, a test reading the layout) may ask any broker right away.
    own = isolated(settings, f"fresh{unique}")
    meta = AdminClient({"bootstrap.servers": own.kafka_bootstrap}).list_topics(own.topic_raw, timeout=10)
    topic = meta.topics[own.topic_raw]
    assert topic.error is None
    assert len(topic.partitions) == own.topic_partitions
    assert all(p.leader >= 0 for p in topic.partitions.values())


def test_an_isolated_pipeline_is_dropped_with_its_topics_and_nothing_else(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    own = isolated(settings, f"drop{unique}")
    admin = AdminClient({"bootstrap.servers": own.kafka_bootstrap})
    ensure_topics(own)  # Faust's changelog is made by the worker's start-up check: here, by hand
    made = [t for t in admin.list_topics(timeout=10).topics if t.startswith((f"tdrop{unique}.", f"wdrop{unique}-"))]
    assert own.topic_raw in made and f"wdrop{unique}-rollups-changelog" in made
    assert drop_isolated(own) == len(made)
    deadline = time.monotonic() + 15
    while (left := [t for t in made if t in admin.list_topics(timeout=10).topics]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
    assert settings.topic_raw in admin.list_topics(timeout=10).topics  # the stack's own topics stay
    with pytest.raises(ValueError, match="not an isolated pipeline"):
        drop_isolated(settings)


def test_postgres_migrations_recorded_and_usable(stack: LocalStack, settings: Settings, unique: str) -> None:
    assert migrate(settings.database_url) == []  # applied by `dev up` already
    with psycopg.connect(settings.database_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in available_migrations()]
        conn.execute(f"CREATE TEMP TABLE t_{unique} (v numeric)")
        conn.execute(f"INSERT INTO t_{unique} VALUES (0.000001), (0.1)")
        assert str(conn.execute(f"SELECT sum(v) FROM t_{unique}").fetchone()[0]) == "0.100001"


def test_redis_round_trip(stack: LocalStack, settings: Settings, unique: str) -> None:
    client = redis.Redis.from_url(settings.redis_url)
    client.set(f"test:{unique}", "42", ex=60)
    assert client.get(f"test:{unique}") == b"42"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=120)


def test_cli_status_env_and_idempotent_up(stack: LocalStack, settings: Settings) -> None:
    status = _cli("dev", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("up ") >= 3
    env = _cli("dev", "env").stdout
    assert f"export TOKENMETER_KAFKA_BOOTSTRAP={settings.kafka_bootstrap}" in env
    assert "export TOKENMETER_DATABASE_URL=" in env and "export TOKENMETER_REDIS_URL=" in env
    up = _cli("dev", "up")
    assert up.returncode == 0, up.stderr
    assert "already running" in up.stdout


def test_status_fails_when_a_service_is_down(stack: LocalStack) -> None:
    stack.stop_redis(progress=lambda _m: None)
    try:
        down = _cli("dev", "status")
        assert down.returncode == 1
        assert "redis" in down.stdout and "stopped" in down.stdout
    finally:
        stack.start_redis(progress=lambda _m: None)
    assert stack.redis_status().running
