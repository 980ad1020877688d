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

Two batches overlap (``Meter.run_once``): N is in the sinks on a sink thread while N+1 is decoded and
priced here, and N+1 goes to the sinks while N is published and committed here; the order of each
batch's steps and of the commits stays as above, and a failure rewinds both.

Killed anywhere before 5, the batch is replayed (and the next one, if it was in the sinks already):
Postgres skips the ids it has, Redis and ``metering.rollups`` get the same absolute numbers again, so
totals stay exact. Only the output topics can carry a repeat (same ``event_id``, same rollup key and
values).

Failure policy (README "Failure handling"): every error is either
- *transient* (``transient_reason``: Postgres, Redis or Kafka unreachable or busy): retried with
  back-off, never skipped; the batch waits, the stage reports it, and supervision
  (``streams/health.py``) makes the worker exit if it lasts longer than the stall timeout;
- *about one record* (anything else: bad data that got past validation, a value a sink refuses): the
  batch is split in halves until the record is alone, which goes to ``usage.dlq`` with the reason
  (stage ``process``); the rest of the batch is billed.
Stages that bill nothing (runaway detection, its alerts) run in ``optional``: a failure there is
logged and counted, never allowed to hold a batch back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar, cast

import psycopg
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from deploy.settings import Settings, kafka_config, redis_client
from producers.kafka_logging import logged
from schemas import codec
from schemas.events import UsageEvent
from schemas.records import Alert, PricedEvent, Rollup, money
from schemas.redis_keys import TAG_DIMENSION_PREFIX, freshness_key
from sinks.alerts import store_alerts
from sinks.postgres import (
    BatchResult,
    complete_tag_scopes,
    ensure_tag_rollups,
    mark_tag_scopes_stale,
    scope_rollups,
    write_batch,
)
from sinks.redis import delete_keys, forget_keys, prune_freshness, write_freshness, write_spend
from sinks.retry import with_backoff
from streams import heap, metrics
from streams.anomaly import ConversationRates
from streams.budgets import parse_config_record
from streams.config_topic import ConfigFollower
from streams.health import StageStatus
from streams.live import NAMED_ONLY_DIMENSIONS, LiveScopes, NamedScopes
from streams.overrides import override_follower
from streams.pipeline import (
    Deduplicator,
    RawMessage,
    RecentIds,
    Rejected,
    dead_letter_record,
    decode_batch,
    price_batch,
)
from streams.pricing import PriceBook

log = logging.getLogger("tokenmeter.meter")

# A batch is what arrived within this wait (or a full batch): short, because spend must reach the quota
# check within a second; under load batches fill long before it.
BATCH_WAIT_S = 0.05
UNMOVED_WARNING_S = 30.0  # a partition behind whose position stays put this long is logged (once)
END_QUERY_INTERVAL_S = 10.0  # a partition never fetched: its end offset asked of the broker at most this often
STORED_ALERT_IDS = 10_000  # runaway alert ids remembered as stored (an id is per conversation and hour)
SESSION_TIMEOUT_S = 10  # how long a killed worker's partitions wait before another worker takes them

write_priced = codec.record_writer("priced_event")
write_priced_after_usage = codec.record_writer_after_first("priced_event")
write_dead_letter = codec.record_writer("dead_letter")
write_alert = codec.record_writer("alert")
write_rollup_batch = codec.record_writer("rollup_batch")


