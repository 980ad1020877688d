"""Scale-out on a 3-node Kafka cluster (``tokenmeter dev up --brokers 3``'s layout, on its own ports beside
the session's one-node stack): workers sharing one group while one worker and one broker are SIGKILLed
mid-stream and a third worker joins. Checked against independent computations: every distinct event
billed once at genai-prices' price, invoices equal to it, Redis spend equal to Postgres, and each budget
threshold the reference total crosses alerted exactly once (in Postgres, and at most once on Kafka)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from deploy.isolation import WorkerProcess, env_for, free_port, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas import codec
from schemas.records import TokenRates
from sinks.invoices import invoice
from streams.budgets import Budget
from streams.lag import wait_for_sinks
from streams.overrides import override_message
from streams.pricing import PriceOverride
from tests.faults.test_kills import send_budget
from tests.faults.test_outages import Traffic, billed_exactly_once_and_mirrored, reference
from tests.helpers import kafka_beside, read_all

pytestmark = [pytest.mark.integration, pytest.mark.faults]

NODES = 3


@pytest.fixture(scope="module")
def cluster(stack: LocalStack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A 3-node KRaft cluster (broker + controller each) next to the session stack's Postgres and Redis."""
    local = kafka_beside(settings, tmp_path_factory.mktemp("cluster"), port_offset=50, nodes=NODES)
    yield local
    local.stop_kafka(progress=lambda _m: None, kill=True)


