"""The OTLP/HTTP receiver (deploy/otlp.py) over real HTTP, with in-memory stand-ins for Kafka: status codes,
encodings, partial success, dead letters, stopping, and the real OpenTelemetry exporter as a client."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploy.otlp import OtlpReceiver, make_server
from deploy.settings import Settings
from producers.producer import ProducerStats
from schemas import codec
from schemas.events import UsageEvent
from tests.producers.test_otlp_mapping import TRACE, chat, request, span

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 1024


@dataclass
class RecordingProducer:
    """UsageProducer's surface the receiver uses."""

    events: list[UsageEvent] = field(default_factory=list)
    closed: bool = False

    def record(self, event: UsageEvent) -> str:
        if self.closed:
            raise RuntimeError("UsageProducer is closed")
        self.events.append(event)
        return event.event_id

    def close(self, timeout: float = 10.0) -> ProducerStats:
        self.closed = True
        return ProducerStats(len(self.events), len(self.events), 0, 0, 0, 0, 0)


@dataclass
class RecordingKafka:
    """A confluent-kafka Producer that acknowledges (or fails) every message at the next poll."""

    fail: bool = False
    messages: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    callbacks: list[Callable[[KafkaError | None, Any], None]] = field(default_factory=list)

    def produce(self, topic: str, key: bytes | None, value: bytes, on_delivery: Callable[..., None]) -> None:
        self.messages.append((topic, key, value))
        self.callbacks.append(on_delivery)

    def poll(self, _timeout: float) -> int:
        done, self.callbacks = self.callbacks, []
        for callback in done:
            callback(KafkaError(KafkaError._MSG_TIMED_OUT) if self.fail else None, None)
        return len(done)

    def flush(self, _timeout: float) -> int:
        self.poll(0)
        return 0


@dataclass
class Running:
    url: str
    receiver: OtlpReceiver
    producer: RecordingProducer
    kafka: RecordingKafka
    settings: Settings