def runaway_alerts(rates: ConversationRates, events: Sequence[UsageEvent], now: datetime) -> list[Alert]:
    """Conversations (session, else trace) calling far above the norm: one alert per conversation and hour."""
    calls = [(e.tenant_id, e.session_id or e.trace_id, int(e.timestamp.timestamp()) // 60) for e in events]
    alerts = []
    for tenant, conversation, minute, finding in rates.observe(calls):
        hour = datetime.fromtimestamp(minute // 60 * 3600, UTC)
        alerts.append(
            Alert(
                alert_id=f"anomaly.runaway_loop:{tenant}:{conversation}:{hour.isoformat()}",
                kind="anomaly.runaway_loop",
                tenant_id=tenant,
                scope={"conversation": conversation},
                period=f"minute:{datetime.fromtimestamp(minute * 60, UTC).isoformat()}",
                current=finding.current,
                baseline=money(finding.baseline),
                message=f"{tenant}/{conversation}: {finding.message} — a loop?",
                details={"ratio": str(finding.ratio), "rule": finding.rule},
                created_at=now,
            )
        )
    return alerts


def _price_fields_are_known() -> bool:
    """Whether ``priced_event``'s fields after ``usage`` are the ones ``priced_message`` writes itself."""
    fields = codec.latest("priced_event").parsed["fields"][1:]
    decimal = {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": MONEY_SCALE}
    status = fields[0]["type"] if fields else None
    return (
        [f["name"] for f in fields] == list(PRICE_FIELDS)
        and isinstance(status, dict)
        and [status.get("type"), status.get("symbols")] == ["enum", ["priced", "unpriced"]]
        and [f["type"] for f in fields[1:]] == [decimal, decimal, decimal, "string", "string"]
    )


PRICE_FIELDS = ("price_status", "input_cost", "output_cost", "total_cost", "price_source", "currency")
MONEY_SCALE = 12
PRICED_HEADER = codec.MAGIC + codec.latest("priced_event").fingerprint
WRITE_PRICE_FIELDS = _price_fields_are_known()  # else (a new schema version) the generic writer
_STATUS_INDEX = {"priced": 0, "unpriced": 2}
_source_tails: dict[str, bytes] = {}  # price_source → its encoding and the currency's (one per model or override)


def priced_message(item: PricedEvent) -> bytes:
    """The ``usage.priced`` message of an event: its Avro body as received plus the price, when it came
    in the newest usage schema (no second encoding of the event), else encoded in full.

    The price fields are written here rather than by the generic writer (~2 µs instead of ~4.5 per event, a
    tenth of stage 1's busiest thread); byte for byte the same (property-tested in ``tests/streams``)."""
    body = item.usage_avro
    if body is None:
        return write_priced(item.to_avro())
    price = item.price
    if not WRITE_PRICE_FIELDS:
        return write_priced_after_usage(body, item.price_fields())
    out = bytearray(PRICED_HEADER)
    out += body
    out.append(_STATUS_INDEX[price.status])  # the enum's index, zigzag-encoded (a status not in it: KeyError)
    write_money = codec.write_rounded_decimal
    write_money(out, price.input_cost, MONEY_SCALE)
    write_money(out, price.output_cost, MONEY_SCALE)
    write_money(out, price.input_cost + price.output_cost, MONEY_SCALE)
    tail = _source_tails.get(price.source)
    if tail is None:
        if len(_source_tails) > 10_000:  # override ids come and go: keep it bounded
            _source_tails.clear()
        encoded = bytearray()
        codec.write_string(encoded, price.source)
        codec.write_string(encoded, "USD")  # the currency (priced events are in USD)
        tail = _source_tails[price.source] = bytes(encoded)
    out += tail
    return bytes(out)


def streamed(r: Rollup) -> bool:
    """Stage 2 reads hour and day windows (anomaly rules), day/week/month (budgets) and model months
    (unknown models); minute windows are the bulk of all and it reads none of them."""
    return r.granularity != "minute"


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


T = TypeVar("T")

# A rollup_batch message carries at most this many windows (~300-600 bytes each): a tenant with thousands
# of users in one batch is split over several messages, each far under the broker's ~1 MB limit.
ROLLUPS_PER_MESSAGE = 500
# Postgres errors about the data of a record (SQLSTATE classes): invalid values, constraint violations,
# limits exceeded. Every other Postgres error is about the server or the connection, so it is retried.
_PG_RECORD_CLASSES = frozenset({"22", "23", "54"})
# Delivery errors Kafka will never get past by retrying the same message.
_KAFKA_RECORD_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD})


@dataclass(frozen=True)
class Prepared:
    """A batch decoded, de-duplicated and priced, ready for the sinks."""

    raw: Sequence[RawMessage]
    events: list[UsageEvent]
    rejected: list[Rejected]
    fresh: list[UsageEvent]
    priced: list[PricedEvent]
    consumed_ms: int
    seconds: float  # spent preparing it

    @property
    def fresh_ids(self) -> set[str]:
        return {e.event_id for e in self.fresh}


@dataclass(frozen=True)
class Written:
    """What the sinks did with a batch: the result, and the windows stage 2 gets (``streamed`` ones of live
    scopes), chosen on the sink thread right after the write: it owns ``live``, which the next batch's write
    changes while this thread publishes."""

    result: BatchResult
    streamed: list[Rollup]


@dataclass(frozen=True)
class Pipelined:
    """The batch in the sinks (on the sink thread) while the next one is prepared, or the one before it
    published."""

    batch: Prepared
    write: Future[Written]


class CommitFailed(RuntimeError):
    """The consumer could not commit a batch's offsets (a transient failure: the batch is replayed)."""


class RewindFailed(RuntimeError):
    """A failed batch's partition, still assigned, could not be rewound: the process must stop without
    committing anything more (a later commit would pass over the batch), and be restarted."""


class Stopping(RuntimeError):
    """The worker is stopping mid-batch; the batch is replayed by whoever starts next."""


class OutputsNotDelivered(RuntimeError):
    """Kafka did not acknowledge some outputs of a batch after its own retries (transient)."""


class OutputRefused(RuntimeError):
    """Kafka refused an output for what it is (too large, invalid): a record-level failure."""


def postgres_transient(exc: BaseException) -> bool:
    """Connection, resource and concurrency errors are transient; data errors belong to a record."""
    if isinstance(exc, psycopg.InterfaceError):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is None:  # no server answer at all: a connection failure
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate[:2] not in _PG_RECORD_CLASSES


def describe_postgres_failure(exc: BaseException) -> str:
    """A retried Postgres failure in words: a statement refused for the schema or grants (SQLSTATE classes
    42 and 0A: a missing table or privilege) is not the server being away, and says what fixes it."""
    text = str(exc).strip()[:200]
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate[:2] in ("42", "0A"):
        return (
            f"Postgres refused the statement (SQLSTATE {sqlstate}: {text}); the schema or grants are not what "
            "this version expects: run `tokenmeter db migrate` (and roles.sql where roles are used)"
        )
    return f"Postgres unavailable ({text})"


# Redis failures that pass: the server is away or busy, or a cluster is moving slots or promoting a replica
# (redis-py raises the cluster ones as ResponseError subclasses, which otherwise mean "refused").
REDIS_TRANSIENT: tuple[type[Exception], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.SlotNotCoveredError,
)


def transient_reason(exc: BaseException) -> str | None:
    """Which service a transient failure is waiting for ("postgres", "redis", "kafka", "stopping"),
    or None when the failure belongs to the data of some record in the batch."""
    if isinstance(exc, Stopping):
        return "stopping"
    if isinstance(exc, psycopg.Error):
        return "postgres" if postgres_transient(exc) else None
    if isinstance(exc, REDIS_TRANSIENT):
        return "redis"
    if isinstance(exc, OutputsNotDelivered | CommitFailed):
        return "kafka"
    return None


def optional(what: str, call: Callable[[], T], default: T) -> T:
    """Run a stage that bills nothing: on any failure log it, count it and go on with ``default``. Stopping
    is not a failure of the stage: it goes through, and the batch is replayed by the next start."""
    try:
        return call()
    except Stopping:
        raise
    except Exception:
        log.exception("%s failed; skipped for this batch (billing goes on)", what)
        metrics.OPTIONAL_FAILURES.labels(stage=what).inc()
        return default


class Sinks:
    """Postgres and Redis, retried with back-off while either is down (the batch waits, unacked)."""

    def __init__(self, settings: Settings, note: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.note = note
        self._pg: psycopg.Connection | None = None
        self.redis = redis_client(settings, socket_timeout=5.0)
        # The (tenant, tag name) pairs that get tag rollups: Meter points this at its LiveScopes' snapshot.
        self.tag_dimensions: Callable[[], frozenset[tuple[str, str]]] = frozenset
        # Until called once: where the pairs Postgres records complete go before the first batch is written
        # (``NamedScopes.keep``), so no batch skips a tag whose rollups are recorded complete. Part of the
        # write, so Postgres being down at the start is the write's transient failure (retried, reported).
        self.keep_complete_tags: Callable[[set[tuple[str, str]]], None] | None = None

    def _postgres(self) -> psycopg.Connection:
        if self._pg is None or self._pg.closed:
            # A statement that hangs (a half-open connection) must end as an error the batch retries.
            self._pg = psycopg.connect(
                self.settings.database_url,
                connect_timeout=5,
                keepalives=1,
                keepalives_idle=30,
                options="-c statement_timeout=120000",
            )
        return self._pg

    def _drop_postgres(self) -> None:
        if self._pg is not None:
            self._pg.close()

    def write(
        self,
        priced: Sequence[PricedEvent],
        should_stop: Callable[[], bool] | None = None,
        live: Callable[[Sequence[Rollup], list[str]], list[Rollup]] | None = None,
    ) -> BatchResult:
        """Postgres, then Redis (the windows ``live`` selects); each retried while down. A Redis retry does
        not rewrite Postgres."""
        if not priced:
            return BatchResult(0, [])
        started = time.perf_counter()
        result = with_backoff(
            lambda: self._write_postgres(priced),
            (psycopg.Error,),
            "Postgres",
            on_failure=self._drop_postgres,
            should_stop=should_stop,
            retry_if=postgres_transient,
            describe=describe_postgres_failure,
            note=self.note,
        )
        written = time.perf_counter()
        forget: list[str] = []
        self.write_spend(result.rollups if live is None else live(result.rollups, forget), should_stop, forget)
        metrics.SINK_SECONDS.labels(sink="postgres").observe(written - started)
        metrics.SINK_SECONDS.labels(sink="redis").observe(time.perf_counter() - written)
        metrics.BATCH_SIZE.labels(sink="postgres").observe(len(priced))
        metrics.BATCH_SIZE.labels(sink="redis").observe(len(result.rollups))
        return dataclasses.replace(result, seconds=time.perf_counter() - started)

    def _write_postgres(self, priced: Sequence[PricedEvent]) -> BatchResult:
        conn = self._postgres()
        if self.keep_complete_tags is not None:
            self.keep_complete_tags(complete_tag_scopes(conn))
            self.keep_complete_tags = None
        return write_batch(conn, priced, self.tag_dimensions())

    def write_spend(
        self, rollups: Sequence[Rollup], should_stop: Callable[[], bool] | None = None, forget: Sequence[str] = ()
    ) -> None:
        """Redis mirrors Postgres' absolute totals: retried while Redis is down; an error Redis answers
        (the batch is billed already) is logged and counted, and the next batch of these windows repairs it."""
        try:
            with_backoff(
                lambda: write_spend(self.redis, rollups, forget=forget),
                REDIS_TRANSIENT,
                "Redis",
                should_stop=should_stop,
                note=self.note,
            )
        except redis.ResponseError:
            log.exception("Redis refused the spend of %d windows; they stay stale until their next batch", len(rollups))
            metrics.BATCH_FAILURES.labels(reason="redis_refused").inc()

    def refresh_spend(self, scopes: Sequence[tuple[str, str, str]]) -> None:
        """Write the open windows of these scopes from Postgres to Redis (one query and write each). A tag
        scope's rollups are first rebuilt from the ledger unless recorded complete (they exist only while a
        budget names the tag, so a restart finds them complete and rebuilds nothing)."""
        for tenant_id, tag_dimension in {(t, d) for t, d, _ in scopes if d.startswith(TAG_DIMENSION_PREFIX)}:
            ensure_tag_rollups(self._postgres(), tenant_id, tag_dimension.removeprefix(TAG_DIMENSION_PREFIX))
        for tenant_id, dimension, value in scopes:
            rollups = scope_rollups(self._postgres(), tenant_id, dimension, value)
            write_spend(self.redis, rollups)

    def mark_tags_stale(self, pairs: Collection[tuple[str, str]]) -> None:
        mark_tag_scopes_stale(self._postgres(), pairs)

    def write_freshness(self, key: str, member: str, caught_up_ms: int, now_ms: int) -> None:
        write_freshness(self.redis, key, member, caught_up_ms, now_ms)

    def prune_freshness(self, key: str, now_ms: int) -> None:
        prune_freshness(self.redis, key, now_ms)

    def forget_freshness(self, key: str, member: str) -> None:
        self.redis.hdel(key, member)

    def forget_spend(self, keys: Sequence[str]) -> None:
        """Delete spend keys once (not retried: keys left behind expire with their windows)."""
        delete_keys(self.redis, keys)

    def store_alerts(self, alerts: Sequence[Alert], should_stop: Callable[[], bool] | None = None) -> set[str]:
        """Store the alerts once; retried while Postgres is down, until ``should_stop`` (a stopping process
        must not hang here)."""
        return with_backoff(
            lambda: store_alerts(self._postgres(), alerts),
            (psycopg.Error,),
            "Postgres (alerts)",
            on_failure=self._drop_postgres,
            should_stop=should_stop,
            retry_if=postgres_transient,
            describe=describe_postgres_failure,
            note=self.note,
        )

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        self.redis.close()


class MeterConsumer(Protocol):
    """What stage 1 uses of a confluent-kafka ``Consumer`` (subscribed to ``usage.raw`` by ``build_meter``)."""

    def consume(self, num_messages: int, timeout: float) -> list[Message]: ...
    def assignment(self) -> list[TopicPartition]: ...
    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]: ...
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = ..., cached: bool = ...
    ) -> tuple[int, int]: ...
    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]: ...
    def commit(self, *, offsets: list[TopicPartition], asynchronous: Literal[True] = ...) -> None: ...
    def seek(self, partition: TopicPartition) -> None: ...
    def close(self) -> None: ...


