"""UsageProducer: record one usage event per model call without blocking the caller or losing it.

``record()`` validates the event on the caller's thread (bad input raises ``InvalidEvent`` naming the
field) and appends it to an in-memory queue; a background thread encodes it as Avro and hands it to
confluent-kafka (idempotent, ``acks=all``, lz4, batched, keyed by tenant). Whatever Kafka does not
acknowledge — delivery timeouts while the broker is unreachable, a full local queue, events still
queued at ``close()`` or interpreter exit — goes to the durable local spool (``producers/spool.py``),
which the next UsageProducer on the machine delivers first. Redelivery can repeat an event that
Kafka had in fact received; the pipeline de-duplicates by ``event_id``, so nothing is counted twice.

The background thread never stops on one event: an event it cannot encode as Avro (which
validation should make impossible, but a bug, a ``UsageEvent.model_construct`` or a caller mutating
its ``tags`` after ``record()`` could) is logged, counted in ``stats.encode_failures`` and sent as
JSON instead — ``record()`` already returned its id, so it must still reach ``usage.raw``, where the
pipeline bills it or dead-letters it with the reason (DESIGN.md §4.2, §4.6). Any other error in the
loop is logged and the loop goes on.

Not covered: a process killed with SIGKILL loses what it had not yet handed to Kafka or the spool
(at most the last few milliseconds of events at normal load).
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from random import getrandbits
from time import sleep as yield_gil
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from deploy.settings import Settings, get_settings
from deploy.settings import kafka_config as connection_config
from producers.context import apply_attribution
from producers.kafka_logging import KafkaLogger, error_level
from producers.spool import Spool, SpooledMessage, SpoolFullError
from schemas import codec
from schemas.events import InvalidEvent, UsageEvent, surely_valid, validate_event

log = logging.getLogger("tokenmeter.producer")
write_usage = codec.record_writer("usage_event")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = ["InvalidEvent", "ProducerStats", "SpoolFullError", "UsageProducer"]


@dataclass(frozen=True)
class ProducerStats:
    recorded: int
    delivered: int
    delivery_failures: int
    spooled: int
    replayed: int
    dropped: int
    pending: int
    encode_failures: int = 0  # events sent as JSON because Avro encoding failed (see the module doc)


class UsageProducer:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        topic: str | None = None,
        message_timeout_s: float = 30.0,
        replay_spool: bool = True,
        kafka_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.topic = topic or self.settings.topic_raw
        self.spool = Spool(self.settings.spool_path, self.settings.spool_max_bytes)
        config: dict[str, Any] = {
            **connection_config(self.settings),
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": "lz4",
            "linger.ms": 10,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 500_000,
            "message.timeout.ms": int(message_timeout_s * 1000),
            # librdkafka's lines and errors go through logging (never straight to stderr), a broker's
            # retried start-up conditions at INFO: a service's users see nothing unless it configures logging.
            "error_cb": self._on_error,
            "logger": KafkaLogger("tokenmeter.kafka"),
        }
        config.update(kafka_config or {})
        self._producer = Producer(config)
        self._queue: collections.deque[UsageEvent | dict[str, Any]] = collections.deque()
        self._to_spool: list[SpooledMessage] = []
        self._counts = collections.Counter[str]()
        self._brokers_down = False
        self._closing = threading.Event()
        self._closed = False
        self._replay_pending = replay_spool
        self._thread = threading.Thread(target=self._run, name="tokenmeter-producer", daemon=True)
        self._thread.start()
        # Interpreter exit with undelivered events: spool them rather than lose them.
        self_ref = weakref.ref(self)
        self._atexit = lambda: (p := self_ref()) is not None and p.close(timeout=5.0)
        atexit.register(self._atexit)

    # ---------------------------------------------------------------- caller side
    def record(self, event: UsageEvent | Mapping[str, Any]) -> str:
        """Validate and enqueue one usage event; never blocks on Kafka. Returns its ``event_id``.

        Missing ``event_id`` (128 random bits, hex) and ``timestamp`` (now, UTC) are filled in, as are
        attribution fields set with ``usage_context``. Plain, valid dicts take a fast check
        (``surely_valid``); anything else is validated by the pydantic model, whose error is raised.
        """
        if self._closed:
            raise RuntimeError("UsageProducer is closed")
        if isinstance(event, UsageEvent):
            item: UsageEvent | dict[str, Any] = event
        elif isinstance(event, Mapping):
            data = apply_attribution(dict(event))
            if "event_id" not in data:
                data["event_id"] = f"{getrandbits(128):032x}"
            if surely_valid(data):
                if "timestamp" not in data:
                    data["timestamp"] = time.time_ns() // 1000  # timestamp-micros, written as is
                item = data
            else:
                if "timestamp" not in data:
                    data["timestamp"] = datetime.now(UTC)
                item = validate_event(data)
        else:
            raise InvalidEvent(f"event must be a mapping or UsageEvent, got {type(event).__name__}")
        self._queue.append(item)
        self._counts["recorded"] += 1
        return item.event_id if isinstance(item, UsageEvent) else item["event_id"]

    def flush(self, timeout: float = 10.0) -> int:
        """Wait until queued events are acknowledged; return how many are still pending."""
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            time.sleep(0.002)
        return len(self._queue) + self._producer.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 10.0) -> ProducerStats:
        """Deliver what is queued within ``timeout``; spool the rest. Idempotent."""
        if self._closed:
            return self.stats
        self._closed = True
        atexit.unregister(self._atexit)
        self._closing.set()
        self._thread.join()
        if self._queue:  # only if the thread died after all: hand over what it left, on this thread
            self._drain_queue()
        # While brokers are unreachable, waiting the full timeout only delays the spool.
        wait = min(timeout, 1.0) if self._brokers_down else timeout
        remaining = self._producer.flush(wait)
        if remaining:
            self._producer.purge(in_queue=True, in_flight=True)
            self._producer.flush(0)
        self._write_spool()
        self.spool.close()
        return self.stats

    def __enter__(self) -> UsageProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def stats(self) -> ProducerStats:
        c = self._counts
        return ProducerStats(
            recorded=c["recorded"],
            delivered=c["delivered"],
            delivery_failures=c["delivery_failures"],
            spooled=c["spooled"],
            replayed=c["replayed"],
            dropped=c["dropped"],
            pending=len(self._queue) + len(self._producer),
            encode_failures=c["encode_failures"],
        )

    # ---------------------------------------------------------------- background thread
    def _run(self) -> None:
        last_replay_try = 0.0
        while True:
            try:
                if self._replay_pending and not self._brokers_down and time.monotonic() - last_replay_try > 5.0:
                    last_replay_try = time.monotonic()
                    self._replay_pending = not self._replay_spool()
                sent = self._drain_queue()
                self._producer.poll(0 if sent else 0.005)
                self._write_spool()
            except Exception:
                # Events are handled one by one in _drain_queue; this is the rest (spool replay, poll).
                # The thread is the only way out for recorded events, so it logs and goes on.
                log.exception("usage producer: background error (going on)")
                time.sleep(0.1)  # a lasting fault must not spin
            if self._closing.is_set() and not self._queue:
                return

    def _drain_queue(self) -> int:
        sent = 0
        queue, produce = self._queue, self._producer.produce
        while queue and sent < 5000:
            item = queue.popleft()
            sent += 1
            try:
                record = item.model_dump() if isinstance(item, UsageEvent) else item
                key, value = record["tenant_id"].encode(), write_usage(record)
            except Exception as exc:
                key, value = self._encode_failed(item, exc)
                if not value:
                    continue
            try:
                produce(self.topic, value=value, key=key, on_delivery=self._on_delivery)
            except BufferError:
                self._to_spool.append(SpooledMessage(key, value))
            except Exception as exc:  # about this message (e.g. over message.max.bytes): spooling would not help
                self._counts["dropped"] += 1
                log.error("usage event dropped, Kafka refused it: %s", exc)
            # Hand the GIL back after each event, so a caller in record() waits for one encode at most
            # instead of a whole interpreter switch interval.
            yield_gil(0)
        return sent

    def _encode_failed(self, item: UsageEvent | dict[str, Any], exc: Exception) -> tuple[bytes, bytes]:
        """Key and JSON value for an event Avro encoding refused, or empty bytes if JSON fails too.

        JSON escapes what UTF-8 cannot hold (``ensure_ascii``), so the pipeline gets the event as it
        was and bills it or dead-letters it with its reason; only an event JSON cannot express at all
        (a mapping with non-string keys, say) is dropped, with an error log.
        """
        self._counts["encode_failures"] += 1
        event_id = item.get("event_id") if isinstance(item, dict) else getattr(item, "event_id", None)
        log.error("usage event %r could not be encoded as Avro (%r); sending it as JSON", event_id, exc)
        try:
            record = dict(item) if isinstance(item, dict) else dict(vars(item))
            timestamp = record.get("timestamp")
            if type(timestamp) is int:  # the fast path's timestamp-micros
                record["timestamp"] = _EPOCH + timedelta(microseconds=timestamp)
            value = json.dumps(record, default=lambda o: o.isoformat() if isinstance(o, datetime) else repr(o))
            key = str(record.get("tenant_id", "")).encode(errors="backslashreplace")
        except Exception as again:
            self._counts["dropped"] += 1
            log.error("usage event %r dropped: not even JSON can express it (%r)", event_id, again)
            return b"", b""
        return key, value.encode()

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._counts["delivered"] += 1
            self._brokers_down = False
            return
        self._counts["delivery_failures"] += 1
        self._to_spool.append(SpooledMessage(msg.key() or b"", msg.value() or b""))

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self._brokers_down = True
            # Our own spool can be redelivered once brokers are back.
            self._replay_pending = True
        log.log(error_level(err), "kafka: %s", err)

    def _write_spool(self) -> None:
        if not self._to_spool:
            return
        batch, self._to_spool = self._to_spool, []
        try:
            self.spool.append(batch)
            self._counts["spooled"] += len(batch)
        except SpoolFullError:
            self._counts["dropped"] += len(batch)
            log.error("spool full: %d usage events dropped", len(batch))
        except OSError as exc:  # a full or read-only disk: nowhere left to keep them
            self._counts["dropped"] += len(batch)
            log.error("cannot write the spool (%s): %d usage events dropped", exc, len(batch))

    def _replay_spool(self) -> bool:
        """Deliver spool files left by earlier producers (and our own, rotated). True when all done."""
        if self._counts["spooled"]:
            self.spool.close()  # rotate: our own spooled events become claimable too
        done = True
        with self.spool.claim_orphans() as claimed:
            for path, messages in claimed:
                outcome = collections.Counter[str]()

                def count(err: KafkaError | None, _msg: Message, outcome: collections.Counter[str] = outcome) -> None:
                    outcome["ok" if err is None else "failed"] += 1

                for message in messages:
                    while True:
                        try:
                            self._producer.produce(self.topic, value=message.value, key=message.key, on_delivery=count)
                            break
                        except BufferError:
                            self._producer.poll(0.05)
                self._producer.flush(self.settings.spool_replay_timeout_s)
                if outcome["ok"] == len(messages):
                    path.unlink(missing_ok=True)
                    self._counts["replayed"] += len(messages)
                    log.info("delivered %d spooled events from %s", len(messages), path.name)
                else:
                    done = False  # keep the file; a later attempt redelivers it (dedup absorbs repeats)
                    break
        return done
