"""Stage 1 of the worker: usage.raw → validate, de-duplicate, price → Postgres, Redis, output topics.

This stage reads ``usage.raw`` with confluent-kafka in batches (``TOKENMETER_WORKER_BATCH_SIZE``)
rather than through a Faust stream: Faust costs tens of microseconds per event before any of our
work (the same pipeline on ``stream.take_events`` ran at ~1,500 events/s here; see the README's
figures), while every stage below works on whole batches. Faust runs stage 2 (``streams/app.py``)
over ``metering.rollups``, a stream a batch's worth smaller.

Per batch, in this order:
1. decode + validate each message (``streams.pipeline``); rejects are bound for ``usage.dlq``;
2. drop ids already committed by this worker, price the rest (``PriceBook``);
3. Postgres: ledger ``ON CONFLICT DO NOTHING`` + rollups in one transaction, which returns the
   absolute totals of every window the batch touched; then Redis gets those totals (``SET``);
4. produce the dead letters, priced events and the absolute rollups; wait for Kafka's acks;
5. commit the batch's offsets.

Killed anywhere before 5, the batch is replayed: Postgres skips the ids it has, Redis and
``metering.rollups`` get the same absolute numbers again, so totals stay exact. Only the output
topics can carry a repeat (same ``event_id``, same rollup key and values).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from deploy.settings import Settings
from schemas import codec
from schemas.events import UsageEvent
from sinks.alerts import store_alerts
from sinks.postgres import BatchResult, PricedEvent, Rollup, money, write_batch
from sinks.redis import write_spend
from sinks.retry import with_backoff
from streams import metrics
from streams.anomaly import ConversationRates
from streams.overrides import override_follower
from streams.pipeline import Deduplicator, RawMessage, Rejected, dead_letter_record, decode_batch, price_batch
from streams.pricing import PriceBook

log = logging.getLogger("tokenmeter.meter")

# A batch is what arrived within this wait (or a full batch): short, because spend must reach the quota
# check within a second; under load batches fill long before it.
BATCH_WAIT_S = 0.05
SESSION_TIMEOUT_S = 10  # how long a killed worker's partitions wait before another worker takes them

write_priced = codec.record_writer("priced_event")
write_dead_letter = codec.record_writer("dead_letter")
write_alert = codec.record_writer("alert")
write_rollup_batch = codec.record_writer("rollup_batch")


def runaway_alerts(rates: ConversationRates, events: Sequence[UsageEvent], now: datetime) -> list[dict[str, Any]]:
    """Conversations (session, else trace) calling far above the norm: one alert per conversation and hour."""
    calls = [(e.tenant_id, e.session_id or e.trace_id, int(e.timestamp.timestamp()) // 60) for e in events]
    alerts = []
    for tenant, conversation, minute, finding in rates.observe(calls):
        hour = datetime.fromtimestamp(minute // 60 * 3600, UTC)
        alerts.append({
            "alert_id": f"anomaly.runaway_loop:{tenant}:{conversation}:{hour.isoformat()}",
            "kind": "anomaly.runaway_loop", "tenant_id": tenant, "scope": {"conversation": conversation},
            "period": f"minute:{datetime.fromtimestamp(minute * 60, UTC).isoformat()}", "threshold_percent": None,
            "current": finding.current, "baseline": money(finding.baseline), "limit": None,
            "message": f"{tenant}/{conversation}: {finding.message} — a loop?",
            "details": {"ratio": str(finding.ratio), "rule": finding.rule}, "created_at": now,
        })  # fmt: skip
    return alerts


def priced_record(item: PricedEvent) -> dict[str, Any]:
    p = item.price
    return {
        "usage": item.event.model_dump(),
        "price_status": p.status,
        "input_cost": money(p.input_cost),
        "output_cost": money(p.output_cost),
        "total_cost": money(p.total_cost),
        "price_source": p.source,
        "currency": "USD",
    }


def rollup_record(r: Rollup) -> dict[str, Any]:
    return {
        "tenant_id": r.tenant_id, "dimension": r.dimension, "dimension_value": r.dimension_value,
        "granularity": r.granularity, "window_start": r.window_start, "calls": r.calls,
        "unpriced_calls": r.unpriced_calls, "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "cache_read_tokens": r.cache_read_tokens, "cache_write_tokens": r.cache_write_tokens, "cost": r.cost,
    }  # fmt: skip


def rollup_from_record(record: dict[str, Any], time_zone: str = "UTC") -> Rollup:
    return Rollup(
        tenant_id=record["tenant_id"], granularity=record["granularity"], window_start=record["window_start"],
        dimension=record["dimension"], dimension_value=record["dimension_value"], calls=record["calls"],
        unpriced_calls=record["unpriced_calls"], input_tokens=record["input_tokens"],
        output_tokens=record["output_tokens"], cache_read_tokens=record["cache_read_tokens"],
        cache_write_tokens=record["cache_write_tokens"], input_cost=Decimal(0), output_cost=Decimal(0),
        cost=record["cost"], time_zone=time_zone,
    )  # fmt: skip


# Minute windows per user or environment are the bulk of all windows and nothing downstream reads
# them live (Postgres has them for reports); the others go to metering.rollups and stage 2's table.
_NO_MINUTE_STREAM = frozenset({"user", "environment"})


def streamed(r: Rollup) -> bool:
    return r.granularity != "minute" or r.dimension not in _NO_MINUTE_STREAM


def meter_group(settings: Settings) -> str:
    return f"{settings.worker_id}-meter"


@dataclass
class MeterStats:
    batches: int = 0
    consumed: int = 0
    rejected: int = 0
    duplicates: int = 0
    inserted: int = 0
    unpriced: int = 0
    sink_seconds: float = 0.0
    busy_seconds: float = 0.0


_PG_DOWN = (psycopg.OperationalError, psycopg.InterfaceError)


class Sinks:
    """Postgres and Redis, retried with back-off while either is down (the batch waits, unacked)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pg: psycopg.Connection | None = None
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5.0)

    def _postgres(self) -> psycopg.Connection:
        if self._pg is None or self._pg.closed:
            self._pg = psycopg.connect(self.settings.database_url, connect_timeout=5)
        return self._pg

    def _drop_postgres(self) -> None:
        if self._pg is not None:
            self._pg.close()

    def write(self, priced: Sequence[PricedEvent], should_stop: Callable[[], bool] | None = None) -> BatchResult:
        """Postgres, then Redis; each retried while down. A Redis retry does not rewrite Postgres."""
        started = time.perf_counter()
        result = with_backoff(lambda: write_batch(self._postgres(), priced), _PG_DOWN, "Postgres",
                              on_failure=self._drop_postgres, should_stop=should_stop)  # fmt: skip
        written = time.perf_counter()
        with_backoff(lambda: write_spend(self.redis, result.rollups), (redis.RedisError,), "Redis",
                     should_stop=should_stop)  # fmt: skip
        metrics.SINK_SECONDS.labels(sink="postgres").observe(written - started)
        metrics.SINK_SECONDS.labels(sink="redis").observe(time.perf_counter() - written)
        metrics.BATCH_SIZE.labels(sink="postgres").observe(len(priced))
        metrics.BATCH_SIZE.labels(sink="redis").observe(len(result.rollups))
        return result

    def store_alerts(self, alerts: Sequence[dict[str, Any]]) -> set[str]:
        return with_backoff(lambda: store_alerts(self._postgres(), alerts), _PG_DOWN, "Postgres (alerts)",
                            on_failure=self._drop_postgres)  # fmt: skip

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        self.redis.close()