class MeterProducer(Protocol):
    """What stage 1 uses of a confluent-kafka ``Producer`` (idempotent, acks=all)."""

    def produce(
        self, topic: str, *, value: bytes, key: bytes | None, on_delivery: Callable[[Any, Any], None]
    ) -> None: ...
    def flush(self, timeout: float) -> int: ...
    def poll(self, timeout: float) -> int: ...
    def __len__(self) -> int: ...


class MeterSinks(Protocol):
    """What stage 1 uses of ``Sinks``: the Postgres and Redis writes, each retried while down."""

    note: Callable[[str], None] | None
    tag_dimensions: Callable[[], frozenset[tuple[str, str]]]
    keep_complete_tags: Callable[[set[tuple[str, str]]], None] | None

    def write(
        self,
        priced: Sequence[PricedEvent],
        should_stop: Callable[[], bool] | None = None,
        live: Callable[[Sequence[Rollup], list[str]], list[Rollup]] | None = None,
    ) -> BatchResult: ...
    def refresh_spend(self, scopes: Sequence[tuple[str, str, str]]) -> None: ...
    def mark_tags_stale(self, pairs: Collection[tuple[str, str]]) -> None: ...
    def store_alerts(self, alerts: Sequence[Alert], should_stop: Callable[[], bool] | None = None) -> set[str]: ...
    def write_freshness(self, key: str, member: str, caught_up_ms: int, now_ms: int) -> None: ...
    def prune_freshness(self, key: str, now_ms: int) -> None: ...
    def forget_freshness(self, key: str, member: str) -> None: ...
    def forget_spend(self, keys: Sequence[str]) -> None: ...
    def close(self) -> None: ...


def build_meter(settings: Settings, book: PriceBook | None = None, status: StageStatus | None = None) -> Meter:
    """Stage 1 with its real clients: a consumer of ``usage.raw``, an idempotent producer, the sinks."""
    commits = Commits()
    consumer = Consumer(
        {
            **kafka_config(settings, **logged()),
            "group.id": meter_group(settings),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            "fetch.wait.max.ms": 50,
            # A batch (10,000 events, ~2.5 MB) in one fetch of the partition, not three: librdkafka's 1 MiB default
            # left the busiest partition's process waiting on the next fetch in the middle of a backlog.
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "queued.max.messages.kbytes": 65536,
            "session.timeout.ms": SESSION_TIMEOUT_S * 1000,
            "heartbeat.interval.ms": 2000,
            "on_commit": commits.answered,
        }
    )
    producer = Producer(
        {
            **kafka_config(settings, **logged()),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": settings.worker_compression,
            # Each batch's outputs end with a flush, which sends at once whatever linger holds: a long linger only
            # makes the batches the broker appends bigger and fewer (its CPU per event 15.7 -> 6-9 µs in the bench).
            "linger.ms": 100,
            "batch.num.messages": 10000,
            # Only failures come back to Python (``_on_delivery`` keeps nothing else): one callback per
            # published message was a measurable share of stage 1's thread.
            "delivery.report.only.error": True,
            # murmur2 like Kafka's Java clients and aiokafka, so Faust's stage 2 sees each tenant on the
            # partition its tables expect.
            "partitioner": "murmur2_random",
        }
    )
    meter = Meter(settings, consumer, producer, Sinks(settings), book or PriceBook(), status, commits)
    consumer.subscribe([settings.topic_raw], on_revoke=meter.partitions_revoked, on_lost=meter.partitions_lost)
    return meter


