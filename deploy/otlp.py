"""``tokenmeter otlp``: an OTLP/HTTP trace receiver that meters OpenTelemetry GenAI spans.

``POST /v1/traces`` takes an ``ExportTraceServiceRequest`` as binary protobuf (``application/x-protobuf``) or
OTLP/JSON (``application/json``), optionally compressed (``Content-Encoding: gzip``, or ``deflate``). Spans map to usage
events by the rules of ``producers/otlp.py``; the events go through ``UsageProducer`` (never blocks; what
Kafka does not take goes to the spool), spans with usage that make no valid event go to ``usage.dlq`` as the
pipeline's own dead letters (``schemas/dead_letter.v2.avsc``: stage ``validate``, source
``otlp/v1/traces``, partition and offset -1, key the event id, value the fields as mapped, in JSON).

Responses follow OTLP/HTTP: 200 with an ``ExportTraceServiceResponse`` in the request's encoding, whose
``partial_success`` counts the rejected spans and names their reasons; 400 for a body that does not
decode, 413 over ``TOKENMETER_OTLP_MAX_BODY_BYTES``, 415 for other content types or encodings, each with a
``google.rpc.Status``. 503 (retryable: exporters send the batch again) when dead letters could not be
written to Kafka in time, or while the receiver stops; a retried batch maps to the same event ids, so its
events are counted once.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from google.protobuf import json_format
from google.protobuf.message import Message as ProtobufMessage
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from deploy.settings import Settings, kafka_config
from producers.kafka_logging import logged
from producers.otlp import JSON, PROTOBUF, MappingConfig, RejectedSpan, SpanMapper, UndecodableRequest, decode_request
from producers.producer import ProducerStats, UsageProducer
from schemas import codec
from streams.pipeline import RawMessage, Rejected, dead_letter_record

log = logging.getLogger("tokenmeter.otlp")
write_dead_letter = codec.record_writer("dead_letter")

TRACES_PATH = "/v1/traces"
DEAD_LETTER_SOURCE = "otlp/v1/traces"  # source_topic of our dead letters: they come from no Kafka topic
DEAD_LETTER_WAIT_S = 10.0  # how long a request waits for its dead letters to be acknowledged before 503
RETRY_AFTER_S = 5
MAX_ERROR_MESSAGE = 2000


@dataclass(frozen=True)
class Reply:
    status: HTTPStatus
    content_type: str
    body: bytes
    retry_after_s: int | None = None


class _TooLarge(Exception):
    pass


class OtlpReceiver:
    """Everything between a request body and Kafka, without HTTP (the server calls ``handle``).

    Thread-safe: the HTTP server calls ``handle`` from a thread per connection.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        mapper: SpanMapper | None = None,
        producer: UsageProducer | None = None,
        dead_letters: Producer | None = None,
    ) -> None:
        self.settings = settings
        self.mapper = mapper or SpanMapper(MappingConfig.from_settings(settings))
        self.producer = producer or UsageProducer(settings)
        options = {"enable.idempotence": True, "acks": "all", "linger.ms": 5}
        options["message.timeout.ms"] = int(DEAD_LETTER_WAIT_S * 1000)
        self._dead_letters = dead_letters or Producer(kafka_config(settings, **options, **logged()))
        self.counts: Counter[str] = Counter()
        self._busy = 0
        self._closing = False
        self._idle = threading.Condition()

    # ---------------------------------------------------------------- one request
    def handle(self, body: bytes, content_type: str | None, content_encoding: str | None = None) -> Reply:
        with self._idle:
            if self._closing:
                return _status(HTTPStatus.SERVICE_UNAVAILABLE, "the receiver is stopping; retry", PROTOBUF)
            self._busy += 1
            self.counts["requests"] += 1
        try:
            return self._export(body, content_type or "", content_encoding or "")
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def _export(self, body: bytes, content_type: str, content_encoding: str) -> Reply:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type not in (PROTOBUF, JSON):
            return _status(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"unsupported Content-Type {content_type!r}: send {PROTOBUF} or {JSON}",
                PROTOBUF,
            )
        encoding = content_encoding.strip().lower()
        if encoding not in ("", "identity", *_INFLATE_WBITS):
            return _status(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f"unsupported Content-Encoding {encoding!r}: gzip, deflate or none",
                media_type,
            )
        limit = self.settings.otlp_max_body_bytes
        try:
            data = _inflate(body, encoding, limit) if encoding in _INFLATE_WBITS else body
            if len(data) > limit:
                raise _TooLarge
            request = decode_request(data, media_type)
        except _TooLarge:
            message = f"request over {limit} bytes (TOKENMETER_OTLP_MAX_BODY_BYTES): export smaller batches"
            return _status(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, media_type)
        except (UndecodableRequest, zlib.error) as exc:
            return _status(HTTPStatus.BAD_REQUEST, str(exc) or type(exc).__name__, media_type)

        mapped = self.mapper.map_request(request)
        try:
            for event in mapped.events:
                self.producer.record(event)
        except RuntimeError:  # closed under us: the exporter retries, and the retry is counted once
            return _status(HTTPStatus.SERVICE_UNAVAILABLE, "the receiver is stopping; retry", media_type)
        with self._idle:
            self.counts.update(spans=mapped.spans, events=len(mapped.events), not_counted=mapped.not_counted)
        if mapped.rejected and not self._dead_letter(mapped.rejected):
            message = "could not write rejected spans to the dead-letter topic (Kafka unavailable?); retry"
            return _status(HTTPStatus.SERVICE_UNAVAILABLE, message, media_type)
        with self._idle:
            self.counts["rejected"] += len(mapped.rejected)

        response = ExportTraceServiceResponse()
        if mapped.rejected:
            response.partial_success.rejected_spans = len(mapped.rejected)
            response.partial_success.error_message = _rejection_summary(mapped.rejected, self.settings.topic_dlq)
            log.warning("%s", response.partial_success.error_message)
        return Reply(HTTPStatus.OK, media_type, _encode(response, media_type))

    def _dead_letter(self, rejected: list[RejectedSpan]) -> bool:
        """Publish one dead letter per rejected span; True once Kafka acknowledged them all."""
        outcomes: list[KafkaError | None] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            outcomes.append(err)

        now = datetime.now().astimezone()
        for span in rejected:
            key = span.event_id.encode() or None
            source = RawMessage(DEAD_LETTER_SOURCE, -1, -1, key, span.to_json())
            record = dead_letter_record(Rejected(source, span.reason, "validate"), now)
            try:
                self._dead_letters.produce(
                    self.settings.topic_dlq, key=key, value=write_dead_letter(record), on_delivery=delivered
                )
            except Exception as exc:  # a full queue (BufferError) or a refused record: the exporter retries
                log.error("cannot queue a dead letter for %s: %s", span.describe(), exc)
                return False
        deadline = time.monotonic() + DEAD_LETTER_WAIT_S
        while len(outcomes) < len(rejected) and time.monotonic() < deadline:
            self._dead_letters.poll(0.05)
        failed = [err for err in outcomes if err is not None]
        if failed or len(outcomes) < len(rejected):
            log.error("dead letters not acknowledged: %s", failed[0] if failed else "timed out")
            return False
        return True

    # ---------------------------------------------------------------- stopping
    def close(self, timeout: float = 10.0) -> ProducerStats:
        """Refuse new requests, let those in flight finish, then deliver (or spool) every usage event."""
        with self._idle:
            self._closing = True
            self._idle.wait_for(lambda: self._busy == 0, timeout=timeout)
        stats = self.producer.close(timeout=timeout)
        self._dead_letters.flush(timeout)
        return stats


