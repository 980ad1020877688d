"""Secured connections: a local Kafka started as ``tokenmeter dev up --secure`` does (SASL/SCRAM-SHA-512,
ACLs on) refuses clients without valid credentials; the producer library, the worker (stage 1 with
confluent-kafka, stage 2 with Faust's aiokafka), lag and the CLI work with the same TOKENMETER_KAFKA_*
settings; the least-privileged "service" user can write usage.raw and nothing else. Redis with a
password: the quota client works through the URL's credentials and is refused without them."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from deploy.isolation import WorkerProcess, env_for, free_port, isolated
from deploy.settings import LOCAL_ADMIN, Settings, kafka_config, local_kafka_security
from deploy.stack import LOCAL_SERVICE_USER, LocalStack
from producers import QuotaClient, UsageProducer
from streams.lag import measure_lag, wait_for_sinks
from tests.helpers import kafka_beside

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secured(stack: LocalStack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A one-node Kafka with SASL/SCRAM and ACLs, beside the session stack's Postgres and Redis."""
    local = kafka_beside(settings, tmp_path_factory.mktemp("secured"), port_offset=60, secure=True)
    yield local
    local.stop_kafka(progress=lambda _m: None, kill=True)


def _as(settings: Settings, user: str, password: str) -> Settings:
    return settings.model_copy(update={"kafka_sasl_username": user, "kafka_sasl_password": SecretStr(password)})


def test_clients_without_valid_credentials_are_refused(secured: LocalStack) -> None:
    plaintext = {"bootstrap.servers": secured.settings.kafka_bootstrap, "log_level": 0}
    with pytest.raises(KafkaException):
        AdminClient(plaintext).list_topics(timeout=5)
    wrong = _as(secured.settings, LOCAL_ADMIN, "not-the-password")
    with pytest.raises(KafkaException):
        AdminClient(kafka_config(wrong, log_level=0)).list_topics(timeout=5)
    assert AdminClient(kafka_config(secured.settings)).list_topics(timeout=10).brokers  # the admin gets in


def test_a_stream_through_a_secured_cluster_is_metered(secured: LocalStack, tmp_path: Path) -> None:
    own = isolated(secured.settings, uuid.uuid4().hex[:10])
    LocalStack(own).grant_service_acls()  # the service user may write this pipeline's usage.raw
    security = local_kafka_security(own.home)
    assert security is not None
    service = _as(own, LOCAL_SERVICE_USER, security["users"][LOCAL_SERVICE_USER])
    worker = WorkerProcess(own.model_copy(update={"metrics_port": free_port()}), tmp_path)
    worker.start()
    tenant = f"secure-{uuid.uuid4().hex[:6]}"
    try:
        producer = UsageProducer(service)  # a service's credentials: write usage.raw, nothing else
        for i in range(50):
            producer.record(
                {
                    "tenant_id": tenant,
                    "provider": "openai",
                    "model": "gpt-4o-mini",
                    "input_tokens": 100 + i,
                    "output_tokens": 20,
                    "event_id": f"{tenant}-{i}",
                }
            )
        assert producer.flush(30) == 0
        producer.close()
        assert wait_for_sinks(own, timeout=180), worker.output()
        assert wait_for_sinks(own, timeout=120, topic=own.topic_rollups, group=own.worker_id), worker.output()
        with psycopg.connect(own.database_url) as conn:
            calls = conn.execute("SELECT count(*) FROM tokenmeter.ledger WHERE tenant_id = %s", (tenant,)).fetchone()
        assert calls == (50,)
        assert sum(p.lag for p in measure_lag(own)) == 0
        assert worker.alive(), worker.output()
    finally:
        worker.stop()
    # Least privilege: the service user cannot read usage.raw nor write a budget.
    reader = Consumer(kafka_config(service, **{"group.id": f"g-{tenant}", "log_level": 0}))
    reader.subscribe([own.topic_raw])
    denied = None
    deadline = time.monotonic() + 20
    while denied is None and time.monotonic() < deadline:
        msg = reader.poll(0.5)
        if msg is not None and msg.error() is not None:
            denied = msg.error()
    reader.close()
    assert denied is not None and "AUTHORIZATION" in denied.name(), denied
    failures: list[str] = []
    writer = Producer(kafka_config(service, log_level=0, **{"message.timeout.ms": 10_000}))
    writer.produce(own.topic_budgets, key=b"k", value=b"{}", on_delivery=lambda err, _m: failures.append(str(err)))
    writer.flush(20)
    assert failures and "AUTHORIZATION" in failures[0], failures


def test_the_cli_reads_the_security_settings(secured: LocalStack) -> None:
    """`dev env` of a secured stack prints the credentials; `topics ensure` works with them."""
    env = {
        **env_for(secured.settings),
        "TOKENMETER_HOME": str(secured.home),
        "TOKENMETER_KAFKA_PORT": str(secured.settings.kafka_port),
        "TOKENMETER_KAFKA_CONTROLLER_PORT": str(secured.settings.kafka_controller_port),
    }
    for name in ("KAFKA_BOOTSTRAP", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
        env.pop(f"TOKENMETER_{name}", None)  # the local stack's defaults: its address and its admin
    printed = subprocess.run(
        [sys.executable, "-m", "deploy", "dev", "env"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "TOKENMETER_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT" in printed
    assert f"TOKENMETER_KAFKA_SASL_USERNAME={LOCAL_ADMIN}" in printed
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "topics", "ensure"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def redis_with_password(stack: LocalStack, tmp_path: Path) -> Iterator[tuple[int, str]]:
    port, password = free_port(), uuid.uuid4().hex
    server = subprocess.Popen(
        [str(stack._redis_bin()), "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password, "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=port, password=password).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield port, password
    server.terminate()
    server.wait(10)


def test_quota_client_authenticates_to_redis_through_the_url(
    settings: Settings, redis_with_password: tuple[int, str]
) -> None:
    port, password = redis_with_password
    allowed = QuotaClient(settings.model_copy(update={"redis_url": f"redis://:{password}@127.0.0.1:{port}/0"}))
    assert allowed.check("tenant-a").allowed
    assert allowed.reserve("tenant-a", Decimal("0.01")).allowed
    anonymous = QuotaClient(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"}))
    with pytest.raises(redis.AuthenticationError):
        anonymous.redis.ping()
