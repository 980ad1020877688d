"""``tokenmeter otlp`` against the real stack: spans sent by the real OpenTelemetry SDK and OTLP/HTTP exporter,
through the receiver (a subprocess, as a user runs it) and a worker, into the ledger. Each model call is
billed exactly once, at genai-prices' price, though its batch is exported twice, reaches a restarted receiver
and carries an agent span that repeats its children's usage; a span without tenant lands in usage.dlq."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import genai_prices
import psycopg
import pytest
from genai_prices import Usage
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deploy.isolation import env_for
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas import codec
from sinks.invoices import invoice
from streams.lag import wait_for_sinks
from tests.helpers import read_all, worker_running

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline(stack: LocalStack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with worker_running(settings, tmp_path_factory.mktemp("worker")) as (own, _worker):
        yield own


@dataclass
class Receiver:
    """``tokenmeter otlp`` as a subprocess, its output collected as it comes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, settings: Settings, spool: Path) -> Receiver:
        env = {**env_for(settings), "TOKENMETER_SPOOL_DIR": str(spool), "TOKENMETER_OTLP_PORT": "0"}
        process = subprocess.Popen(
            [sys.executable, "-m", "deploy", "otlp", "--loglevel", "info"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        receiver = cls(process)
        threading.Thread(target=receiver._collect, daemon=True).start()
        return receiver

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def url(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].split()[0]
            assert self.process.poll() is None, "".join(self.lines)
            time.sleep(0.05)
        raise TimeoutError("".join(self.lines))

    def stop(self) -> str:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, "".join(self.lines)
        time.sleep(0.1)  # the collector thread reads the last lines
        return "".join(self.lines)


@dataclass(frozen=True)
class Call:
    """A model call as the test sends it, and what it must cost (computed apart from the pipeline)."""

    name: str
    attributes: dict[str, str | int]
    provider: str  # the provider id the receiver must map it to
    model: str
    usage: Usage


CALLS = [
    Call(
        "chat gpt-4o",
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 12_000,
            "gen_ai.usage.output_tokens": 800,
            "gen_ai.usage.cache_read.input_tokens": 8_000,
        },
        "openai",
        "gpt-4o",
        Usage(input_tokens=12_000, output_tokens=800, cache_read_tokens=8_000),
    ),
    Call(  # as OpenLLMetry reports an Anthropic call: older and vendor attribute names
        "anthropic.chat",
        {
            "gen_ai.system": "Anthropic",
            "gen_ai.request.model": "claude-sonnet-4-5",
            "gen_ai.response.model": "claude-sonnet-4-5-20250929",
            "gen_ai.usage.prompt_tokens": 20_000,
            "gen_ai.usage.completion_tokens": 1_500,
            "gen_ai.usage.cache_read_input_tokens": 15_000,
            "gen_ai.usage.cache_creation_input_tokens": 2_000,
        },
        "anthropic",
        "claude-sonnet-4-5-20250929",
        Usage(input_tokens=20_000, output_tokens=1_500, cache_read_tokens=15_000, cache_write_tokens=2_000),
    ),
    Call(
        "generate_content gemini-2.5-flash",
        {
            "gen_ai.operation.name": "generate_content",
            "gen_ai.provider.name": "gcp.gemini",
            "gen_ai.request.model": "gemini-2.5-flash",
            "gen_ai.usage.input_tokens": 3_000,
            "gen_ai.usage.output_tokens": 400,
            "gen_ai.usage.reasoning.output_tokens": 200,
        },
        "google",
        "gemini-2.5-flash",
        Usage(input_tokens=3_000, output_tokens=400),
    ),
    Call(
        "embeddings text-embedding-3-small",
        {
            "gen_ai.operation.name": "embeddings",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "text-embedding-3-small",
            "gen_ai.usage.input_tokens": 500,
        },
        "openai",
        "text-embedding-3-small",
        Usage(input_tokens=500),
    ),
]


def agent_run(tenant: str) -> tuple[list[ReadableSpan], dict[str, Call]]:
    """An agent span with the totals of its model calls (two direct, one under a tool span, an embedding),
    as an agent framework reports it; returns the finished spans and the event id each call must get."""
    collected = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"tenant.id": tenant, "service.name": "research", "deployment.environment": "prod"})
    )
    provider.add_span_processor(SimpleSpanProcessor(collected))
    tracer = provider.get_tracer("tokenmeter-test")
    totals = {
        "gen_ai.usage.input_tokens": sum(c.usage.input_tokens or 0 for c in CALLS),
        "gen_ai.usage.output_tokens": sum(c.usage.output_tokens or 0 for c in CALLS),
    }
    ids: dict[str, Call] = {}

    def model_call(call: Call) -> None:
        attributes = {**call.attributes, "feature": "research", "user.id": "u-42"}
        with tracer.start_as_current_span(call.name, attributes=attributes) as span:
            time.sleep(0.01)  # a measurable latency
        context = span.get_span_context()
        ids[f"otlp-{context.trace_id:032x}-{context.span_id:016x}"] = call

    agent = {"gen_ai.operation.name": "invoke_agent", "gen_ai.provider.name": "openai", **totals}
    with tracer.start_as_current_span(
        "invoke_agent researcher", attributes={**agent, "gen_ai.request.model": "gpt-4o"}
    ):
        model_call(CALLS[0])
        model_call(CALLS[1])
        with tracer.start_as_current_span("execute_tool search", attributes={"gen_ai.operation.name": "execute_tool"}):
            model_call(CALLS[2])
        model_call(CALLS[3])
    provider.shutdown()
    return list(collected.get_finished_spans()), ids