# OTLP/HTTP names gzip; the Python SDK's exporter also offers deflate (zlib format, as HTTP means it).
_INFLATE_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate at most ``limit`` + 1 bytes, so a small bomb cannot take the memory."""
    inflater = zlib.decompressobj(wbits=_INFLATE_WBITS[encoding])
    data = inflater.decompress(body, limit + 1)
    if len(data) > limit:
        raise _TooLarge
    if not inflater.eof:
        raise zlib.error(f"truncated {encoding} body")
    return data


def _encode(message: ProtobufMessage, media_type: str) -> bytes:
    if media_type == JSON:
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


_GRPC_CODES = {
    HTTPStatus.BAD_REQUEST: code_pb2.INVALID_ARGUMENT,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: code_pb2.RESOURCE_EXHAUSTED,
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE: code_pb2.UNIMPLEMENTED,
    HTTPStatus.SERVICE_UNAVAILABLE: code_pb2.UNAVAILABLE,
    HTTPStatus.NOT_FOUND: code_pb2.NOT_FOUND,
    HTTPStatus.METHOD_NOT_ALLOWED: code_pb2.UNIMPLEMENTED,
    HTTPStatus.LENGTH_REQUIRED: code_pb2.INVALID_ARGUMENT,
}


def _status(status: HTTPStatus, message: str, media_type: str) -> Reply:
    """An OTLP/HTTP error: a ``google.rpc.Status`` in the request's encoding."""
    body = _encode(status_pb2.Status(code=_GRPC_CODES.get(status, code_pb2.UNKNOWN), message=message), media_type)
    retry = RETRY_AFTER_S if status == HTTPStatus.SERVICE_UNAVAILABLE else None
    return Reply(status, media_type, body, retry)


