"""librdkafka's log lines and client errors through Python logging, at levels that say whether to act.

Without a ``logger`` in its config, a confluent-kafka client lets librdkafka print to stderr
(``%4|…|GETPID|… Failed to acquire idempotence PID … Coordinator load in progress: retrying``), which no
application can filter. With one, confluent-kafka maps librdkafka's syslog levels to logging levels
(``SYSLOG_LEVELS``) and calls ``logger.log`` from ``poll()``/``flush()``. librdkafka logs some conditions that it
retries and that heal by themselves at warning level, above all while a broker that has just started loads its
coordinator state; in a program that configured no logging, Python's last-resort handler would still print
them. ``KafkaLogger`` moves those to INFO and keeps every other line at its level; ``error_level`` does the
same for the ``error_cb`` of a client.

Use both in a client config: ``{"logger": KafkaLogger(), "error_cb": lambda e: log.log(error_level(e), …)}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from confluent_kafka import KafkaError

# librdkafka's levels are syslog's; confluent-kafka passes them on to a logger as these logging levels.
SYSLOG_LEVELS = {
    0: logging.CRITICAL,  # emerg
    1: logging.CRITICAL,  # alert
    2: logging.CRITICAL,  # crit
    3: logging.ERROR,  # err
    4: logging.WARNING,  # warning
    5: logging.INFO,  # notice
    6: logging.INFO,  # info
    7: logging.DEBUG,  # debug
}
# Broker answers that librdkafka retries on its own and that pass once a coordinator has loaded or a partition
# leader is elected (Kafka protocol errors COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE,
# NOT_COORDINATOR, LEADER_NOT_AVAILABLE, NOT_LEADER_OR_FOLLOWER), in librdkafka's words or by error name.
TRANSIENT = re.compile(
    r"coordinator[ _]load[ _]in[ _]progress|coordinator[ _]not[ _]available|not[ _]coordinator"
    r"|leader[ _]not[ _]available|not[ _]leader",
    re.IGNORECASE,
)
_TRANSIENT_ERRORS = {
    KafkaError._TRANSPORT,  # one connection dropped; librdkafka reconnects (all brokers down is its own code)
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
}


def from_syslog(level: int) -> int:
    """The logging level of a librdkafka (syslog) level, as confluent-kafka maps it; out of range: DEBUG."""
    return SYSLOG_LEVELS.get(level, logging.DEBUG)


def line_level(level: int, message: str) -> int:
    """The logging level for one librdkafka line that confluent-kafka handed over at ``level``: a transient,
    self-healing condition at INFO at most; anything else as librdkafka rated it."""
    return min(level, logging.INFO) if TRANSIENT.search(message) else level


def error_level(error: KafkaError) -> int:
    """The logging level for an ``error_cb`` error: fatal ones ERROR; a dropped connection or a coordinator or
    leader that is not ready yet INFO (librdkafka retries; a lasting outage shows as all brokers down);
    the rest WARNING."""
    if error.fatal():
        return logging.ERROR
    return logging.INFO if error.code() in _TRANSIENT_ERRORS else logging.WARNING


class KafkaLogger:
    """The ``logger`` of a confluent-kafka config: its lines go to the logger ``name`` at ``line_level``.

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client, text)``; anything with that method will do,
    so this is a small wrapper rather than a ``logging.Logger`` subclass (which would sit outside the logger
    tree and its handlers).
    """

    def __init__(self, name: str = "tokenmeter.kafka") -> None:
        self.logger = logging.getLogger(name)

    def log(self, level: int, msg: str, *args: object) -> None:
        text = msg % args if args else msg
        self.logger.log(line_level(level, text), "%s", text)


def logged(name: str = "tokenmeter.kafka") -> dict[str, Any]:
    """Config entries that send a client's librdkafka lines and errors through Python logging at the
    levels above, instead of librdkafka's own stderr: merge into any confluent-kafka config."""
    target = KafkaLogger(name)

    def on_error(error: KafkaError) -> None:
        target.logger.log(error_level(error), "kafka: %s", error)

    return {"logger": target, "error_cb": on_error}