def a_call_without_tenant() -> tuple[list[ReadableSpan], str]:
    collected = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "forgot-the-tenant"}))
    provider.add_span_processor(SimpleSpanProcessor(collected))
    with provider.get_tracer("tokenmeter-test").start_as_current_span("chat", attributes=CALLS[0].attributes) as span:
        pass
    context = span.get_span_context()
    return list(collected.get_finished_spans()), f"otlp-{context.trace_id:032x}-{context.span_id:016x}"


def export(url: str, spans: list[ReadableSpan], compression: Compression = Compression.Gzip) -> None:
    exporter = OTLPSpanExporter(endpoint=url, compression=compression, timeout=30)
    try:
        assert exporter.export(spans) == SpanExportResult.SUCCESS
    finally:
        exporter.shutdown()


def test_sdk_spans_are_billed_once_per_model_call_through_retries_and_roll_ups(
    pipeline: Settings, tmp_path: Path
) -> None:
    tenant = f"otlp-{uuid.uuid4().hex[:8]}"
    spans, calls = agent_run(tenant)
    orphans, orphan_id = a_call_without_tenant()
    assert len(spans) == 6 and len(calls) == 4

    receiver = Receiver.start(pipeline, tmp_path / "spool")
    url = receiver.url()
    export(url, spans)
    export(url, spans)  # the exporter's retry of the same batch
    export(url, orphans, Compression.NoCompression)
    output = receiver.stop()
    assert "stopped after 3 requests: 8 usage events" in output, output
    assert "1 spans rejected, 2 roll-up spans not counted" in output, output
    assert "no tenant" in output  # logged as a warning too

    again = Receiver.start(pipeline, tmp_path / "spool")  # a retry that reaches a restarted receiver
    export(again.url(), spans, Compression.NoCompression)
    again.stop()
    assert wait_for_sinks(pipeline, timeout=120)

    with psycopg.connect(pipeline.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id, provider, model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
            " reasoning_tokens, total_cost, price_status, ts, feature, user_id, environment, trace_id, latency_ms"
            " FROM tokenmeter.ledger WHERE tenant_id = %s",
            (tenant,),
        ).fetchall()
        bill = invoice(conn, tenant, datetime.now(UTC).strftime("%Y-%m"))
    assert sorted(row[0] for row in rows) == sorted(calls)  # each model call once, the agent span never

    span_ends = {f"otlp-{s.context.trace_id:032x}-{s.context.span_id:016x}": s.end_time for s in spans if s.end_time}
    expected_total = Decimal(0)
    for event_id, provider, model, inputs, outputs, reads, writes, reasoning, cost, status, ts, *rest in rows:
        call = calls[event_id]
        ended = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=span_ends[event_id] // 1000)
        price = genai_prices.calc_price(
            call.usage, call.model, provider_id=call.provider, genai_request_timestamp=ended
        )
        expected_total += price.total_price
        assert (provider, model, status, ts) == (call.provider, call.model, "priced", ended)
        assert (inputs, outputs) == (call.usage.input_tokens, call.usage.output_tokens or 0)
        assert (reads, writes) == (call.usage.cache_read_tokens or 0, call.usage.cache_write_tokens or 0)
        assert cost == price.total_price, (event_id, cost, price.total_price)
        feature, user, environment, trace_id, latency_ms = rest
        assert (feature, user, environment) == ("research", "u-42", "prod")
        assert event_id == f"otlp-{trace_id}-{event_id[-16:]}" and latency_ms >= 10
        assert reasoning == (200 if provider == "google" else None)
    assert (bill.calls, bill.unpriced_calls, bill.total) == (4, 0, expected_total)

    letters = [codec.decode("dead_letter", value) for value in read_all(pipeline, pipeline.topic_dlq, expect=1)]
    (letter,) = [letter for letter in letters if letter["original_key"] == orphan_id.encode()]
    assert letter["reason"] == "no tenant: none of tenant.id is set on the span or its resource"
    assert (letter["stage"], letter["source_topic"]) == ("validate", "otlp/v1/traces")
    mapped = json.loads(letter["original_value"])
    assert (mapped["event_id"], mapped["model"], mapped["input_tokens"]) == (orphan_id, "gpt-4o", 12_000)