def test_dev_status_json_lists_every_node(cluster: LocalStack) -> None:
    env = {**env_for(cluster.settings), "TOKENMETER_HOME": str(cluster.home)}
    env["TOKENMETER_KAFKA_PORT"] = str(cluster.settings.kafka_port)
    env["TOKENMETER_KAFKA_CONTROLLER_PORT"] = str(cluster.settings.kafka_controller_port)
    del env["TOKENMETER_KAFKA_BOOTSTRAP"]  # the default: every node the stack was created with
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "dev", "status", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    kafka = [rows[f"kafka-{n}"] for n in range(1, NODES + 1)]
    assert [row["port"] for row in kafka] == [cluster.settings.local_kafka_port(n) for n in range(1, NODES + 1)]
    assert all(row["up"] and row["pid"] for row in kafka), rows
    env_lines = subprocess.run(
        [sys.executable, "-m", "deploy", "dev", "env"], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert cluster.settings.kafka_bootstrap in env_lines


def test_workers_killed_added_and_a_broker_killed_bill_exactly_once(cluster: LocalStack, tmp_path: Path) -> None:
    own = isolated(cluster.settings, uuid.uuid4().hex[:10])
    meta = _topic_layout(own)
    assert meta == {"replicas": NODES, "min.insync.replicas": "2"}, meta
    tenants = [f"scale-{uuid.uuid4().hex[:6]}-{i}" for i in range(8)]  # spread over the 4 partitions
    limit = Decimal(6)
    send_budget(own, Budget(tenants[0], "tenant", "", "month", limit))
    workers = [
        WorkerProcess(own.model_copy(update={"metrics_port": free_port()}), tmp_path / f"w{n}") for n in range(3)
    ]
    for worker in workers:
        worker.log_dir.mkdir()
    workers[0].start()
    workers[1].start()
    try:
        with Traffic(own, tenants, rate=300) as traffic:
            time.sleep(10)
            workers[0].kill()  # its partitions go to the other worker after the session timeout
            cluster.stop_kafka(progress=lambda _m: None, kill=True, only=2)  # and one broker crashes
            time.sleep(8)
            workers[2].start()  # a third worker joins while the broker is still down
            time.sleep(8)
            cluster.start_kafka(progress=lambda _m: None, only=2)
            time.sleep(8)
        assert wait_for_sinks(own, timeout=240), "\n".join(w.output() for w in workers)
        billed_exactly_once_and_mirrored(own, traffic)
        expected = reference(traffic.sent)
        period = datetime.now(UTC).strftime("%Y-%m")
        with psycopg.connect(own.database_url) as conn:
            for tenant in tenants:
                assert invoice(conn, tenant, period).total == expected[tenant][0], tenant
        # Budget alerts: each threshold the reference total crossed, stored once; never twice on Kafka.
        crossed = {t for t in (50, 80, 100) if expected[tenants[0]][0] * 100 >= limit * t}
        assert crossed == {50, 80, 100}, expected[tenants[0]]  # the stream is long enough to cross them all
        assert wait_for_sinks(own, timeout=120, topic=own.topic_rollups, group=own.worker_id)
        stored = _stored_thresholds(own, tenants[0], crossed)
        assert Counter(stored) == Counter(crossed), (stored, "\n".join(w.output() for w in workers))
        published = [codec.decode("alert", value)["alert_id"] for value in read_all(own, own.topic_alerts_budget)]
        assert max(Counter(published).values(), default=0) == 1, published
        assert workers[1].alive() and workers[2].alive(), "\n".join(w.output() for w in workers)
    finally:
        for worker in workers:
            worker.stop()
        cluster.start_kafka(progress=lambda _m: None)  # whatever the test left down


def test_a_worker_started_with_a_broker_down_prices_and_judges_with_all_its_config(
    cluster: LocalStack, tmp_path: Path
) -> None:
    """With a broker down the config topics can take seconds to read (their partitions' leaders move). Stage 1
    used to price after 5 s whatever overrides it had, and stage 2 judged windows with the budgets it had, so a
    backlog read first was billed at list price and its budget's thresholds never alerted (a CI run: none of
    three). Now both wait until the topics are read to their end."""
    # Both config topics (one partition each) led by one node, the one killed below: the worker cannot read
    # them until the controller fences that node (KRaft's broker session timeout, 9 s).
    for _attempt in range(20):
        own = isolated(cluster.settings, uuid.uuid4().hex[:10])
        leaders = {leader_of(own, topic) for topic in (own.topic_price_overrides, own.topic_budgets)}
        if len(leaders) == 1:
            break
    assert len(leaders) == 1, "no two config topics with one leader in 20 tries"
    (doomed,) = leaders
    tenant = f"late-config-{uuid.uuid4().hex[:6]}"
    key, value = override_message(
        PriceOverride(
            tenant, "openai", "gpt-4o", datetime(2025, 1, 1, tzinfo=UTC), TokenRates(Decimal(1), Decimal(2)), "card-1"
        )
    )
    producer = Producer({"bootstrap.servers": own.kafka_bootstrap})
    producer.produce(own.topic_price_overrides, key=key, value=value)
    for n in range(40):  # other tenants' budgets: more to read
        other = Budget(f"other-{n}", "tenant", "", "month", Decimal(100))
        producer.produce(own.topic_budgets, key=other.key.encode(), value=other.to_json())
    budget = Budget(tenant, "tenant", "", "month", Decimal("0.01"))  # the first seconds cross it all
    producer.produce(own.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    assert producer.flush(15) == 0
    with Traffic(own, [tenant], rate=100) as traffic:  # the backlog the worker starts with (MODELS[0]: gpt-4o)
        time.sleep(4)
    worker = WorkerProcess(own, tmp_path)
    cluster.stop_kafka(progress=lambda _m: None, kill=True, only=doomed)
    try:
        time.sleep(6)  # started as the node is about to be fenced: Faust is ready before the config topics are read
        worker.start()
        assert wait_for_sinks(own, timeout=180), worker.output()
        with psycopg.connect(own.database_url) as conn:
            sources = conn.execute(
                "SELECT price_source, count(*) FROM tokenmeter.ledger WHERE tenant_id = %s GROUP BY 1", (tenant,)
            ).fetchall()
        assert sources == [("override:card-1", len({e["event_id"] for e in traffic.sent}))], sources
        assert wait_for_sinks(own, timeout=120, topic=own.topic_rollups, group=own.worker_id), worker.output()
        stored = _stored_thresholds(own, tenant, {50, 80, 100})
        assert sorted(stored) == [50, 80, 100], (stored, worker.output())
    finally:
        worker.stop()
        cluster.start_kafka(progress=lambda _m: None, only=doomed)


def leader_of(settings: Settings, topic: str) -> int:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + 30
    while True:  # the broker this client asks may not know a topic created a moment ago yet (a CI run: no partitions)
        partitions = list(admin.list_topics(topic, timeout=10).topics[topic].partitions.values())
        if (len(partitions) == 1 and partitions[0].leader >= 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (partition,) = partitions
    return int(partition.leader)


def _topic_layout(settings: Settings) -> dict[str, object]:
    from confluent_kafka.admin import AdminClient, ConfigResource

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topic_raw)
    # Just created: a node the request reaches may not know the topic for a moment (no partitions in its
    # metadata, UNKNOWN_TOPIC_OR_PART). ensure_topics waits for that; this test reads the layout anyway.
    deadline = time.monotonic() + 30
    partitions = admin.list_topics(settings.topic_raw, timeout=10).topics[settings.topic_raw].partitions
    while not partitions and time.monotonic() < deadline:
        time.sleep(0.2)
        partitions = admin.list_topics(settings.topic_raw, timeout=10).topics[settings.topic_raw].partitions
    while True:
        try:
            config = admin.describe_configs([resource])[resource].result()
            break
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    return {
        "replicas": min(len(p.replicas) for p in partitions.values()),
        "min.insync.replicas": config["min.insync.replicas"].value,
    }


def _stored_thresholds(settings: Settings, tenant: str, want: set[int], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(settings.database_url) as conn:
            rows = conn.execute(
                "SELECT threshold_percent FROM tokenmeter.alerts WHERE tenant_id = %s AND kind LIKE 'budget%%'",
                (tenant,),
            ).fetchall()
        found = [int(row[0]) for row in rows]
        if set(found) >= want or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