def _rejection_summary(rejected: list[RejectedSpan], topic: str) -> str:
    text = f"{len(rejected)} span(s) with usage rejected (dead-lettered to {topic}): " + "; ".join(
        span.describe() for span in rejected[:5]
    )
    if len(rejected) > 5:
        text += f"; and {len(rejected) - 5} more"
    return text[:MAX_ERROR_MESSAGE]


# ---------------------------------------------------------------- HTTP
def make_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    limit = receiver.settings.otlp_max_body_bytes

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: exporters reuse one connection for their batches
        server_version = "tokenmeter-otlp"
        timeout = 120  # an idle keep-alive connection's thread ends after this many seconds

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

        def _send(self, reply: Reply) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            if reply.retry_after_s is not None:
                self.send_header("Retry-After", str(reply.retry_after_s))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply.body)

        def _refuse(self, status: HTTPStatus, message: str) -> None:
            """Answer without reading the body: the connection cannot carry another request after it."""
            self.close_connection = True
            media_type = JSON if (self.headers.get("Content-Type") or "").startswith(JSON) else PROTOBUF
            self._send(_status(status, message, media_type))

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != TRACES_PATH:
                self._refuse(HTTPStatus.NOT_FOUND, f"only {TRACES_PATH} is served here (traces)")
                return
            length_header = self.headers.get("Content-Length")
            if length_header is None or not length_header.strip().isdigit():
                self._refuse(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
                return
            length = int(length_header)
            if length > limit:
                if length <= 4 * limit:  # read it, so the exporter gets the 413 rather than a reset connection
                    self._skip(length)
                self._refuse(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request over {limit} bytes: export smaller batches")
                return
            body = self.rfile.read(length)
            reply = receiver.handle(body, self.headers.get("Content-Type"), self.headers.get("Content-Encoding"))
            self._send(reply)

        def _skip(self, length: int) -> None:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    return
                length -= len(chunk)

        def _not_allowed(self) -> None:
            self._refuse(HTTPStatus.METHOD_NOT_ALLOWED, f"POST OTLP trace exports to {TRACES_PATH}")

        do_GET = do_PUT = do_DELETE = do_PATCH = _not_allowed

    return Handler


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def make_server(receiver: OtlpReceiver, host: str, port: int) -> ThreadingHTTPServer:
    """The receiver's HTTP server, bound (OSError if the address is taken); ``serve_forever`` runs it."""
    server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), make_handler(receiver))
    server.daemon_threads = True  # idle keep-alive connections must not hold up the exit
    return server


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    name = str(host)
    return f"http://{f'[{name}]' if ':' in name else name}:{port}{TRACES_PATH}"


def serve(settings: Settings, host: str, port: int, say: Callable[[str], None]) -> ProducerStats:
    """Run until SIGTERM or Ctrl-C, then stop cleanly: requests in flight finish, usage events are delivered
    or spooled. Raises OSError when the address cannot be bound."""
    receiver = OtlpReceiver(settings)
    try:
        server = make_server(receiver, host, port)
    except OSError:
        receiver.close(timeout=1.0)
        raise

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # leaves serve_forever on the main thread, as Ctrl-C does

    previous = signal.getsignal(signal.SIGTERM)
    try:  # from the handler on: a SIGTERM at any point (even while saying where we listen) stops cleanly
        signal.signal(signal.SIGTERM, stop)
        say(
            f"tokenmeter otlp: listening on {url_of(server)} (OTLP/HTTP, protobuf or JSON, gzip); "
            f"{receiver.mapper.config.describe()}; usage events to {settings.topic_raw}, rejected spans to "
            f"{settings.topic_dlq}. Ctrl-C or SIGTERM stops."
        )
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        stats = receiver.close()
    counts = receiver.counts
    say(
        f"tokenmeter otlp: stopped after {counts['requests']} requests: {counts['events']} usage events "
        f"(delivered {stats.delivered}, spooled {stats.spooled}), {counts['rejected']} spans rejected, "
        f"{counts['not_counted']} roll-up spans not counted"
    )
    return stats