class Commits:
    """What stage 1 finished per partition, and whether Kafka refused a commit since. Commits are
    asynchronous: one refused during a rebalance (ILLEGAL_GENERATION) is lost, and a partition this process
    keeps but gets no new messages on would never be committed past it: its lag would stay, and a restart
    would replay it. So a refusal makes the next loop commit everything finished again."""

    def __init__(self) -> None:
        self.finished: dict[tuple[str, int], int] = {}  # next offset after the last batch finished
        self.refused = False

    def asked(self, ends: dict[tuple[str, int], int]) -> None:
        self.finished.update(ends)

    def answered(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_commit`` (served within ``consume``, on stage 1's thread)."""
        failed = [tp for tp in partitions if tp.error is not None]
        if err is None and not failed:
            return
        self.refused = True
        metrics.COMMIT_FAILURES.labels(stage="meter").inc(max(len(failed), 1))
        log.warning(
            "committing offsets failed (committed again next): %s",
            err or "; ".join(f"{tp.topic}[{tp.partition}]@{tp.offset}: {tp.error}" for tp in failed),
        )

    def forget(self, partitions: Collection[tuple[str, int]]) -> None:
        for key in partitions:
            self.finished.pop(key, None)

    def to_retry(self, assigned: Collection[tuple[str, int]]) -> list[TopicPartition]:
        """After a refusal: the finished offsets of the partitions still assigned (the others' new owners
        start from their commits). Never beyond what was finished; at worst behind a commit another owner
        made meanwhile, which only means a replay (the ledger ids make it harmless)."""
        if not self.refused:
            return []
        self.refused = False
        self.finished = {key: offset for key, offset in self.finished.items() if key in assigned}
        return [TopicPartition(topic, partition, offset) for (topic, partition), offset in self.finished.items()]


class Meter:
    """Stage 1 over injected clients (``build_meter`` makes the real ones; tests may pass in-memory ones)."""

    def __init__(
        self,
        settings: Settings,
        consumer: MeterConsumer,
        producer: MeterProducer,
        sinks: MeterSinks,
        book: PriceBook,
        status: StageStatus | None = None,
        commits: Commits | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.commits = commits or Commits()  # the real consumer reports to it (build_meter)
        self._committed_again_at = 0.0
        self._commit_synchronously = False  # while handing partitions over (partitions_revoked)
        self._failed_in_revoke: tuple[Exception, Sequence[RawMessage]] | None = None  # and the batch that failed
        self._queue_drained = True  # the last consume returned less than a full batch
        self._fetch_restarts: list[tuple[str, int]] = []  # partitions whose fetch the main thread restarts
        self._end_asked_at: dict[tuple[str, int], float] = {}
        # (partition, tenant) pairs of the events taken: which tenants each partition brings, so their live
        # scopes go with a partition handed over (``partitions_revoked``). Bounded by tenants x partitions.
        self._partition_tenants: set[tuple[int, str]] = set()
        self._sinks_shut = False  # the sink thread is shut down (close): what it ran runs on this thread
        self.producer = producer
        self.sinks = sinks
        self.sinks.note = self._note
        self.book = book
        self.dedup = Deduplicator()
        self.conversations = ConversationRates()
        self._stored_alerts = RecentIds(STORED_ALERT_IDS)  # runaway alert ids stored in Postgres
        self.live = LiveScopes(settings.live_values_per_tenant)
        self.sinks.tag_dimensions = lambda: self.live.named.tag_dimensions  # read on the sink thread: a snapshot
        self.sinks.keep_complete_tags = self.live.named.keep  # called on the sink thread (NamedScopes locks)
        self.status = status
        self._in_flight = 0  # messages of the batch in hand: behind too, until committed
        self.stats = MeterStats()
        self.stopping = False
        # One thread owns the sinks' connections: every Postgres and Redis write of stage 1 runs on it.
        self._sink_thread = ThreadPoolExecutor(1, thread_name_prefix="sinks")
        self._writing: Pipelined | None = None
        self._delivery_errors: list[KafkaError] = []
        self._lag_measured = 0.0
        self._unmoved: dict[tuple[str, int], tuple[int, float]] = {}  # partition -> (position, since)
        self._consuming_thread = threading.get_ident()  # the only one that tracks movement (see _note_unmoved)
        self._unmoved_warned: set[tuple[str, int]] = set()
        self.caught_up_ms = 0  # every event produced before this is in the sinks (0: not known yet)
        self._partition_caught_up: dict[tuple[str, int], int] = {}
        self._committed_cache: dict[tuple[str, int], tuple[int, float]] = {}
        self._freshness_reported = 0.0
        self.member = f"{socket.gethostname()}/{os.getpid()}"
        self.freshness = freshness_key(settings.worker_id)
        try:
            self.sinks.prune_freshness(self.freshness, int(time.time() * 1000))
        except redis.RedisError as exc:
            log.info("could not prune old freshness entries: %s", exc)

    def _stopping(self) -> bool:
        return self.stopping

    def _note(self, failure: str) -> None:
        """A sink is retrying: tell supervision why, and how much waits meanwhile."""
        metrics.BATCH_FAILURES.labels(reason="redis" if failure.startswith("Redis") else "postgres").inc()
        if self.status is not None:
            self.status.failed(failure)
            self.status.alive(self.measure_lag() + self._in_flight)
        self.report_freshness()  # still alive, and still only caught up to where it was

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(err)

    def run_once(self, timeout: float = BATCH_WAIT_S) -> int:
        """Take one batch (whatever arrives within ``timeout``) and move the pipeline on; return how many
        messages were committed (a batch only taken is not progress yet: ``in_flight`` counts it).

        Two batches overlap (``Pipelined`` below): while batch N is in Postgres and Redis on the sink
        thread, this thread decodes and prices batch N+1; once N is through the sinks, N+1 goes to them and
        this thread publishes, flushes and commits N meanwhile. Each batch still goes sinks → produce →
        flush → commit, in order; N+1's offsets are committed only after N's.
        Raises only for transient failures, after rewinding every batch not committed, so the next call
        replays them."""
        raw, consumed_ms = self._consume(timeout)
        if self._failed_in_revoke is not None:  # the batch in the sinks failed while partitions were handed over
            (failure, failed), self._failed_in_revoke = self._failed_in_revoke, None
            self._rewind([*failed, *raw])  # both, to the earliest offset of each partition: nothing passed over
            raise failure
        if self._fetch_restarts:
            self._restart_fetching()
        if self.commits.refused:
            self._commit_again()
        if not raw and self._writing is None:
            self._advance_freshness(raw, consumed_ms)
            return 0
        if raw:
            self.status_alive(len(raw))
        prepared: Prepared | None = None
        if raw:
            try:
                prepared = self._prepare(raw, consumed_ms)
            except Exception as exc:  # a record the stages cannot handle: the batch goes the careful way
                log.warning("preparing a batch failed (%s: %s)", type(exc).__name__, str(exc)[:300])
        committed = self._finish_writing(rewind_too=raw, then=prepared)
        if committed < 0:  # the batch before failed and went alone; this one was rewound, to be taken again
            return -committed
        if raw and prepared is None:
            self._process_alone(raw, consumed_ms)
            return committed + len(raw)  # committed too
        if prepared is not None and self._writing is None:  # no batch was in the sinks before it
            self._submit(prepared)
        return committed

    def _take_back(self) -> None:
        """Take back the batch that went to the sinks early, when the one before it failed: it is not
        committed (the caller rewinds it), so no later ``drain`` may commit it over the failed one. Its
        write is waited for, for what Postgres did: a replay finds those rows in already and inserts nothing,
        so they are counted here (the ordering needs no wait: the sink thread takes one write at a time)."""
        if self._writing is None:
            return
        dropped, self._writing = self._writing.write, None
        try:
            result = dropped.result().result
        except Exception:  # not written, or only in part: the replay writes and counts it
            return
        self._count_written(result)

    def _count_written(self, result: BatchResult) -> None:
        """Count the rows a write inserted, for a batch that will not be finished (a replay inserts none)."""
        self.stats.inserted += result.inserted
        metrics.count_spend(result.new_spend.items())

    def _submit(self, prepared: Prepared) -> None:
        """Hand a prepared batch to the sink thread."""
        self._writing = Pipelined(prepared, self._sink_thread.submit(self._write, prepared.priced))

    def _write(self, priced: Sequence[PricedEvent]) -> Written:
        """The sinks' write of a batch (on the sink thread)."""
        result = self.sinks.write(priced, self._stopping, self._live)
        return Written(result, [r for r in result.rollups if streamed(r) and self.live.live(r)])

    @property
    def in_flight(self) -> int:
        """Messages taken and not committed yet (the batch in the sinks, the one being prepared)."""
        return self._in_flight

    def drain(self) -> int:
        """Finish the batch in the sinks, if any (publish, flush, commit); return how many messages it had."""
        return abs(self._finish_writing(rewind_too=()))

    def _consume(self, timeout: float) -> tuple[list[RawMessage], int]:
        messages = self.consumer.consume(self.settings.worker_batch_size, timeout)
        self._queue_drained = len(messages) < self.settings.worker_batch_size
        raw = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err)
                continue
            topic, partition, offset = m.topic(), m.partition(), m.offset()
            assert topic is not None and partition is not None and offset is not None  # set on fetched messages
            raw.append(RawMessage(topic, partition, offset, m.key(), m.value(), m.timestamp()[1]))
        return raw, int(time.time() * 1000)

    def status_alive(self, taken: int) -> None:
        """A batch in hand is behind too: a hang from here on shows as a stall."""
        self._in_flight = taken + (len(self._writing.batch.raw) if self._writing is not None else 0)
        if self.status is not None:
            self.status.alive(self.measure_lag() + self._in_flight)

    def _finish_writing(self, rewind_too: Sequence[RawMessage], then: Prepared | None = None) -> int:
        """Wait for the batch in the sinks and publish, flush and commit it; return its size. ``then`` (the
        batch taken meanwhile, prepared from ``rewind_too``) goes to the sinks as soon as this one is
        through them, so its write overlaps this one's publishing. If anything fails, ``rewind_too`` is
        rewound as well (its write, if started, is taken back: ``_take_back``): a transient failure is
        raised after both are rewound; after a failure about a record the batch goes the careful way
        (``_isolating``) alone, and minus its size is returned (the caller drops its batch)."""
        assert then is None or then.raw is rewind_too
        if self._writing is None:
            return 0
        writing, self._writing = self._writing, None
        batch = writing.batch
        written: Written | None = None
        counted = False
        try:
            written = writing.write.result()
            runaways = self._runaways(batch)
            if then is not None and not self.stopping:  # a stopping process starts no more writes early
                self._submit(then)
            self._finish(batch, written, runaways)
            counted = True
            self._commit(batch.raw)
        except BaseException as exc:
            if written is not None and not counted:  # in Postgres: the replay will find its rows in already
                self._count_written(written.result)
            self._take_back()
            if not isinstance(exc, Exception):  # an interrupt: nothing may be committed after this
                raise
            if rewind_too:
                self._rewind(rewind_too)
            if transient_reason(exc) is not None or self.stopping:
                self._rewind(batch.raw)
                self._in_flight = 0
                raise
            log.warning(
                "a batch of %d messages failed (%s: %s); processing it again on its own",
                len(batch.raw),
                type(exc).__name__,
                str(exc)[:300],
            )
            self._process_alone(batch.raw, batch.consumed_ms)
            return -len(batch.raw)
        self.stats.batches += 1
        self._in_flight = len(rewind_too)  # the batch taken meanwhile is still to be done
        self._advance_freshness(batch.raw, batch.consumed_ms, in_hand=rewind_too)
        return len(batch.raw)

    def _process_alone(self, raw: Sequence[RawMessage], consumed_ms: int) -> None:
        """One batch through every stage on this thread, a failing record isolated and dead-lettered."""
        try:
            self._isolating(raw)
            self._commit(raw)
        except Exception:
            self._rewind(raw)  # the next run_once starts this batch again
            raise
        finally:
            self._in_flight = 0
        self.stats.batches += 1
        self._advance_freshness(raw, consumed_ms)

    def _advance_freshness(
        self, committed: Sequence[RawMessage], consumed_ms: int, in_hand: Sequence[RawMessage] = ()
    ) -> None:
        """Up to when the spend is complete: per assigned partition, the consume time if nothing waits
        there, else the newest message committed from it; the oldest of them. Unknown (no assignment
        yet, a position or end not fetched, a backlog not yet read from) means no advance at all.
        Messages ``in_hand`` (the next batch, taken but not in the sinks yet) are still waiting."""
        for message in committed:
            where = (message.topic, message.partition)
            self._partition_caught_up[where] = max(self._partition_caught_up.get(where, 0), message.timestamp_ms)
        lags = self.partition_lags()
        if not lags:
            return
        waiting = {(m.topic, m.partition) for m in in_hand}
        for where in [w for w in self._partition_caught_up if w not in lags]:
            del self._partition_caught_up[where]  # revoked
        for where, lag in lags.items():
            if lag == 0 and where not in waiting:
                self._partition_caught_up[where] = consumed_ms
        if all(self._partition_caught_up.get(where, 0) > 0 for where in lags):
            self.caught_up_ms = max(self.caught_up_ms, min(self._partition_caught_up[w] for w in lags))

    def partition_lags(self) -> dict[tuple[str, int], int] | None:
        """Messages behind on each assigned partition; None while any of them is unknown. A partition this
        process has not read from yet has no position: its committed offset stands in (asked at most
        every 2 s)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return None
        lags: dict[tuple[str, int], int] = {}
        for position in self.consumer.position(assigned):
            low, high = self.consumer.get_watermark_offsets(position, cached=True)
            where = (position.topic, position.partition)
            offset = position.offset
            if offset < 0 and low >= 0 and low == high:
                offset = high  # an empty partition: nothing to read
            if offset < 0:
                offset = self._committed_offset(position)
            if offset < 0 or high < 0:
                return None
            lags[where] = max(high - offset, 0)
        return lags

    def _committed_offset(self, partition: TopicPartition) -> int:
        where = (partition.topic, partition.partition)
        known = self._committed_cache.get(where)
        if known is not None and time.monotonic() - known[1] < 2.0:
            return known[0]
        try:
            (committed,) = self.consumer.committed([TopicPartition(partition.topic, partition.partition)], timeout=2)
            offset = committed.offset
        except Exception as exc:  # the coordinator is busy: unknown for now
            log.debug("committed offset of %s[%d] unknown: %s", partition.topic, partition.partition, exc)
            offset = -1
        self._committed_cache[where] = (offset, time.monotonic())
        return offset

    def report_freshness(self) -> None:
        """Tell quota clients how current the spend in Redis is (``schemas.redis_keys.freshness_key``), at most
        four times a second; a Redis error here is left to the next batch's Redis write to report."""
        now = time.monotonic()
        if now - self._freshness_reported < 0.25 or not self.caught_up_ms:
            return
        self._freshness_reported = now
        try:
            self.sinks.write_freshness(self.freshness, self.member, self.caught_up_ms, int(time.time() * 1000))
        except redis.RedisError as exc:
            log.debug("freshness not written: %s", exc)

    def _isolating(self, raw: Sequence[RawMessage]) -> None:
        """Process ``raw``; if it fails for a reason that is not transient, split it in halves until the
        record that cannot be processed is alone, and dead-letter that one."""
        failure = self._attempt(raw)
        if failure is None:
            return
        if len(raw) > 1:
            log.warning(
                "a batch of %d messages failed (%s: %s); splitting it to find the record",
                len(raw),
                type(failure).__name__,
                str(failure)[:300],
            )
            metrics.BATCH_FAILURES.labels(reason="record_split").inc()
            middle = len(raw) // 2
            self._isolating(raw[:middle])
            self._isolating(raw[middle:])
            return
        for _again in range(2):  # alone now: make sure it is the record, not a passing fault
            again = self._attempt(raw)
            if again is None:
                return
            failure = again
        self._dead_letter_unprocessable(raw[0], failure)

    def _attempt(self, raw: Sequence[RawMessage]) -> BaseException | None:
        """``_process``; a failure about some record is returned, a transient one raised."""
        try:
            self._process(raw)
            return None
        except Exception as exc:
            if transient_reason(exc) is not None or self.stopping:
                raise
            return exc

    def _dead_letter_unprocessable(self, message: RawMessage, failure: BaseException) -> None:
        reason = f"cannot be processed: {type(failure).__name__}: {failure}"
        log.error(
            "dead letter %s[%d]@%d: %s",
            message.topic,
            message.partition,
            message.offset,
            reason[:500],
            exc_info=failure,
        )
        record = dead_letter_record(Rejected(message, reason, "process"), datetime.now().astimezone())
        self._produce(self.settings.topic_dlq, message.key, write_dead_letter(record))
        self._flush()
        metrics.DEAD_LETTERS.labels(reason="process").inc()
        metrics.EVENTS_OUT.labels(stage="meter", output="dlq").inc()
        metrics.EVENTS_IN.labels(stage="meter").inc()
        self.stats.consumed += 1
        self.stats.rejected += 1

    def _process(self, raw: Sequence[RawMessage]) -> None:
        """One batch (or part of one) through every stage, up to Kafka's acks for its outputs."""
        batch = self._prepare(raw, 0)
        written = self._sink_thread.submit(self._write, batch.priced).result()
        self._finish(batch, written, self._runaways(batch))

    def _prepare(self, raw: Sequence[RawMessage], consumed_ms: int) -> Prepared:
        """Decode, validate, de-duplicate and price (this thread's share of a batch)."""
        started = time.perf_counter()
        bodies: dict[str, bytes] = {}
        events, rejected = decode_batch(raw, bodies, self._partition_tenants)
        fresh = self.dedup.fresh(events)
        if self._writing is not None:  # ids in the batch still in the sinks are not fresh either
            writing = self._writing.batch.fresh_ids
            fresh = [e for e in fresh if e.event_id not in writing]
        priced = price_batch(self.book, fresh, bodies)
        return Prepared(raw, events, rejected, fresh, priced, consumed_ms, time.perf_counter() - started)

    def _runaways(self, batch: Prepared) -> list[Alert]:
        """Runaway detection, after the sinks took the batch, so a batch that failed there is not counted
        twice by the runaway rule (a failed publish or a split still can: at worst an earlier runaway
        alert, never a money error). Before the next batch goes to the sinks: storing alerts waits for
        the sink thread."""
        none: list[Alert] = []
        return optional("runaway detection", lambda: self._runaway_alerts(batch.fresh), none)

    def _finish(self, batch: Prepared, written: Written, runaways: Sequence[Alert]) -> None:
        """After the sinks: the outputs (flushed), the counters."""
        started = time.perf_counter()
        result = written.result
        self._publish(batch.priced, batch.rejected, written.streamed, runaways)
        self.dedup.mark_seen(batch.fresh)
        s = self.stats
        s.consumed += len(batch.raw)
        s.rejected += len(batch.rejected)
        s.duplicates += len(batch.events) - result.inserted
        s.inserted += result.inserted
        s.unpriced += sum(1 for p in batch.priced if p.price.status == "unpriced")
        s.sink_seconds += result.seconds
        s.busy_seconds += batch.seconds + result.seconds + time.perf_counter() - started
        self._count(len(batch.raw), batch.rejected, len(batch.events) - result.inserted, batch.priced, result)

    def refresh_spend(self, scopes: Sequence[tuple[str, str, str]]) -> None:
        """``Sinks.refresh_spend`` on the sink thread (its Postgres connection is that thread's)."""
        self._sink_thread.submit(self.sinks.refresh_spend, scopes).result()

    @property
    def tags_known(self) -> bool:
        """Whether the tags Postgres records complete have been read (by the first batch's write)."""
        return self.sinks.keep_complete_tags is None

    def retire_unnamed_tags(self) -> bool:
        """Record the tags no budget names any more stale, then stop counting them (in that order: a crash in
        between leaves them counted, never skipped while recorded complete)."""
        unnamed = self.live.named.unnamed_tags()
        if unnamed:
            self._sink_thread.submit(self.sinks.mark_tags_stale, unnamed).result()
            self.live.named.retire(unnamed)
        return True

    def _live(self, rollups: Sequence[Rollup], forget: list[str]) -> list[Rollup]:
        """The windows of scopes with live structures (``streams/live.py``), after noting this batch's;
        adds the spend keys of scopes that dropped out to ``forget``."""
        evicted = self.live.observe(rollups)
        forget += forget_keys(s for s in evicted if s[1] not in NAMED_ONLY_DIMENSIONS)  # those were never written
        return [r for r in rollups if self.live.mirrored(r)]

    def _runaway_alerts(self, fresh: Sequence[UsageEvent]) -> list[Alert]:
        """Runaway conversations of this batch, stored once in Postgres; the ones new there."""
        found = runaway_alerts(self.conversations, fresh, datetime.now(UTC))
        # A loop keeps being found batch after batch (one id per conversation and hour): the ids this process
        # already stored skip the Postgres round trip, which stage 1's thread waited for on every batch.
        alerts = [alert for alert in found if alert.alert_id not in self._stored_alerts]
        if not alerts:
            return []
        try:  # once per id, whatever replays
            new = self._sink_thread.submit(self.sinks.store_alerts, alerts, self._stopping).result()
        except psycopg.Error as exc:
            if self.stopping:  # not committed without its alerts: the next start replays the batch, finds them
                raise Stopping("stopping while Postgres is away; the batch will be replayed") from exc
            raise
        self._stored_alerts.add_all(alert.alert_id for alert in alerts)
        return [alert for alert in alerts if alert.alert_id in new]

    def _count(
        self,
        consumed: int,
        rejected: Sequence[Rejected],
        duplicates: int,
        priced: Sequence[PricedEvent],
        result: BatchResult,
    ) -> None:
        metrics.EVENTS_IN.labels(stage="meter").inc(consumed)
        for bad in rejected:
            metrics.DEAD_LETTERS.labels(reason=bad.stage).inc()
        metrics.DUPLICATES.inc(duplicates)
        metrics.UNPRICED.inc(sum(1 for p in priced if p.price.status == "unpriced"))
        metrics.EVENTS_OUT.labels(stage="meter", output="priced").inc(len(priced))
        metrics.EVENTS_OUT.labels(stage="meter", output="dlq").inc(len(rejected))
        metrics.count_spend(result.new_spend.items())

    def measure_lag(self) -> int:
        """Messages behind (refreshed at most once a second, whether batches succeed or not)."""
        if time.monotonic() - self._lag_measured > 1.0:
            self._lag_measured = time.monotonic()
            self._behind = self.behind()
            metrics.LAG.labels(stage="meter").set(self._behind)
        return getattr(self, "_behind", 0)

    def behind(self) -> int:
        """Messages between this consumer's positions and the ends of its partitions, as last fetched. A
        partition with no position yet (just assigned or rewound, nothing fetched) counts from its
        committed offset: it is behind, not caught up. A partition never fetched has no cached end: its
        end is asked of the broker, else a partition librdkafka holds but does not fetch looks idle."""
        assigned = self.consumer.assignment()
        waiting: dict[tuple[str, int], tuple[int, int]] = {}  # partition -> (messages behind, position)
        unknown = []
        for position in self.consumer.position(assigned) if assigned else []:
            _low, high = self.consumer.get_watermark_offsets(position, cached=True)
            if high < 0:
                key = (position.topic, position.partition)
                if time.monotonic() - self._end_asked_at.get(key, 0.0) < END_QUERY_INTERVAL_S:
                    continue  # asked lately (each ask may wait a second for the broker)
                self._end_asked_at[key] = time.monotonic()
                try:
                    asked = self.consumer.get_watermark_offsets(position, timeout=1.0, cached=False)
                except KafkaException:
                    asked = None
                if asked is None or asked[1] < 0:
                    continue  # the broker did not answer: asked again later
                high = asked[1]
            if position.offset >= 0:
                waiting[(position.topic, position.partition)] = (max(high - position.offset, 0), position.offset)
            else:
                unknown.append((position, high))
        if unknown:
            try:
                committed = self.consumer.committed([p for p, _ in unknown], timeout=2)
            except KafkaException:
                committed = []  # the coordinator is away; the next call counts them
            for tp, (_p, high) in zip(committed, unknown, strict=False):
                if tp.offset >= 0:
                    waiting[(tp.topic, tp.partition)] = (max(high - tp.offset, 0), tp.offset)
        self._note_unmoved(waiting, without_position={(p.topic, p.partition) for p, _high in unknown})
        return sum(behind for behind, _position in waiting.values())

    def _note_unmoved(
        self, waiting: dict[tuple[str, int], tuple[int, int]], without_position: Collection[tuple[str, int]] = ()
    ) -> None:
        """Since when each partition with messages waiting has kept its position (for ``stuck_since``). Only
        while the consumer's queue is drained: in a backlog a partition's messages may wait behind up to 64 MB
        of other partitions' for a while, and that is not a stall. Only on the consuming thread: the sink
        thread also measures lag (``_note``), and a flag it set could be lost in ``_restart_fetching``'s swap."""
        if threading.get_ident() != self._consuming_thread:
            return
        now = time.time()
        unmoved: dict[tuple[str, int], tuple[int, float]] = {}
        for key, (behind, position) in waiting.items():
            if behind > 0:
                before = self._unmoved.get(key)
                if before is not None and before[0] == position and self._queue_drained:
                    unmoved[key] = before
                else:
                    unmoved[key] = (position, now)
                if now - unmoved[key][1] > UNMOVED_WARNING_S and key not in self._unmoved_warned:
                    self._unmoved_warned.add(key)
                    log.warning(
                        "%s[%d]: %d messages behind, position %d unchanged for %.0fs: held but not consumed%s",
                        *key,
                        behind,
                        position,
                        now - unmoved[key][1],
                        "" if key in without_position else "; restarting its fetch",
                    )
                    if key not in without_position:  # seeking to a committed offset could replay: not that
                        self._fetch_restarts.append(key)
        self._unmoved = unmoved
        self._unmoved_warned &= unmoved.keys()

    def _restart_fetching(self) -> None:
        """Seek each partition flagged by ``_note_unmoved`` to where it stands now (read here, on the thread
        that consumes): librdkafka's fetcher for it restarts and nothing is skipped or taken twice. If it still
        does not move, supervision stops the worker (``stuck_since``)."""
        flagged, self._fetch_restarts = self._fetch_restarts, []
        for topic, partition in flagged:
            try:
                for position in self.consumer.position([TopicPartition(topic, partition)]):
                    if (position.topic, position.partition) == (topic, partition) and position.offset >= 0:
                        self.consumer.seek(position)
            except KafkaException as exc:  # revoked meanwhile, or not fetchable: supervision decides
                log.warning("%s[%d]: restarting its fetch failed: %s", topic, partition, exc)

    def log_partition_state(self) -> None:
        """Per assigned partition: position, committed offset, cached and broker end (what an operator
        asks of a stage that looks idle while its group shows lag)."""
        assigned = self.consumer.assignment()
        committed = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.committed(assigned, timeout=5)}
        for tp in self.consumer.position(assigned) if assigned else []:
            key = (tp.topic, tp.partition)
            log.warning(
                "state %s[%d]: position %d, committed %s, end cached %s, end %s, unmoved since %s",
                *key,
                tp.offset,
                committed.get(key),
                self.consumer.get_watermark_offsets(tp, cached=True)[1],
                (self.consumer.get_watermark_offsets(tp, timeout=2.0) or (None, None))[1],
                self._unmoved.get(key),
            )
        log.warning("state: %d partitions assigned, %d messages in flight", len(assigned), self._in_flight)

    def stuck_since(self) -> float | None:
        """When the partition that has waited longest without moving last moved (epoch seconds), if any
        waits: batches of other partitions are no progress for it, so supervision counts from here."""
        return min((since for _position, since in self._unmoved.values()), default=None)

    def _publish(
        self,
        priced: Sequence[PricedEvent],
        rejected: Sequence[Rejected],
        rollups: Sequence[Rollup],
        alerts: Sequence[Alert] = (),
    ) -> None:
        settings = self.settings
        for alert in alerts:
            metrics.ALERTS.labels(kind=alert.kind).inc()
            log.warning("alert %s: %s", alert.kind, alert.message)
            optional(
                "runaway alert encoding",
                lambda a=alert: self._produce(  # type: ignore[misc]
                    settings.topic_alerts_anomaly, a.tenant_id.encode(), write_alert(a.to_avro())
                ),
                None,
            )
        now = datetime.now().astimezone()
        for bad in rejected:
            log.info(
                "dead letter %s[%d]@%d: %s",
                bad.message.topic,
                bad.message.partition,
                bad.message.offset,
                bad.reason[:200],
            )
            self._produce(settings.topic_dlq, bad.message.key, write_dead_letter(dead_letter_record(bad, now)))
        for item in priced:
            self._produce(settings.topic_priced, item.event.tenant_id.encode(), priced_message(item))
        messages = 0
        for tenant, zone, records in rollup_messages(rollups):  # Faust pays per message
            batch = write_rollup_batch({"tenant_id": tenant, "time_zone": zone, "rollups": records})
            self._produce(settings.topic_rollups, tenant.encode(), batch)
            messages += 1
        metrics.EVENTS_OUT.labels(stage="meter", output="rollups").inc(messages)
        self._flush()

    def _flush(self) -> None:
        """Wait for Kafka's acks of everything produced: a batch is committed only once Kafka has all of it."""
        flushing = time.perf_counter()
        while len(self.producer) > 0:
            self.producer.flush(1.0)
            if self.stopping and len(self.producer) > 0:
                raise Stopping("stopping with undelivered outputs; the batch will be replayed")
        metrics.SINK_SECONDS.labels(sink="kafka").observe(time.perf_counter() - flushing)
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            refused = [e for e in errors if e.code() in _KAFKA_RECORD_ERRORS]
            if refused:
                raise OutputRefused(f"Kafka refused {len(refused)} outputs: {refused[0]}")
            raise OutputsNotDelivered(
                f"{len(errors)} outputs were not delivered: {errors[0]}; the batch will be replayed"
            )

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
            # Asynchronous (but synchronous while handing partitions over): librdkafka keeps commits in order; a
            # refused one is made again (``Commits``), and a lost one only means a replay, which is harmless.
            self.commits.asked(ends)
            try:
                offsets = [TopicPartition(t, p, o) for (t, p), o in ends.items()]
                if self._commit_synchronously:  # the synchronous overload returns the offsets; nothing reads them
                    cast(Any, self.consumer).commit(offsets=offsets, asynchronous=False)
                else:
                    self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:  # about the consumer, not a record: the batch is replayed
                raise CommitFailed(f"committing offsets failed: {exc}") from exc

    def partitions_revoked(self, _consumer: object, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_revoke`` (called within ``consume``, on this thread, before the partitions go):
        the batch in the sinks is finished and committed synchronously first, so the partitions' next owner
        starts after it instead of replaying it. A replay bills nothing twice, but it would repeat the
        batch's dead letters and ``usage.priced`` messages; a rebalance is routine (a stage-1 process or a
        worker joining), so it should cost nothing. A failure here is raised by the ``run_once`` in progress."""
        if self._writing is not None and partitions:
            batch = self._writing.batch.raw
            self._commit_synchronously = True
            try:
                self._finish_writing(rewind_too=())
            except Exception as exc:  # raising inside librdkafka's callback would lose it
                self._failed_in_revoke = (exc, batch)
            finally:
                self._commit_synchronously = False
        if partitions:  # before the next owner writes them; on the sink thread, idle now
            # Not when closing: a process that stops holds no state, and its keys stay as after a crash (a
            # deploy would otherwise empty the live spend of every recent unbudgeted user until their next call).
            self._on_sink_thread(self._drop_moved_tenants, self._held_after(partitions), not self._sinks_shut)
        # Gone: their next owner commits them. A finished offset kept here could later be committed again over
        # a newer one (Commits.to_retry) if they came back.
        self.commits.forget({(tp.topic, tp.partition) for tp in partitions})

    def partitions_lost(self, _consumer: object, partitions: list[TopicPartition]) -> None:
        """librdkafka's ``on_lost`` (a session timed out: the partitions are someone else's already): nothing
        can be committed for them; the batch in the sinks finishes as usual and its commit is refused."""
        log.warning("lost %d partitions of usage.raw (session timed out); their new owner replays", len(partitions))
        # After the batch in the sinks (same thread); the keys stay: the new owner may be writing them already.
        self._on_sink_thread(self._drop_moved_tenants, self._held_after(partitions), False)
        self.commits.forget({(tp.topic, tp.partition) for tp in partitions})

    def _held_after(self, gone: Sequence[TopicPartition]) -> set[int]:
        """The partitions of usage.raw this process keeps once ``gone`` goes (read on the consuming thread)."""
        left = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        left.difference_update((tp.topic, tp.partition) for tp in gone)
        return {partition for topic, partition in left if topic == self.settings.topic_raw}

    def _on_sink_thread(self, call: Callable[..., None], *args: Any) -> None:
        """Run ``call`` after whatever the sink thread is doing; directly once the thread is shut down
        (``close``: nothing else runs then)."""
        if self._sinks_shut:
            call(*args)
        else:
            self._sink_thread.submit(call, *args).result()

    def _drop_moved_tenants(self, held: set[int], delete_spend: bool) -> None:
        """Stop tracking the live scopes of the tenants that only partitions no longer ``held`` brought (on
        the sink thread, which owns ``live``): their next owner tracks the values it sees. Without this,
        every process that ever held a tenant's partition would keep up to ``live_values_per_tenant`` of its
        users' spend keys until their windows expire. Bills nothing: a failure is logged, keys expire."""
        try:
            moved = {tenant for partition, tenant in self._partition_tenants if partition not in held}
            self._partition_tenants = {(p, tenant) for p, tenant in self._partition_tenants if p in held}
            moved.difference_update(tenant for _p, tenant in self._partition_tenants)  # still brought by one held
            dropped = self.live.drop_tenants(moved)
            keys = forget_keys(s for s in dropped if s[1] not in NAMED_ONLY_DIMENSIONS)  # those were never written
            if keys and delete_spend:
                self.sinks.forget_spend(keys)
            if moved:
                deleted = len(keys) if delete_spend else 0
                log.info("%d tenants moved with their partitions (%d live spend keys deleted)", len(moved), deleted)
        except Exception:
            log.exception("forgetting the live scopes of moved tenants failed (their keys expire on their own)")
            metrics.OPTIONAL_FAILURES.labels(stage="moved tenants").inc()

    def _commit_again(self) -> None:
        if time.monotonic() - self._committed_again_at < 1.0:  # a rebalance takes a while: once a second
            return
        self._committed_again_at = time.monotonic()
        offsets = self.commits.to_retry({(tp.topic, tp.partition) for tp in self.consumer.assignment()})
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=True)
            except KafkaException as exc:  # a rebalance still going on: the next loop tries again
                log.info("committing again failed: %s", exc)
                self.commits.refused = True

    def _rewind(self, raw: Sequence[RawMessage]) -> None:
        starts: dict[tuple[str, int], int] = {}
        for m in raw:
            starts[(m.topic, m.partition)] = min(starts.get((m.topic, m.partition), m.offset), m.offset)
        for (topic, partition), offset in starts.items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except Exception as exc:
                owned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
                if (topic, partition) not in owned:  # revoked meanwhile: its new owner starts from the commit
                    log.info("not rewinding %s[%d]: %s", topic, partition, exc)
                    continue
                # Still ours and not rewound: going on would commit past the failed batch. Stop instead;
                # the restarted process replays from the committed offset.
                raise RewindFailed(f"cannot rewind {topic}[{partition}] to {offset}: {exc}") from exc

    def close(self) -> None:
        self.stopping = True
        if self._writing is not None:  # not committed: the next owner of its partitions replays it
            with contextlib.suppress(Exception):
                self._writing.write.result()
            self._writing = None
        self._sink_thread.shutdown(wait=True)
        self._sinks_shut = True
        self.consumer.close()
        self.producer.flush(5.0)
        try:  # a stopped process no longer speaks for the spend's freshness
            self.sinks.forget_freshness(self.freshness, self.member)
        except redis.RedisError as exc:
            log.info("freshness entry not removed: %s", exc)
        self.sinks.close()


