"""Per-tenant price overrides from the compacted ``config.price-overrides`` topic.

Each message: key = override id, value = JSON ``{"tenant_id", "provider", "model", "effective_from",
"input_mtok", "output_mtok", "cache_read_mtok"?, "cache_write_mtok"?}`` (USD per million tokens as
decimal strings); a null value (tombstone) removes the override. Every worker reads the whole topic
(no consumer group), so all of them price alike, and compaction keeps it small.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from decimal import Decimal
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from deploy.settings import Settings
from streams.pricing import PriceBook, PriceOverride, TokenRates

log = logging.getLogger("tokenmeter.overrides")


def parse_override(override_id: str, value: bytes) -> PriceOverride:
    data: dict[str, Any] = json.loads(value)
    effective_from = datetime.fromisoformat(data["effective_from"])
    if effective_from.tzinfo is None:
        raise ValueError("effective_from needs a time zone")

    def rate(name: str) -> Decimal | None:
        raw = data.get(name)
        return None if raw is None else Decimal(str(raw))

    input_rate, output_rate = rate("input_mtok"), rate("output_mtok")
    if input_rate is None or output_rate is None:
        raise ValueError("input_mtok and output_mtok are required")
    return PriceOverride(
        tenant_id=data["tenant_id"],
        provider=data["provider"],
        model=data["model"],
        effective_from=effective_from,
        rates=TokenRates(input_rate, output_rate, rate("cache_read_mtok"), rate("cache_write_mtok")),
        override_id=override_id,
    )


def override_message(override: PriceOverride) -> tuple[bytes, bytes]:
    r = override.rates
    body = {
        "tenant_id": override.tenant_id, "provider": override.provider, "model": override.model,
        "effective_from": override.effective_from.isoformat(), "input_mtok": str(r.input_mtok),
        "output_mtok": str(r.output_mtok),
        "cache_read_mtok": None if r.cache_read_mtok is None else str(r.cache_read_mtok),
        "cache_write_mtok": None if r.cache_write_mtok is None else str(r.cache_write_mtok),
    }  # fmt: skip
    return override.override_id.encode(), json.dumps(body).encode()


class OverrideFollower:
    """Applies the topic's overrides to a PriceBook; ``catch_up`` reads what is new."""

    def __init__(self, settings: Settings, book: PriceBook) -> None:
        self.settings = settings
        self.book = book
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()  # a confluent-kafka consumer is not for concurrent use
        self.applied = 0

    def _open(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer({
                "bootstrap.servers": self.settings.kafka_bootstrap, "group.id": "tokenmeter-overrides-unused",
                "enable.auto.commit": False, "auto.offset.reset": "earliest",
            })  # fmt: skip
            topic = self.settings.topic_price_overrides
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
            self._consumer = consumer
        return self._consumer

    def catch_up(self, timeout: float) -> int:
        """Apply the messages available now (waiting at most ``timeout`` for the first); return how many."""
        with self._lock:
            return self._catch_up(timeout)

    def _catch_up(self, timeout: float) -> int:
        try:
            consumer = self._open()
        except Exception as exc:  # the topic may not exist yet; pricing goes on with base prices
            log.warning("price overrides unavailable: %s", exc)
            return 0
        applied = 0
        wait = timeout
        while True:
            messages = consumer.consume(1000, wait)
            if not messages:
                return applied
            wait = 0.05
            for message in messages:
                if message.error():
                    continue
                key = (message.key() or b"").decode(errors="replace")
                value = message.value()
                try:
                    if value is None:
                        self.book.remove_override(key)
                    else:
                        self.book.set_override(parse_override(key, value))
                    applied += 1
                    self.applied += 1
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("ignoring price override %r: %s", key, exc)
