"""Pipeline figures for ``tokenmeter bench`` (DESIGN.md §7), measured in one run on an isolated
pipeline of the running stack: own topics, worker and groups, a scratch Postgres database and Redis
database 15, dropped afterwards. The workload is ``deploy.bench.workload.usage_events``: 20 tenants
(a few big ones), their users, features and models, 1 % producer retries.

- ``bare_consume_events_per_s``: confluent-kafka consume + fastavro decode of the workload, nothing
  else: the ceiling for any Python consumer here.
- ``naive_postgres_events_per_s``: one ``INSERT`` per event in its own transaction, the approach in
  the guides, into a temporary table (not WAL-logged: the cheapest an INSERT per call can be);
  ``naive_durable_postgres_events_per_s``: the same into an ordinary table, durable as the ledger is.
  Each is the median of three rounds of 5,000 events (``NAIVE_ROUNDS``), before the worker starts.
- ``pipeline_events_per_s``: after an untimed warm-up (a fifth of the workload, at most 20,000 events)
  and once every stage-1 process holds partitions of usage.raw, the worker (``tokenmeter worker``, a
  subprocess) takes the workload from usage.raw through validation, de-duplication, pricing, Postgres,
  Redis and the output topics; events / (last commit - first produce).
- ``p99_event_to_quota_ms``: while background traffic flows at half ``pipeline_events_per_s``
  (``quota_background_events_per_s``: the rate reached; calls of the workload encoded once and sent by a
  bare producer, so the generator leaves the shared cores to the pipeline), single probe events are
  recorded through ``UsageProducer`` and the time until ``QuotaClient.check`` shows their spend is taken.
- ``stage_two_behind_s``: how long after stage 1 the Faust stage (table, alerts) finished the workload.
- ``p99_budget_alert_ms``: an event that crosses a hard budget, produced → its alert on alerts.budget
  (measured once stage 2 has caught up with the traffic before it).
- ``cpu_us_per_event``: CPU microseconds per event of stage 1, stage 2, Postgres, Kafka, Redis and the
  bench's own producer while the workload went through (``deploy/bench/cpu.py``).
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from deploy.bench.cpu import CpuMeter, Stack
from deploy.bench.workload import EncodedCalls, usage_events
from deploy.isolation import (
    WorkerProcess,
    committed_total,
    drop_isolated,
    isolated,
    scratch_stores,
    wait_for_commits,
)
from deploy.settings import Settings, kafka_config
from producers.producer import UsageProducer
from producers.quota import QuotaClient
from schemas import codec
from streams.budgets import Budget
from streams.lag import measure_lag, wait_for_sinks, with_broker_retries
from streams.meter import meter_group

STALL_S = 180.0  # no commit for this long mid-workload: the run fails with the worker's log instead of hanging
NAIVE_ROUNDS = 3  # the naive baselines: the median of this many rounds of 5,000 INSERTs


def produce_all(settings: Settings, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        kafka_config(
            settings,
            **{
                "linger.ms": 20,
                "compression.type": "lz4",
                "enable.idempotence": True,
                "batch.num.messages": 10000,
            },
        )
    )
    for key, value in payloads:
        while True:
            try:
                producer.produce(settings.topic_raw, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    producer.flush(60)


def encode(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(e["tenant_id"].encode(), codec.encode("usage_event", e)) for e in events]


def bare_consume(settings: Settings, expected: int) -> float:
    consumer = Consumer(
        kafka_config(settings, **{"group.id": f"bench-bare-{uuid.uuid4().hex}", "enable.auto.commit": False})
    )
    topic = settings.topic_raw
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    seen = 0
    started = time.perf_counter()
    while seen < expected:
        for message in consumer.consume(5000, 1.0):
            if message.error() is None:
                codec.decode("usage_event", message.value() or b"")
                seen += 1
    elapsed = time.perf_counter() - started
    consumer.close()
    return seen / elapsed


def wait_for_members(settings: Settings, timeout: float, worker: WorkerProcess) -> int:
    """Wait until stage 1's consumer group is stable with a member per stage-1 process (at most one per
    partition of usage.raw), each holding partitions; return how many. The first process to join takes
    every partition and the others join seconds later (imports, price book): timed from then, the burst
    would include their rebalance (partitions handed over and fetched anew), which a worker that has been
    running does not go through."""
    admin = AdminClient(kafka_config(settings))
    partitions = len(
        with_broker_retries(lambda: admin.list_topics(settings.topic_raw, timeout=10))
        .topics[settings.topic_raw]
        .partitions
    )
    wanted = min(settings.worker_meter_processes, partitions)
    group = meter_group(settings)
    deadline = time.monotonic() + timeout
    holding = 0
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"the worker exited:\n{worker.output()}")
        try:
            described = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
        except KafkaException:
            described = None
        if described is not None and described.state == ConsumerGroupState.STABLE:
            holding = sum(1 for m in described.members if m.assignment and m.assignment.topic_partitions)
            if holding >= wanted:
                return holding
        time.sleep(0.2)
    raise TimeoutError(f"{holding} of {wanted} stage-1 processes held partitions after {timeout:.0f}s")


def naive_postgres(
    settings: Settings, events: list[dict[str, Any]], durable: bool = False, rounds: int = NAIVE_ROUNDS
) -> float:
    """One autocommit INSERT per event into a table of the ledger's shape; the median rate of ``rounds``
    rounds, each over its own share of ``events`` (a single half-second round swung between 7,500 and
    12,400/s from run to run on the same box). ``durable``: an ordinary table, as the guides' ledger is
    (each commit waits for its WAL flush); else a temporary one, which Postgres does not WAL-log at all:
    the cheapest any INSERT-per-call design can be, and the issue's yardstick."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        # The ledger's shape with the de-duplicating key on event_id the naive approach needs (the
        # partitioned ledger keeps it in ledger_ids, which LIKE does not copy).
        table = "naive" if not durable else f"naive_{uuid.uuid4().hex[:8]}"
        conn.execute(
            f"CREATE {'' if durable else 'TEMP '}TABLE {table} (LIKE tokenmeter.ledger INCLUDING DEFAULTS"
            " INCLUDING CONSTRAINTS INCLUDING INDEXES, PRIMARY KEY (event_id))"
        )
        share = max(1, len(events) // rounds)
        shares = [events[i * share : (i + 1) * share] for i in range(rounds)]
        try:  # a tiny workload may not fill every round: an empty one measures nothing
            return statistics.median(_insert_one_by_one(conn, table, part) for part in shares if part)
        finally:
            conn.execute(f"DROP TABLE {table}")


def _insert_one_by_one(conn: psycopg.Connection, table: str, events: list[dict[str, Any]]) -> float:
    started = time.perf_counter()
    for e in events:
        conn.execute(
            f"INSERT INTO {table} (event_id, ts, tenant_id, provider, model, user_id, feature, input_tokens,"
            " output_tokens, cache_read_tokens, cache_write_tokens, price_status, input_cost, output_cost,"
            " total_cost, price_source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, 'priced', 0, 0, 0, '')"
            " ON CONFLICT DO NOTHING",
            (
                e["event_id"],
                e["timestamp"],
                e["tenant_id"],
                e["provider"],
                e["model"],
                e["user_id"],
                e["feature"],
                e["input_tokens"],
                e["output_tokens"],
                e["cache_read_tokens"],
            ),
        )
    return len(events) / (time.perf_counter() - started)


@dataclass(frozen=True)
class PipelineFigures:
    events: int
    pipeline_events_per_s: float
    bare_consume_events_per_s: float
    naive_postgres_events_per_s: float
    naive_durable_postgres_events_per_s: float
    p50_event_to_quota_ms: float
    p99_event_to_quota_ms: float
    quota_probes: int
    quota_check_p50_us: float
    quota_check_p99_us: float
    p50_budget_alert_ms: float
    p99_budget_alert_ms: float
    stage_two_behind_s: float
    quota_background_events_per_s: float  # the traffic the quota probes ran under (half the pipeline's rate)
    # CPU microseconds per event of each component while the workload went through both stages
    # (deploy/bench/cpu.py): the capacity model's input (README "Sizing").
    cpu_us_per_event: dict[str, float]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def quota_latency(
    settings: Settings, probes: int, background_per_s: int, spool: Path
) -> tuple[list[float], list[float], float]:
    """Probe events recorded one at a time under background traffic; ms until quota check shows them.
    Also returns the background rate actually reached (events/s)."""
    stop = threading.Event()
    sent = [0, 0.0]  # events, seconds

    def background() -> None:
        # Pre-encoded calls through a bare producer: the generator takes little of the two cores it shares
        # with the pipeline (the library's record() path at this rate took half a core away from it).
        traffic = EncodedCalls(seed=3)
        producer = Producer(kafka_config(settings, **{"linger.ms": 10, "compression.type": "lz4"}))
        began = time.perf_counter()
        n = 0
        while not stop.is_set():
            key, value = traffic.message(n, datetime.now(UTC))
            try:
                producer.produce(settings.topic_raw, key=key, value=value)
            except BufferError:
                producer.poll(0.05)
                continue
            n += 1
            if n % 256 == 0:
                producer.poll(0)
            ahead = began + n / background_per_s - time.perf_counter()
            if ahead > 0.001:  # paced by a schedule, not a sleep per event (which caps the rate)
                time.sleep(ahead)
        sent[0], sent[1] = n, time.perf_counter() - began
        producer.flush(30)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    client = QuotaClient(settings)
    to_visible: list[float] = []
    check_us: list[float] = []
    tenant = f"probe-{uuid.uuid4().hex[:8]}"
    try:
        with UsageProducer(settings.model_copy(update={"spool_dir": spool / "probe"})) as producer:
            expected = Decimal(0)
            for i in range(probes):
                started = time.perf_counter()
                producer.record(
                    {
                        "tenant_id": tenant,
                        "provider": "openai",
                        "model": "gpt-4o",
                        "input_tokens": 1000,
                        "output_tokens": 100,
                        "user_id": f"probe-{i}",
                    }
                )
                expected += Decimal("0.0035")
                while True:
                    if client.check(tenant).spent >= expected:
                        break
                    if time.perf_counter() - started > 30:
                        raise TimeoutError("a probe's spend did not reach Redis within 30 s")
                    time.sleep(0.002)
                to_visible.append((time.perf_counter() - started) * 1000)
                time.sleep(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    reached = sent[0] / sent[1] if sent[1] else 0.0
    wait_for_sinks(settings, timeout=120)  # the check alone is timed on a caught-up worker, as before
    for i in range(2000):  # the check alone, from a quiet process: what a service pays per call
        started = time.perf_counter()
        client.check(tenant, feature="search", user_id=f"probe-{i % probes}")
        check_us.append((time.perf_counter() - started) * 1e6)
    return to_visible, check_us, reached


def alert_latency(settings: Settings, probes: int, spool: Path) -> list[float]:
    """Ms from producing an event that crosses a hard budget to its alert on ``alerts.budget``."""
    quota = QuotaClient(settings)
    run = uuid.uuid4().hex[:6]
    tenants = [f"alert-{run}-{i}" for i in range(probes)]
    config = Producer(kafka_config(settings))
    for tenant in tenants:
        budget = Budget(tenant, "tenant", "", "month", Decimal(1), hard=True, thresholds=(100,))
        config.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    config.flush(10)
    deadline = time.monotonic() + 30
    while quota.check(tenants[-1]).limit is None:  # the worker has the budgets
        if time.monotonic() > deadline:
            raise TimeoutError("the worker did not apply the bench budgets")
        time.sleep(0.1)
    consumer = Consumer(kafka_config(settings, **{"group.id": f"bench-alerts-{run}", "enable.auto.commit": False}))
    topic = settings.topic_alerts_budget
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    ends = [
        TopicPartition(
            topic,
            p,
            with_broker_retries(partial(consumer.get_watermark_offsets, TopicPartition(topic, p), timeout=10))[1],
        )
        for p in partitions
    ]
    consumer.assign(ends)  # from now on: only alerts fired after this point
    latencies = []
    with UsageProducer(settings.model_copy(update={"spool_dir": spool / "alerts"})) as producer:
        for tenant in tenants:
            started = time.perf_counter()
            producer.record(
                {
                    "tenant_id": tenant,
                    "provider": "openai",
                    "model": "gpt-4o",
                    "input_tokens": 1_000_000,
                    "output_tokens": 0,
                }
            )  # $2.50: crosses the $1 budget
            while True:
                message = consumer.poll(0.05)
                ok = message is not None and message.error() is None
                if ok and codec.decode("alert", message.value() or b"")["tenant_id"] == tenant:  # type: ignore[union-attr]
                    break
                if time.perf_counter() - started > 30:
                    raise TimeoutError(f"no budget alert for {tenant} within 30 s")
            latencies.append((time.perf_counter() - started) * 1000)
    consumer.close()
    return latencies


def run_pipeline_bench(
    settings: Settings, events: int, work_dir: Path, say: Callable[[str], None] = lambda _m: None
) -> PipelineFigures:
    with scratch_stores(settings) as scratch:
        own = isolated(scratch, f"bench{uuid.uuid4().hex[:6]}")
        try:
            return _run_pipeline_bench(own, events, work_dir, say)
        finally:
            try:
                drop_isolated(own)
            except Exception as exc:  # never the run's result or its real error
                prefix = f"t{own.worker_id[1:]}."
                say(f"could not delete the bench's topics ({type(exc).__name__}: {exc}); they start with {prefix}")


def _run_pipeline_bench(own: Settings, events: int, work_dir: Path, say: Callable[[str], None]) -> PipelineFigures:
    data = usage_events(events, duplicates=0.01)
    payloads = encode(data)
    say(f"workload: {len(payloads):,} events (1% producer retries), {len({e['tenant_id'] for e in data})} tenants")
    # First, on a quiet box: measured after the pipeline, Postgres was still busy with what it had just
    # written (autovacuum) and the baseline swung between 7,500 and 12,400/s from run to run.
    say("naive per-call Postgres INSERT (temporary table, and an ordinary one)")
    naive = naive_postgres(own, data[: min(len(data), 5000 * NAIVE_ROUNDS)])
    naive_durable = naive_postgres(own, data[: min(len(data), 5000 * NAIVE_ROUNDS)], durable=True)

    worker = WorkerProcess(own, work_dir)
    worker.start(loglevel="warning")
    try:
        # A fifth of the workload (at most 20,000 events) first, untimed: the broker's JIT compiler, Postgres'
        # caches and the worker warm up on it as in a service that has been running (right after `dev up`
        # the broker alone took 3x the CPU per event, and the pipeline ran ~25 % slower).
        warmup = encode(usage_events(min(20_000, max(200, events // 5)), seed=2))
        produce_all(own, warmup)
        wait_for_commits(own, len(warmup), timeout=300, worker=worker)  # warm, idle
        wait_for_members(own, timeout=120, worker=worker)  # every stage-1 process holds partitions
        say("worker ready; producing the workload")
        assert worker.process is not None
        cpu = CpuMeter(Stack(worker.process.pid, str(own.home / "kafka"), own.postgres_port, own.redis_port))
        cpu.start()
        started = time.perf_counter()
        produce_all(own, payloads)
        produced_in = time.perf_counter() - started
        total = len(warmup) + len(payloads)
        last_report = 0.0
        last_count, moved_at = -1, time.perf_counter()
        while (count := committed_total(own)) < total:
            if not worker.alive():
                raise RuntimeError(f"the worker exited:\n{worker.output()}")
            if count != last_count:
                last_count, moved_at = count, time.perf_counter()
            elif time.perf_counter() - moved_at > STALL_S:  # the worker's own supervision should have said so
                lags = [(p.partition, p.committed, p.end) for p in measure_lag(own, own.topic_raw, meter_group(own))]
                raise RuntimeError(
                    f"no commit for {STALL_S:.0f}s at {count - len(warmup):,} / {len(payloads):,} "
                    f"(partition, committed, end: {lags}); the worker's log:\n{worker.output()[-20_000:]}"
                )
            if time.perf_counter() - last_report > 2:
                last_report = time.perf_counter()
                say(f"  {count - len(warmup):,} / {len(payloads):,} through the pipeline")
            time.sleep(0.02)
        stage_one_done = time.perf_counter()
        pipeline = len(payloads) / (stage_one_done - started)
        say(f"pipeline: {pipeline:,.0f} events/s (producing took {produced_in:.1f}s)")
        # Stage 2 (Faust: windowed table, budget and anomaly alerts) follows metering.rollups behind it.
        if not wait_for_sinks(own, 600, topic=own.topic_rollups, group=own.worker_id):
            raise TimeoutError("stage 2 did not catch up within 10 minutes")
        stage_two_behind = time.perf_counter() - stage_one_done
        cpu.stop()
        say(f"stage 2 caught up {stage_two_behind:.1f}s after stage 1")
        say("CPU µs per event: " + ", ".join(f"{k} {v}" for k, v in cpu.per_event_us(len(payloads)).items()))

        # The goal (#15) is for half of the pipeline's measured maximum: a busy, not saturated, worker.
        background = max(1000, int(pipeline / 2))
        say(f"quota visibility under background traffic ({background:,} events/s, half the pipeline's rate)")
        to_visible, check_us, reached = quota_latency(own, probes=100, background_per_s=background, spool=work_dir)
        say("budget alert latency (stage 2 caught up first)")
        wait_for_sinks(own, 600, topic=own.topic_rollups, group=own.worker_id)
        to_alert = alert_latency(own, probes=20, spool=work_dir)
    finally:
        worker.stop()

    say("bare consume + decode loop")
    bare = bare_consume(own, total)
    return PipelineFigures(
        events=len(payloads),
        pipeline_events_per_s=round(pipeline, 1),
        bare_consume_events_per_s=round(bare, 1),
        naive_postgres_events_per_s=round(naive, 1),
        naive_durable_postgres_events_per_s=round(naive_durable, 1),
        p50_event_to_quota_ms=round(_percentile(to_visible, 0.5), 1),
        p99_event_to_quota_ms=round(_percentile(to_visible, 0.99), 1),
        quota_probes=len(to_visible),
        quota_check_p50_us=round(_percentile(check_us, 0.5), 1),
        quota_check_p99_us=round(_percentile(check_us, 0.99), 1),
        p50_budget_alert_ms=round(_percentile(to_alert, 0.5), 1),
        p99_budget_alert_ms=round(_percentile(to_alert, 0.99), 1),
        stage_two_behind_s=round(stage_two_behind, 1),
        quota_background_events_per_s=round(reached, 1),
        cpu_us_per_event=cpu.per_event_us(len(payloads)),
    )