def rollup_messages(
    rollups: Sequence[Rollup],
    live: Callable[[Rollup], bool] | None = None,
) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """The windows stage 2 uses (``streamed``, of ``live`` scopes) as (tenant, time zone, records)
    messages: one per tenant, split so that none holds more than ``ROLLUPS_PER_MESSAGE`` windows."""
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    zones: dict[str, str] = {}
    for r in rollups:
        if streamed(r) and (live is None or live(r)):
            by_tenant.setdefault(r.tenant_id, []).append(r.to_avro())
            zones[r.tenant_id] = r.time_zone
    return [
        (tenant, zones[tenant], records[first : first + ROLLUPS_PER_MESSAGE])
        for tenant, records in by_tenant.items()
        for first in range(0, len(records), ROLLUPS_PER_MESSAGE)
    ]


def scope_follower(settings: Settings, named: NamedScopes, budgeted: list[tuple[str, str, str]]) -> ConfigFollower:
    """Keeps ``named`` equal to the scopes config.budgets names (by a budget, a rate limit or both): they
    stay live. Scopes that get a budget are added to ``budgeted``, whose Redis spend the caller rewrites
    from Postgres (a scope that was not live has no spend there, and a new hard budget must not read $0)."""
    kinds: dict[tuple[str, str, str], set[str]] = {}

    def apply(key: str, value: bytes | None) -> None:
        record = parse_config_record(key, value)
        held = kinds.setdefault(record.scope, set())
        if record.item is None:
            held.discard(record.kind)
        else:
            # The scope's first budget, even if a rate limit named it already: a tag's rollups advanced only
            # since it was named, so they are rebuilt from the ledger (``Sinks.refresh_spend``) before a
            # budget counts them.
            if record.kind == "budget" and "budget" not in held:
                budgeted.append(record.scope)
            held.add(record.kind)
        (named.add if held else named.discard)(record.scope)

    return ConfigFollower(kafka_config(settings), settings.topic_budgets, apply)


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: get SIGKILL when the worker process dies, so a killed worker leaves no stage 1 behind.
    A worker killed while this process was still starting (before the request) is caught by the
    parent check here and in the batch loop."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    _exit_if_orphaned(parent_pid)