@pytest.fixture
def running(settings: Settings, tmp_path: Path) -> Iterator[Running]:
    own = settings.model_copy(update={"otlp_max_body_bytes": LIMIT, "spool_dir": tmp_path})
    producer, kafka = RecordingProducer(), RecordingKafka()
    receiver = OtlpReceiver(own, producer=producer, dead_letters=kafka)  # type: ignore[arg-type]
    server = make_server(receiver, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Running(f"http://127.0.0.1:{server.server_address[1]}", receiver, producer, kafka, own)
    finally:
        server.shutdown()
        server.server_close()


def post(
    url: str, body: bytes, content_type: str = "application/x-protobuf", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def protobuf_status(body: bytes) -> status_pb2.Status:
    status = status_pb2.Status()
    status.ParseFromString(body)
    return status


def two_chats_and_one_without_tenant() -> bytes:
    batch = request(span(1, chat()), span(2, chat()), span(3, chat(**{"tenant.id": ""})), resource={})
    batch.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="tenant.id").value.string_value = "acme"
    batch.resource_spans[0].scope_spans[0].spans[1].attributes.add(key="tenant.id").value.string_value = "acme"
    return batch.SerializeToString()


def test_a_protobuf_export_is_recorded_and_answered_in_protobuf(running: Running) -> None:
    body = request(span(1, chat()), span(2, chat())).SerializeToString()
    status, headers, answer = post(running.url + "/v1/traces", body)
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    response = ExportTraceServiceResponse()
    response.ParseFromString(answer)
    assert not response.HasField("partial_success")
    assert [e.tenant_id for e in running.producer.events] == ["acme", "acme"]
    assert running.kafka.messages == []


def test_gzip_and_deflate_otlp_json_is_answered_in_json(running: Running) -> None:
    original = request(span(1, chat()))
    document = json_format.MessageToDict(original)
    ids = document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    ids["traceId"], ids["spanId"] = original.resource_spans[0].scope_spans[0].spans[0].trace_id.hex(), "01" * 8
    text = json.dumps(document).encode()
    for compressed, encoding in ((gzip.compress(text), "gzip"), (zlib.compress(text), "deflate")):
        status, headers, answer = post(
            running.url + "/v1/traces", compressed, "application/json; charset=utf-8", **{"Content-Encoding": encoding}
        )
        assert (status, headers["Content-Type"], json.loads(answer)) == (200, "application/json", {})
    assert [e.event_id[-16:] for e in running.producer.events] == ["01" * 8] * 2


def test_a_span_without_tenant_is_dead_lettered_and_counted_as_rejected(running: Running) -> None:
    status, _headers, answer = post(running.url + "/v1/traces", two_chats_and_one_without_tenant())
    assert status == 200
    response = ExportTraceServiceResponse()
    response.ParseFromString(answer)
    assert response.partial_success.rejected_spans == 1
    assert "no tenant: none of tenant.id is set" in response.partial_success.error_message
    assert len(running.producer.events) == 2
    ((topic, key, value),) = running.kafka.messages
    letter = codec.decode("dead_letter", value)
    assert topic == running.settings.topic_dlq
    assert key == letter["original_key"] == f"otlp-{TRACE.hex()}-{3:016x}".encode()
    assert letter["stage"] == "validate" and letter["source_topic"] == "otlp/v1/traces"
    assert (letter["source_partition"], letter["source_offset"]) == (-1, -1)
    assert letter["reason"].startswith("no tenant")
    original = json.loads(letter["original_value"])
    assert original["event_id"] == key.decode() and original["input_tokens"] == 1000
    assert running.receiver.counts["rejected"] == 1 and running.receiver.counts["events"] == 2


def test_dead_letters_kafka_does_not_take_make_the_export_retryable(running: Running) -> None:
    running.kafka.fail = True
    status, headers, answer = post(running.url + "/v1/traces", two_chats_and_one_without_tenant())
    assert (status, headers["Retry-After"]) == (503, "5")
    assert "dead-letter topic" in protobuf_status(answer).message


@pytest.mark.parametrize(
    ("body", "headers", "code", "message"),
    [
        (b"{}", {"Content-Type": "text/plain"}, 415, "unsupported Content-Type"),
        (b"{}", {"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, 415, "Content-Encoding"),
        (b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"}, 400, "protobuf"),
        (b"\x1f\x8b\x08\x00garbage", {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400, ""),
        (gzip.compress(b"{}")[:-6], {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, 400, ""),
        (b"x" * (LIMIT + 1), {"Content-Type": "application/x-protobuf"}, 413, "smaller batches"),
        (
            gzip.compress(b"\0" * (LIMIT * 10)),
            {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
            413,
            "",
        ),
    ],
)
def test_bad_requests_get_the_otlp_status_codes_with_a_status_body(
    running: Running, body: bytes, headers: dict[str, str], code: int, message: str
) -> None:
    status, answer_headers, answer = post(running.url + "/v1/traces", body, **headers)
    assert status == code
    assert answer_headers["Content-Type"] == "application/x-protobuf"
    assert message in protobuf_status(answer).message
    assert running.producer.events == []


def test_a_malformed_json_export_gets_a_json_status(running: Running) -> None:
    status, headers, answer = post(running.url + "/v1/traces", b"{oops", "application/json")
    assert (status, headers["Content-Type"]) == (400, "application/json")
    assert "malformed JSON" in json.loads(answer)["message"]


def test_other_paths_and_methods_are_refused(running: Running) -> None:
    assert post(running.url + "/v1/metrics", b"")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(running.url + "/v1/traces", timeout=10)
    assert refused.value.code == 405


def test_one_connection_carries_several_exports(running: Running) -> None:
    host, port = running.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    for span_id in (1, 2, 3):
        body = request(span(span_id, chat())).SerializeToString()
        connection.request("POST", "/v1/traces", body, {"Content-Type": "application/x-protobuf"})
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    connection.close()
    assert len(running.producer.events) == 3


def test_a_stopping_receiver_refuses_with_a_retryable_status(running: Running) -> None:
    stats = running.receiver.close(timeout=5)
    assert running.producer.closed and stats.recorded == 0
    status, headers, _answer = post(running.url + "/v1/traces", request(span(1, chat())).SerializeToString())
    assert (status, headers["Retry-After"]) == (503, "5")


def test_the_opentelemetry_sdk_exporter_talks_to_the_receiver(running: Running) -> None:
    collected = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"tenant.id": "acme", "deployment.environment": "dev"}))
    provider.add_span_processor(SimpleSpanProcessor(collected))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("chat gpt-4o", attributes=chat()):
        pass
    spans = collected.get_finished_spans()
    for compression in (Compression.NoCompression, Compression.Gzip):
        exporter = OTLPSpanExporter(endpoint=running.url + "/v1/traces", compression=compression, timeout=10)
        assert exporter.export(spans) == SpanExportResult.SUCCESS
        exporter.shutdown()
    first, again = running.producer.events
    assert first == again and first.environment == "dev"
    assert first.trace_id == format(spans[0].context.trace_id, "032x")


def test_the_command_refuses_a_busy_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "TOKENMETER_SPOOL_DIR": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-m", "deploy", "otlp", "--port", str(port)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr


def test_the_command_says_where_it_listens_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENMETER_SPOOL_DIR": str(tmp_path), "TOKENMETER_OTLP_COUNT_RULE": "operation"}
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy", "otlp", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    assert "listening on http://127.0.0.1:" in first and "/v1/traces" in first, first
    assert "counting spans whose operation is chat, embeddings" in first and "tenant from tenant.id" in first
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "stopped after 0 requests" in out
