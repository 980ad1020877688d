"""Following a compacted config topic (budgets, price overrides) from its beginning, in every worker.

No consumer group: each worker reads every partition, so all of them hold the same configuration,
and compaction keeps the topic to the latest value per key (a null value deletes the key).

Anyone can write to these topics (kcat, scripts, an older CLI), so a record is validated before it is
applied, with the rules below shared by both topics. A record that cannot be applied is logged,
counted (``tokenmeter_config_records_rejected``) and skipped: it must not stop pricing or alerting
(DESIGN.md §4.6). A failure of a store the ``apply`` callback writes to is not the record's fault:
the follower stops at that record and retries it at the next ``catch_up``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from decimal import Context, Decimal, InvalidOperation
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from producers.kafka_logging import logged
from schemas.events import printable_problem
from streams.metrics import CONFIG_REJECTED

log = logging.getLogger("tokenmeter.config")

Apply = Callable[[str, bytes | None], None]

# Money on the wire (alerts, priced events) and in Postgres is decimal with scale 12: an amount with
# more places could not be encoded later, far from the record that caused it.
MAX_DECIMAL_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)
_WIDE = Context(prec=60)


class TransientConfigError(Exception):
    """Raised by an ``apply`` callback when the record is fine but a store it writes to is not: the
    follower keeps its place and retries the record at the next ``catch_up``."""


# Errors of the stores an apply callback writes to (Redis for budgets), never of the record itself.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TransientConfigError, redis.RedisError, OSError)


def _show(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def config_text(data: Mapping[str, Any], name: str, *, max_len: int = 200, allow_empty: bool = False) -> str:
    """A name or id of a config record: a string of at most ``max_len`` printable characters (the
    usage event's rule, so that what a budget or an override names can match an event); empty, or
    absent meaning empty, only if ``allow_empty``."""
    raw = data.get(name)
    if raw is None and allow_empty:
        return ""
    if not isinstance(raw, str):
        raise ValueError(f"{name} must be a string, got {'nothing' if raw is None else type(raw).__name__}")
    if not (0 if allow_empty else 1) <= len(raw) <= max_len:
        raise ValueError(f"{name} must be {'0' if allow_empty else '1'}-{max_len} characters, got {len(raw)}")
    problem = printable_problem(raw)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")
    return raw


def config_amount(raw: object, name: str, *, positive: bool, below: Decimal) -> Decimal:
    """An exact amount from a decimal string, a JSON number or a Decimal: finite, not negative (not
    zero either if ``positive``), below ``below``, at most 12 decimal places (trailing zeros beyond
    them are dropped). Raises ValueError naming ``name``."""
    if isinstance(raw, bool) or not isinstance(raw, Decimal | str | int | float):
        raise ValueError(f"{name} must be a decimal string, got {'nothing' if raw is None else type(raw).__name__}")
    if isinstance(raw, Decimal):
        value = raw
    else:
        try:
            value = Decimal(str(raw).strip())
        except InvalidOperation:
            raise ValueError(f"{name}: {_show(raw)} is not a decimal number (write e.g. 3.5)") from None
    if not value.is_finite():
        raise ValueError(f"{name} must be a finite amount, got {_show(raw)}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'more than zero' if positive else 'zero or more'}, got {_show(raw)}")
    if value >= below:
        raise ValueError(f"{name} must be below {below:,f}, got {_show(raw)}")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if exponent < -MAX_DECIMAL_PLACES:
        exact = value.quantize(_QUANTUM, context=_WIDE)
        if exact != value:
            raise ValueError(f"{name} has more than {MAX_DECIMAL_PLACES} decimal places: {_show(raw)}")
        value = exact
    elif exponent > 0:
        value = value.quantize(Decimal(1), context=_WIDE)  # 1E+2 → 100: plain in JSON, Redis and Lua
    return abs(value) if value == 0 else value  # no "-0"


class ConfigFollower:
    """Calls ``apply(key, value)`` for each message of ``topic``; ``catch_up`` reads what is new."""

    def __init__(self, kafka: dict[str, Any], topic: str, apply: Apply) -> None:
        self.kafka = kafka  # the cluster's client properties (deploy.settings.kafka_config)
        self.topic = topic
        self.apply = apply
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()  # a confluent-kafka consumer is not for concurrent use
        self.applied = 0
        self.rejected = 0
        # Set once every partition was read to the end the broker knew then: the configuration that existed
        # when the process started is all applied. Until then a budget or an override may just be unread.
        self.caught_up = False
        self._consumed = 0  # messages fetched, applied or not (read_to_end tells a quiet topic from a busy one)

    def _open(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer(
                {
                    **self.kafka,
                    **logged(),
                    "group.id": "tokenmeter-config-unused",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                }
            )
            metadata = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            if metadata.error is not None:
                consumer.close()
                raise RuntimeError(f"{self.topic}: {metadata.error}")
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
            self._consumer = consumer
        return self._consumer

    def catch_up(self, timeout: float) -> int:
        """Apply the messages available now (waiting at most ``timeout`` for the first); return how many.

        Never raises for a record: one that ``apply`` rejects (any exception but a transient one) is
        logged with its reason, counted and skipped. On a transient error (``TRANSIENT_ERRORS``) it
        returns early, positioned at that record, so the next call retries it. Reads for about a second more
        than ``timeout`` at most: a topic written to all the time must not keep the caller (a timer, stage 1's
        loop) for ever; the next call goes on from there.
        """
        until = time.monotonic() + max(timeout, 0.0) + 1.0
        with self._lock:
            try:
                consumer = self._open()
            except Exception as exc:  # the topic may not exist yet: go on with what we have
                log.warning("%s unavailable: %s", self.topic, exc)
                return 0
            applied = 0
            wait = timeout
            while True:
                if wait > 0.05 and self._at_end(consumer):  # nothing more to wait for (an empty topic, say)
                    self.caught_up = True
                    return applied
                messages = consumer.consume(1000, wait)
                if not messages:
                    return applied
                self._consumed += len(messages)
                wait = 0.05
                for index, message in enumerate(messages):
                    if message.error():
                        continue
                    key = (message.key() or b"").decode(errors="replace")
                    try:
                        self.apply(key, message.value())
                    except TRANSIENT_ERRORS as exc:
                        log.warning(
                            "%s: cannot apply %r (partition %s, offset %s) now, will retry: %s",
                            self.topic,
                            key,
                            message.partition(),
                            message.offset(),
                            exc,
                        )
                        self._rewind(consumer, messages[index:])
                        return applied
                    except Exception as exc:
                        log.error(
                            "%s: skipping record %r (partition %s, offset %s): %s",
                            self.topic,
                            key,
                            message.partition(),
                            message.offset(),
                            exc,
                        )
                        CONFIG_REJECTED.labels(topic=self.topic).inc()
                        self.rejected += 1
                        continue
                    applied += 1
                    self.applied += 1
                if time.monotonic() >= until:
                    return applied

    def read_to_end(self, timeout: float, stop: Callable[[], bool] = lambda: False) -> bool:
        """Catch up until every partition is read up to the end it had when this call began (later records
        do not move the goal: a busy topic is still read to an end); then ``caught_up``. False if ``timeout``
        passed or ``stop()`` said so first. A slow read (a broker down, its partitions' leaders moving) is
        logged every 10 s."""
        started = told = time.monotonic()
        goal: dict[int, int] | None = None
        quiet = 0
        last: tuple[int, dict[int, int]] = (-1, {})
        while not self.caught_up:
            now = time.monotonic()
            if now - started >= timeout or stop():
                return False
            if now - told >= 10.0:
                log.warning(
                    "%s: still reading it to its end after %.0fs (%d records applied)",
                    self.topic,
                    now - started,
                    self.applied,
                )
                told = now
            try:
                if goal is None:
                    with self._lock:
                        goal = self._ends(self._open())
                self.catch_up(1.0)
                with self._lock:
                    consumer = self._consumer
                    if consumer is None:
                        continue
                    if self._reached(consumer, goal):
                        self.caught_up = True
                        continue
                    # Not at the goal, yet nothing more comes: records at the end of a compacted topic can be
                    # cleaned away (an old tombstone) while the end offset stays. Three quiet rounds in a row with
                    # every partition read from and its leader answering (_ends raises otherwise) mean that.
                    positions = {p.partition: p.offset for p in consumer.position(consumer.assignment())}
                    now_read = (self._consumed, positions)
                    quiet = quiet + 1 if now_read == last and min(positions.values(), default=-1) >= 0 else 0
                    last = now_read
                    if quiet >= 3:
                        ends = self._ends(consumer)
                        log.warning(
                            "%s: nothing after offsets %s though the partitions end at %s (records compacted away); "
                            "taking it as read to its end",
                            self.topic,
                            positions,
                            ends,
                        )
                        self.caught_up = True
            except Exception as exc:  # the topic or its leaders not reachable yet: a new consumer, shortly
                log.warning("%s: cannot read it to its end yet (%s); trying again", self.topic, exc)
                self.close()
                goal, quiet = None, 0
                stop_wait = time.monotonic() + 0.5
                while time.monotonic() < stop_wait and not stop():
                    time.sleep(0.05)
        return True

    def _ends(self, consumer: Consumer) -> dict[int, int]:
        """Each assigned partition's end offset as the broker knows it now (raises when it cannot say)."""
        assignment = consumer.assignment()
        if not assignment:
            raise RuntimeError("no partitions assigned")
        return {tp.partition: consumer.get_watermark_offsets(tp, timeout=2.0, cached=False)[1] for tp in assignment}

    def _reached(self, consumer: Consumer, ends: Mapping[int, int]) -> bool:
        """Whether every partition has been read up to ``ends``."""
        for position in consumer.position(consumer.assignment()):
            if position.offset < 0:  # nothing read yet: only an empty partition is at its end
                low, _ = consumer.get_watermark_offsets(position, timeout=2.0, cached=False)
                offset = low
            else:
                offset = position.offset
            if offset < ends.get(position.partition, 0):
                return False
        return True

    def _at_end(self, consumer: Consumer) -> bool:
        """Whether every partition has been read up to its end as the broker knows it now (so a start-up
        catch-up need not wait out its timeout); unknown counts as not."""
        try:
            return self._reached(consumer, self._ends(consumer))
        except Exception as exc:
            log.debug("%s: end offsets unknown: %s", self.topic, exc)
            return False

    def _rewind(self, consumer: Consumer, unapplied: Sequence[Message]) -> None:
        """Seek each partition back to its first message not yet applied."""
        first: dict[int, int] = {}
        for message in unapplied:
            partition, offset = message.partition(), message.offset()
            if not message.error() and partition is not None and offset is not None:
                first.setdefault(partition, offset)
        try:
            for partition, offset in first.items():
                consumer.seek(TopicPartition(self.topic, partition, offset))
        except Exception as exc:
            # Cannot seek: read the topic again from the beginning next time. Applying a record
            # twice is harmless (the latest value per key wins), skipping one is not.
            log.warning("%s: cannot seek back (%s); will re-read the topic", self.topic, exc)
            consumer.close()
            self._consumer = None

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