def _exit_if_orphaned(parent_pid: int | None) -> None:
    if parent_pid is not None and os.getppid() != parent_pid:
        log.critical("the worker process %d is gone; stage 1 exits (its batch is replayed by the next one)", parent_pid)
        os._exit(3)


def run_stage_one(settings: Settings, status: StageStatus | None = None, parent_pid: int | None = None) -> None:
    """Entry point of stage 1's own process (``tokenmeter worker`` starts it): batches until SIGTERM.

    A process of its own, not a thread of the Faust worker: the two stages then use both cores
    instead of sharing one interpreter lock. A failed batch (transient by then: see the module doc) is
    retried with back-off from 1 s to 30 s; ``status`` tells the worker's supervisor how it goes.
    """
    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] [stage 1] %(levelname)s %(message)s")
    _die_with_parent(parent_pid)
    if not codec.compiled_reader_for("usage_event"):
        log.warning("the compiled Avro reader is not built (setup.py); usage events are read with fastavro, slower")
    # The sink thread runs short stretches of Python between Postgres round trips; each time it wants the
    # interpreter back it may wait a whole switch interval (5 ms by default) behind this thread's decoding.
    # 0.5 ms: quota visibility under half load p99 630–659 ms against 1,469–1,858 ms (two runs each,
    # alternated), Postgres batch time halved, throughput unchanged (14.5k vs 14.7k events/s).
    sys.setswitchinterval(0.0005)
    stop = threading.Event()
    stopping: list[Meter] = []

    def on_signal(*_: object) -> None:  # also cut short a sink's retries: the batch is replayed by the next start
        stop.set()
        for meter_to_stop in stopping:
            meter_to_stop.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    wanted_state = threading.Event()  # `kill -USR1 <stage-1 pid>`: its partitions' state to the log
    signal.signal(signal.SIGUSR1, lambda *_: wanted_state.set())
    book = PriceBook()
    overrides = override_follower(settings, book)
    # Price nothing before every override there is has been read: an event priced without its tenant's override
    # would be billed at list price for good. A broker down can hold the read up for a while (its partitions'
    # leaders move); a read that never ends is a stuck stage: it exits and the worker is restarted.
    if not overrides.read_to_end(settings.worker_stall_timeout_s, stop.is_set):
        overrides.close()
        if stop.is_set():
            return
        reason = f"{settings.topic_price_overrides} not read to its end within {settings.worker_stall_timeout_s:.0f}s"
        if status is not None:
            status.failed(reason)
        log.critical("%s: stage 1 exits without pricing anything (the worker restarts it)", reason)
        raise SystemExit(3)
    meter = build_meter(settings, book, status)
    stopping.append(meter)
    budgeted: list[tuple[str, str, str]] = []
    named = scope_follower(settings, meter.live.named, budgeted)
    optional("budget names", lambda: named.catch_up(1.0), 0)  # only bounds state: no need to wait long
    heap.settle(heap.stage_one_young_collection_every(settings.worker_batch_size))  # start-up's objects: frozen
    followed = time.monotonic()

    def refresh_budgeted() -> bool:
        meter.refresh_spend(budgeted)
        return True

    refresh_retry_at, refresh_backoff = 0.0, 5.0
    backoff = 1.0
    unsafe_to_commit = False
    try:
        while not stop.is_set():
            if time.monotonic() - followed > 5.0:
                optional("price overrides", lambda: overrides.catch_up(0.0), 0)
                caught_up = optional("budget names", lambda: named.catch_up(0.0), -1) == 0
                if meter.tags_known and caught_up:  # nothing new to read: a pair unnamed now is unnamed, not unread yet
                    optional("stale tag rollups", meter.retire_unnamed_tags, False)
                followed = time.monotonic()
                _exit_if_orphaned(parent_pid)
            if budgeted and time.monotonic() >= refresh_retry_at:
                # Cleared only once done: a tag rebuild that failed (Postgres blip, statement timeout) would leave
                # the tag's rollups short for good, so it is tried again, backing off from 5 s to 5 min (a
                # rebuild holds back its tenant's tag-counting batches for its last step; billing goes on in between).
                if optional("spend of newly budgeted scopes", refresh_budgeted, False):
                    budgeted.clear()
                    refresh_backoff = 5.0
                else:
                    refresh_retry_at = time.monotonic() + refresh_backoff
                    refresh_backoff = min(refresh_backoff * 2, 300.0)
            if wanted_state.is_set():
                wanted_state.clear()
                optional("partition state", meter.log_partition_state, None)
            try:
                done = meter.run_once(BATCH_WAIT_S)
                meter.report_freshness()
                backoff = 1.0
                if status is not None:
                    if done:
                        status.progressed(meter.measure_lag() + meter.in_flight, since=meter.stuck_since())
                    else:
                        status.alive(meter.measure_lag() + meter.in_flight)
            except RewindFailed:
                log.critical("stage 1 stops without committing: a failed batch could not be rewound", exc_info=True)
                unsafe_to_commit = True
                raise
            except Exception as exc:
                if stop.is_set():
                    break
                reason = transient_reason(exc) or type(exc).__name__
                metrics.BATCH_FAILURES.labels(reason=reason).inc()
                if status is not None:
                    status.failed(f"{reason}: {str(exc)[:300]}")
                    status.alive(meter.measure_lag())
                log.error(
                    "batch failed (%s: %s); retrying in %.0fs",
                    reason,
                    str(exc)[:300],
                    backoff,
                    exc_info=transient_reason(exc) is None,
                )
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
    finally:
        if not unsafe_to_commit:
            with contextlib.suppress(Exception):  # the batch still in the sinks: committed now, not replayed later
                meter.drain()
        meter.close()
        overrides.close()
        named.close()