class Meter:
    def __init__(self, settings: Settings, book: PriceBook | None = None) -> None:
        self.settings = settings
        self.book = book or PriceBook()
        self.dedup = Deduplicator()
        self.conversations = ConversationRates()
        self.sinks = Sinks(settings)
        self.stats = MeterStats()
        self.stopping = False
        self.consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap, "group.id": meter_group(settings),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "partition.assignment.strategy": "cooperative-sticky",
            "fetch.wait.max.ms": 50, "queued.max.messages.kbytes": 65536,
            "session.timeout.ms": SESSION_TIMEOUT_S * 1000, "heartbeat.interval.ms": 2000,
        })  # fmt: skip
        self.consumer.subscribe([settings.topic_raw])
        self.producer = Producer({
            "bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all",
            "compression.type": "lz4", "linger.ms": 5, "batch.num.messages": 10000,
            # murmur2 like Kafka's Java clients and aiokafka, so Faust's stage 2 sees each tenant on the
            # partition its tables expect.
            "partitioner": "murmur2_random",
        })  # fmt: skip
        self._delivery_errors: list[str] = []
        self._lag_measured = 0.0

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

    def run_once(self, timeout: float = BATCH_WAIT_S) -> int:
        """Process one batch (whatever arrives within ``timeout``); return how many messages it had."""
        messages = self.consumer.consume(self.settings.worker_batch_size, timeout)
        if not messages:
            return 0
        started = time.perf_counter()
        raw = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            assert topic is not None and partition is not None and offset is not None  # set on fetched messages
            raw.append(RawMessage(topic, partition, offset, m.key(), m.value()))
        events, rejected = decode_batch(raw)
        fresh = self.dedup.fresh(events)
        priced = price_batch(self.book, fresh)
        runaways = runaway_alerts(self.conversations, fresh, datetime.now(UTC))
        try:
            sink_started = time.perf_counter()
            result = self.sinks.write(priced, should_stop=lambda: self.stopping) if priced else BatchResult(0, [])
            self.stats.sink_seconds += time.perf_counter() - sink_started
            self._publish(priced, rejected, result.rollups, runaways)
            self._commit(raw)
        except Exception:
            self._rewind(raw)  # the next run_once starts this batch again
            raise
        self.dedup.mark_seen(fresh)
        s = self.stats
        s.batches += 1
        s.consumed += len(raw)
        s.rejected += len(rejected)
        s.duplicates += len(events) - result.inserted
        s.inserted += result.inserted
        s.unpriced += sum(1 for p in priced if p.price.status == "unpriced")
        s.busy_seconds += time.perf_counter() - started
        self._count(len(raw), len(rejected), len(events) - result.inserted, priced, result)
        return len(raw)

    def _count(self, consumed: int, rejected: int, duplicates: int, priced: Sequence[PricedEvent],
               result: BatchResult) -> None:  # fmt: skip
        metrics.EVENTS_IN.labels(stage="meter").inc(consumed)
        metrics.DEAD_LETTERS.inc(rejected)
        metrics.DUPLICATES.inc(duplicates)
        metrics.UNPRICED.inc(sum(1 for p in priced if p.price.status == "unpriced"))
        metrics.EVENTS_OUT.labels(stage="meter", output="priced").inc(len(priced))
        metrics.EVENTS_OUT.labels(stage="meter", output="dlq").inc(rejected)
        metrics.count_spend(result.new_spend.items())
        if time.monotonic() - self._lag_measured > 1.0:
            self._lag_measured = time.monotonic()
            metrics.LAG.labels(stage="meter").set(self.behind())

    def behind(self) -> int:
        """Messages between this consumer's positions and the ends of its partitions, as last fetched."""
        assigned = self.consumer.assignment()
        behind = 0
        for position in self.consumer.position(assigned) if assigned else []:
            _low, high = self.consumer.get_watermark_offsets(position, cached=True)
            if position.offset >= 0 and high >= 0:
                behind += max(high - position.offset, 0)
        return behind

    def _publish(self, priced: Sequence[PricedEvent], rejected: Sequence[Rejected], rollups: Sequence[Rollup],
                 alerts: Sequence[dict[str, Any]] = ()) -> None:  # fmt: skip
        settings = self.settings
        if alerts:
            new = self.sinks.store_alerts(alerts)  # once per alert id, whatever replays repeat
            for alert in alerts:
                if alert["alert_id"] in new:
                    metrics.ALERTS.labels(kind=alert["kind"]).inc()
                    log.warning("alert %s: %s", alert["kind"], alert["message"])
                    self._produce(settings.topic_alerts_anomaly, alert["tenant_id"].encode(), write_alert(alert))
        now = datetime.now().astimezone()
        for bad in rejected:
            log.info("dead letter %s[%d]@%d: %s", bad.message.topic, bad.message.partition, bad.message.offset,
                     bad.reason[:200])  # fmt: skip
            self._produce(settings.topic_dlq, bad.message.key, write_dead_letter(dead_letter_record(bad, now)))
        for item in priced:
            self._produce(settings.topic_priced, item.event.tenant_id.encode(), write_priced(priced_record(item)))
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        zones: dict[str, str] = {}
        for r in rollups:
            if streamed(r):
                by_tenant.setdefault(r.tenant_id, []).append(rollup_record(r))
                zones[r.tenant_id] = r.time_zone
        for tenant, records in by_tenant.items():  # one message per tenant and batch: Faust pays per message
            batch = write_rollup_batch({"tenant_id": tenant, "time_zone": zones[tenant], "rollups": records})
            self._produce(settings.topic_rollups, tenant.encode(), batch)
        metrics.EVENTS_OUT.labels(stage="meter", output="rollups").inc(len(by_tenant))
        flushing = time.perf_counter()
        # At-least-once for the outputs: the batch is committed only once Kafka has all of them.
        while len(self.producer) > 0:
            self.producer.flush(1.0)
            if self.stopping and len(self.producer) > 0:
                raise RuntimeError("stopping with undelivered outputs; the batch will be replayed")
        metrics.SINK_SECONDS.labels(sink="kafka").observe(time.perf_counter() - flushing)
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            raise RuntimeError(f"{len(errors)} outputs were not delivered: {errors[0]}; the batch will be replayed")

    def _produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                return
            except BufferError:
                self.producer.poll(0.1)

    def _commit(self, raw: Sequence[RawMessage]) -> None:
        ends: dict[tuple[str, int], int] = {}
        for m in raw:
            ends[(m.topic, m.partition)] = max(ends.get((m.topic, m.partition), -1), m.offset + 1)
        if ends:
            # Asynchronous: librdkafka keeps commits in order; a lost one only means a replay, which is harmless.
            self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=True)

    def _rewind(self, raw: Sequence[RawMessage]) -> None:
        starts: dict[tuple[str, int], int] = {}
        for m in raw:
            starts[(m.topic, m.partition)] = min(starts.get((m.topic, m.partition), m.offset), m.offset)
        for (topic, partition), offset in starts.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except Exception as exc:  # revoked meanwhile: its new owner starts from the committed offset
                log.info("not rewinding %s[%d]: %s", topic, partition, exc)

    def close(self) -> None:
        self.stopping = True
        self.consumer.close()
        self.producer.flush(5.0)
        self.sinks.close()


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the worker process dies, so a killed worker leaves no stage 1 behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_stage_one(settings: Settings) -> None:
    """Entry point of stage 1's own process (``tokenmeter worker`` starts it): batches until SIGTERM.

    A process of its own, not a thread of the Faust worker: the two stages then use both cores
    instead of sharing one interpreter lock.
    """
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] [stage 1] %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    book = PriceBook()
    overrides = override_follower(settings, book)
    overrides.catch_up(5.0)  # price nothing before the overrides are in
    meter = Meter(settings, book)
    followed = time.monotonic()
    try:
        while not stop.is_set():
            if time.monotonic() - followed > 5.0:
                overrides.catch_up(0.0)
                followed = time.monotonic()
            try:
                meter.run_once(BATCH_WAIT_S)
            except Exception:
                if stop.is_set():
                    break
                log.exception("batch failed; it will be retried")
                stop.wait(1.0)
    finally:
        meter.close()
        overrides.close()
