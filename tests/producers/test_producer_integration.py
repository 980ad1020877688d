"""UsageProducer against the real broker: delivery, and the durable spool across a Kafka outage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.context import usage_context
from producers.producer import UsageProducer
from schemas.events import InvalidEvent, decode_usage
from tests.helpers import create_topic, read_all


def test_recorded_events_reach_the_raw_topic(
    stack: LocalStack, settings: Settings, unique: str, tmp_path: Path
) -> None:
    topic = f"test.raw.{unique}"
    create_topic(settings, topic)
    own = settings.model_copy(update={"spool_dir": tmp_path})
    with UsageProducer(own, topic=topic) as producer, usage_context(tenant_id="acme", feature="search"):
        sent = [
            producer.record({"provider": "openai", "model": "gpt-4o", "input_tokens": i, "output_tokens": 1})
            for i in range(50)
        ]
        with pytest.raises(InvalidEvent, match="input_tokens"):
            producer.record({"provider": "openai", "model": "gpt-4o", "input_tokens": -5, "output_tokens": 1})
    assert producer.stats.delivered == 50 and producer.stats.spooled == 0
    got = sorted((decode_usage(v) for v in read_all(settings, topic, expect=50)), key=lambda e: e.input_tokens)
    assert [e.event_id for e in got] == sent
    assert [e.input_tokens for e in got] == list(range(50))
    assert {e.tenant_id for e in got} == {"acme"} and {e.feature for e in got} == {"search"}
    with pytest.raises(RuntimeError, match="closed"):
        producer.record({"provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1})


RECORD_AND_EXIT = textwrap.dedent(
    """
    import sys
    from producers.producer import UsageProducer
    producer = UsageProducer(topic=sys.argv[1], message_timeout_s=5)
    for i in range(100):
        producer.record({"event_id": f"spool-{i}", "tenant_id": "t-spool", "provider": "openai",
                         "model": "gpt-4o-mini", "input_tokens": 10 + i, "output_tokens": 3})
    # no close(): the process just exits, as services do; the library spools at exit
    """
)


def test_events_recorded_while_kafka_is_down_arrive_exactly_once(
    stack: LocalStack, settings: Settings, unique: str, tmp_path: Path
) -> None:
    topic = f"test.spool.{unique}"
    create_topic(settings, topic)
    env = {**os.environ, "TOKENMETER_SPOOL_DIR": str(tmp_path)}
    stack.stop_kafka(progress=lambda _m: None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", RECORD_AND_EXIT, topic], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert list(tmp_path.glob("spool-*.log")), "the exiting process left no spool"
    finally:
        stack.start_kafka(progress=lambda _m: None)
    replayer = UsageProducer(settings.model_copy(update={"spool_dir": tmp_path}), topic=topic)
    stats = replayer.close(timeout=30)
    assert stats.replayed == 100
    assert list(tmp_path.glob("spool-*.log")) == []
    events = [decode_usage(v) for v in read_all(settings, topic, timeout=30)]
    assert len(events) == 100
    assert sorted(e.event_id for e in events) == sorted(f"spool-{i}" for i in range(100))


def test_an_event_that_fails_to_encode_does_not_stop_delivery(
    stack: LocalStack, settings: Settings, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import producers.producer as producer_module

    topic = f"test.raw.{unique}"
    create_topic(settings, topic)
    real_writer = producer_module.write_usage

    def writer(record: dict[str, Any]) -> bytes:
        if record["event_id"] == "poison":
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")  # what a lone surrogate did
        return real_writer(record)

    monkeypatch.setattr(producer_module, "write_usage", writer)
    usage = {"tenant_id": "acme", "provider": "openai", "model": "gpt-4o", "input_tokens": 1, "output_tokens": 1}
    producer = UsageProducer(settings.model_copy(update={"spool_dir": tmp_path}), topic=topic)
    sent = [producer.record({**usage, "event_id": f"before-{i}"}) for i in range(5)]
    sent.append(producer.record({**usage, "event_id": "poison"}))
    assert producer.flush(30) == 0
    sent += [producer.record({**usage, "event_id": f"after-{i}"}) for i in range(5)]
    stats = producer.close(timeout=30)
    assert (stats.delivered, stats.encode_failures, stats.spooled, stats.dropped) == (11, 1, 0, 0)
    values = read_all(settings, topic, expect=11)
    assert sorted(decode_usage(v).event_id for v in values) == sorted(sent)
    assert [decode_usage(v).event_id for v in values if v.startswith(b"{")] == ["poison"]  # as JSON, still billable
