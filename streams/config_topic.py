"""Following a compacted config topic (budgets, price overrides) from its beginning, in every worker.

No consumer group: each worker reads every partition, so all of them hold the same configuration,
and compaction keeps the topic to the latest value per key (a null value deletes the key).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

log = logging.getLogger("tokenmeter.config")

Apply = Callable[[str, bytes | None], None]


class ConfigFollower:
    """Calls ``apply(key, value)`` for each message of ``topic``; ``catch_up`` reads what is new."""

    def __init__(self, bootstrap: str, topic: str, apply: Apply) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.apply = apply
        self._consumer: Consumer | None = None
        self._lock = threading.Lock()  # a confluent-kafka consumer is not for concurrent use
        self.applied = 0

    def _open(self) -> Consumer:
        if self._consumer is None:
            consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "tokenmeter-config-unused",
                                 "enable.auto.commit": False, "auto.offset.reset": "earliest"})  # fmt: skip
            metadata = consumer.list_topics(self.topic, timeout=10).topics[self.topic]
            if metadata.error is not None:
                consumer.close()
                raise RuntimeError(f"{self.topic}: {metadata.error}")
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
            self._consumer = consumer
        return self._consumer

    def catch_up(self, timeout: float) -> int:
        """Apply the messages available now (waiting at most ``timeout`` for the first); return how many."""
        with self._lock:
            try:
                consumer = self._open()
            except Exception as exc:  # the topic may not exist yet: go on with what we have
                log.warning("%s unavailable: %s", self.topic, exc)
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
                    try:
                        self.apply(key, message.value())
                    except (ValueError, KeyError, TypeError) as exc:
                        log.error("ignoring %s entry %r: %s", self.topic, key, exc)
                        continue
                    applied += 1
                    self.applied += 1

    def close(self) -> None:
        with self._lock:
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
