"""UsageProducer's background thread without a broker: it never dies on one event, and later events
still go out. confluent-kafka's Producer is replaced by an in-memory fake that acknowledges everything."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import producers.producer as producer_module
from deploy.settings import get_settings
from producers.producer import UsageProducer
from schemas.events import InvalidEvent, UsageEvent, decode_usage


class FakeMessage:
    def __init__(self, key: bytes, value: bytes) -> None:
        self._key, self._value = key, value

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value


class FakeKafka:
    """Stands in for ``confluent_kafka.Producer``: every produced message is acknowledged at the next poll."""

    def __init__(self, _config: dict[str, Any]) -> None:
        self.acked: list[FakeMessage] = []
        self._in_flight: list[tuple[Callable[..., None], FakeMessage]] = []
        self.fail_next_poll = 0

    def produce(self, _topic: str, *, value: bytes, key: bytes, on_delivery: Callable[..., None]) -> None:
        self._in_flight.append((on_delivery, FakeMessage(key, value)))

    def poll(self, _timeout: float = 0) -> int:
        if self.fail_next_poll:
            self.fail_next_poll -= 1
            raise RuntimeError("librdkafka hiccup")
        return self._deliver()

    def _deliver(self) -> int:
        batch, self._in_flight = self._in_flight, []
        for on_delivery, message in batch:
            on_delivery(None, message)
            self.acked.append(message)
        return len(batch)

    def flush(self, _timeout: float = 0) -> int:
        self._deliver()
        return len(self._in_flight)

    def purge(self, **_kwargs: bool) -> None:
        self._in_flight.clear()

    def __len__(self) -> int:
        return len(self._in_flight)


def usage(event_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 2,
        **extra,
    }


@pytest.fixture
def producer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> UsageProducer:
    monkeypatch.setattr(producer_module, "Producer", FakeKafka)
    settings = get_settings().model_copy(update={"spool_dir": tmp_path})
    return UsageProducer(settings, topic="test.raw", replay_spool=False)


def fake(producer: UsageProducer) -> FakeKafka:
    kafka = producer._producer
    assert isinstance(kafka, FakeKafka)
    return kafka


def test_an_event_that_fails_to_encode_is_sent_as_json_and_the_thread_goes_on(
    producer: UsageProducer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writer = producer_module.write_usage

    def writer(record: dict[str, Any]) -> bytes:
        if record["event_id"] == "poison":
            raise ValueError("forced encoding failure")
        return real_writer(record)

    monkeypatch.setattr(producer_module, "write_usage", writer)
    ids = [producer.record(usage(f"before-{i}")) for i in range(3)]
    ids.append(producer.record(usage("poison", feature="search")))
    assert producer.flush(5) == 0
    assert producer._thread.is_alive()
    ids += [producer.record(usage(f"after-{i}")) for i in range(3)]  # later events still go out
    stats = producer.close()
    assert (stats.recorded, stats.delivered, stats.encode_failures, stats.dropped, stats.spooled) == (7, 7, 1, 0, 0)
    events = [decode_usage(m.value()) for m in fake(producer).acked]
    assert [e.event_id for e in events] == ids
    (poison,) = [m for m in fake(producer).acked if m.value().startswith(b"{")]
    assert poison.key() == b"acme"
    assert decode_usage(poison.value()).feature == "search"  # a valid event the pipeline can still bill


def test_an_event_that_even_json_cannot_carry_reaches_the_pipeline_as_a_dead_letter(producer: UsageProducer) -> None:
    # model_construct skips validation: the one way left to hand the producer a lone surrogate.
    broken = UsageEvent.model_construct(**{**usage("broken\ud800"), "timestamp": producer_module._EPOCH})
    producer.record(broken)
    producer.record(usage("fine"))
    stats = producer.close()
    assert (stats.delivered, stats.encode_failures, stats.dropped) == (2, 1, 0)
    first, second = fake(producer).acked
    assert json.loads(first.value())["event_id"] == "broken\ud800"  # escaped in the JSON, not lost
    with pytest.raises(InvalidEvent, match="malformed JSON"):  # what the pipeline dead-letters, with this reason
        decode_usage(first.value())
    assert decode_usage(second.value()).event_id == "fine"


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")
def test_an_event_without_a_json_form_is_dropped_and_counted(producer: UsageProducer) -> None:
    broken = UsageEvent.model_construct(**{**usage("odd"), "timestamp": producer_module._EPOCH, "tags": {1: 2}})
    broken_too = UsageEvent.model_construct(
        **{**usage("odder"), "timestamp": producer_module._EPOCH, "tags": {("a", "b"): "c"}}
    )
    producer.record(broken)
    producer.record(broken_too)
    producer.record(usage("fine"))
    stats = producer.close()
    # {1: 2} still has a JSON form (the pipeline then rejects it); a tuple key has none.
    assert (stats.delivered, stats.encode_failures, stats.dropped) == (2, 2, 1)
    assert decode_usage(fake(producer).acked[-1].value()).event_id == "fine"


def test_an_error_outside_one_event_is_logged_and_the_thread_goes_on(
    producer: UsageProducer, caplog: pytest.LogCaptureFixture
) -> None:
    fake(producer).fail_next_poll = 2
    producer.record(usage("one"))
    assert producer.flush(5) == 0
    producer.record(usage("two"))
    assert producer._thread.is_alive()
    stats = producer.close()
    assert stats.delivered == 2
    assert "background error" in caplog.text


def test_lone_surrogates_are_refused_on_the_callers_thread(producer: UsageProducer) -> None:
    with pytest.raises(InvalidEvent, match="tenant_id: lone surrogate U\\+DC00 at position 1"):
        producer.record(usage("x", tenant_id="a\udc00"))
    with pytest.raises(InvalidEvent, match="tags: tag 'k': control character U\\+0000"):
        producer.record(usage("y", tags={"k": "\x00"}))
    assert producer.close().recorded == 0
