"""librdkafka's lines through Python logging: the level mapping, and a UsageProducer on a broker that has just
started (whose first producer always meets "Coordinator load in progress") printing nothing to stderr."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.kafka_logging import KafkaLogger, error_level, from_syslog, line_level
from producers.producer import UsageProducer

GETPID = (
    "Failed to acquire idempotence PID from broker 127.0.0.1:29092/1: Broker: Coordinator load in progress: retrying"
)


def test_syslog_levels_map_to_logging_levels() -> None:
    assert [from_syslog(level) for level in range(8)] == [logging.CRITICAL] * 3 + [
        logging.ERROR,
        logging.WARNING,
        logging.INFO,
        logging.INFO,
        logging.DEBUG,
    ]
    assert from_syslog(42) == logging.DEBUG


def test_transient_lines_drop_to_info_and_the_rest_keep_their_level() -> None:
    assert line_level(logging.WARNING, f"GETPID [rdkafka#producer-1] [thrd:main]: {GETPID}") == logging.INFO
    assert line_level(logging.WARNING, "PARTCNT [thrd:main]: Topic usage.raw partition 0: Leader not available") == (
        logging.INFO
    )
    assert line_level(logging.ERROR, "FETCH: Broker: Not leader for partition") == logging.INFO
    assert line_level(logging.DEBUG, GETPID) == logging.DEBUG  # never raised
    refused = "FAIL [thrd:127.0.0.1:1/bootstrap]: Connect to ipv4#127.0.0.1:1 failed: Connection refused"
    assert line_level(logging.ERROR, refused) == logging.ERROR
    assert line_level(logging.WARNING, "Topic x: Broker: Topic authorization failed") == logging.WARNING


def test_client_errors_are_rated() -> None:
    assert error_level(KafkaError(KafkaError._TRANSPORT)) == logging.INFO
    assert error_level(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)) == logging.INFO
    assert error_level(KafkaError(KafkaError._ALL_BROKERS_DOWN)) == logging.WARNING  # an outage: the spool fills
    assert error_level(KafkaError(KafkaError._AUTHENTICATION)) == logging.WARNING
    assert error_level(KafkaError(KafkaError._TRANSPORT, fatal=True)) == logging.ERROR


def test_kafka_logger_takes_confluent_kafkas_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenmeter.test-kafka")
    logger = KafkaLogger("tokenmeter.test-kafka")
    logger.log(logging.WARNING, "%s [%s] %s", "GETPID", "rdkafka#producer-1", GETPID)
    logger.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-1", "Connection refused")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("tokenmeter.test-kafka", logging.INFO, f"GETPID [rdkafka#producer-1] {GETPID}"),
        ("tokenmeter.test-kafka", logging.ERROR, "FAIL [rdkafka#producer-1] Connection refused"),
    ]


@pytest.fixture
def fresh_kafka(tmp_path: Path) -> Iterator[Settings]:
    """A broker of its own, just started (about 3 s), on ports no test slot's stack, `dev up` or
    tests/deploy/test_private_clone.py uses (+ 100 per test slot, as theirs), and below Linux's ephemeral
    range (32768-60999): 35094 once collided with an outgoing connection's local port (bind failed)."""
    port = 31094 + 100 * int(os.environ.get("TOKENMETER_TEST_SLOT", "0") or 0)
    settings = Settings(home=tmp_path / "stack", kafka_port=port, kafka_controller_port=port + 1)
    stack = LocalStack(settings)
    stack.start_kafka(progress=lambda _m: None)
    try:
        yield settings
    finally:
        stack.stop_kafka(progress=lambda _m: None, kill=True)
        shutil.rmtree(settings.home, ignore_errors=True)


@pytest.mark.integration
def test_a_producer_on_a_fresh_broker_prints_nothing_and_logs_the_retry_at_info(
    fresh_kafka: Settings, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tokenmeter")
    with UsageProducer(fresh_kafka, topic="usage.fresh", replay_spool=False) as producer:
        for i in range(20):
            producer.record(
                {"tenant_id": "acme", "provider": "openai", "model": "gpt-4o", "input_tokens": i, "output_tokens": 1}
            )
    assert producer.stats.delivered == 20 and producer.stats.spooled == 0
    assert capfd.readouterr().err == ""  # librdkafka wrote nothing to the process's stderr itself
    kafka = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tokenmeter.kafka"]
    assert any(level == logging.INFO and "Coordinator load in progress" in text for level, text in kafka), kafka
    # Nothing at WARNING or above: a program without logging configured prints none of it (last-resort handler).
    loud = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert not loud, loud
