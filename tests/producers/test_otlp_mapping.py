"""OpenTelemetry spans → usage events (producers/otlp.py), without a server: decoding protobuf and OTLP/JSON,
the attribute mapping, the nested-span rules and the rejections."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from deploy.settings import Settings
from producers.otlp import (
    JSON,
    PROTOBUF,
    AttributeNames,
    MappingConfig,
    RejectedSpan,
    SpanMapper,
    UndecodableRequest,
    decode_request,
    provider_id,
)
from schemas.events import UsageEvent

ROOT = Path(__file__).resolve().parents[2]
TRACE = bytes.fromhex("5b8efff798038103d269b633813fc60c")
END = datetime.now(UTC).replace(microsecond=123456) - timedelta(minutes=5)


def nanos(moment: datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def value(raw: object) -> AnyValue:
    if isinstance(raw, bool):
        return AnyValue(bool_value=raw)
    if isinstance(raw, int):
        return AnyValue(int_value=raw)
    if isinstance(raw, float):
        return AnyValue(double_value=raw)
    if isinstance(raw, list):
        out = AnyValue()
        out.array_value.values.extend(value(item) for item in raw)
        return out
    return AnyValue(string_value=str(raw))


def attributes(values: dict[str, object]) -> list[KeyValue]:
    return [KeyValue(key=key, value=value(raw)) for key, raw in values.items()]


def chat(**extra: object) -> dict[str, object]:
    """The attributes of an OpenAI chat call as the GenAI conventions name them."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 100,
        **extra,
    }


def span(
    span_id: int,
    attrs: dict[str, object],
    *,
    parent: int | None = None,
    trace: bytes = TRACE,
    name: str = "chat gpt-4o",
    end: datetime | None = END,
    duration_ms: int = 1500,
    status: int = Status.STATUS_CODE_UNSET,
) -> Span:
    out = Span(
        trace_id=trace,
        span_id=span_id.to_bytes(8, "big"),
        parent_span_id=b"" if parent is None else parent.to_bytes(8, "big"),
        name=name,
        attributes=attributes(attrs),
    )
    if end is not None:
        out.end_time_unix_nano = nanos(end)
        out.start_time_unix_nano = nanos(end) - duration_ms * 1_000_000
    out.status.code = status
    return out


def request(*spans: Span, resource: dict[str, object] | None = None) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    resource_spans = out.resource_spans.add()
    resource_spans.resource.attributes.extend(attributes({"tenant.id": "acme"} if resource is None else resource))
    resource_spans.scope_spans.add().spans.extend(spans)
    return out


def one_event(*spans: Span, resource: dict[str, object] | None = None, **config: Any) -> UsageEvent:
    mapped = SpanMapper(MappingConfig(**config)).map_request(request(*spans, resource=resource))
    assert not mapped.rejected, mapped.rejected
    assert len(mapped.events) == 1, mapped
    return mapped.events[0]


def one_rejection(*spans: Span, resource: dict[str, object] | None = None) -> RejectedSpan:
    mapped = SpanMapper().map_request(request(*spans, resource=resource))
    assert not mapped.events and len(mapped.rejected) == 1, mapped
    return mapped.rejected[0]


# ---------------------------------------------------------------- decoding
def otlp_json(message: ExportTraceServiceRequest) -> dict[str, Any]:
    """The request as OTLP/JSON writes it: protobuf's JSON mapping, but trace and span ids in hex."""
    document = json_format.MessageToDict(message)
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for item in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in item:
                        item[key] = base64.b64decode(item[key]).hex()
    return document


def test_protobuf_and_otlp_json_with_hex_ids_decode_to_the_same_request() -> None:
    original = request(span(1, chat()), span(2, chat(), parent=1))
    from_protobuf = decode_request(original.SerializeToString(), PROTOBUF)
    document = otlp_json(original)
    assert document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"] == TRACE.hex()
    from_json = decode_request(json.dumps(document).encode(), JSON)
    assert from_protobuf == original == from_json
    assert SpanMapper().map_request(from_json).events[0].trace_id == TRACE.hex()


def test_otlp_json_as_a_service_writes_it_by_hand() -> None:
    body = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "tenant.id", "value": {"stringValue": "acme"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "my-instrumentation"},
                        "spans": [
                            {
                                "traceId": "5B8EFFF798038103D269B633813FC60C",  # hex, any case
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "",
                                "name": "chat claude",
                                "kind": 3,  # enums are integers in OTLP/JSON
                                "startTimeUnixNano": str(nanos(END) - 10**9),  # int64 as a string
                                "endTimeUnixNano": nanos(END),  # or as a number
                                "attributes": [
                                    {"key": "gen_ai.system", "value": {"stringValue": "anthropic"}},
                                    {"key": "gen_ai.request.model", "value": {"stringValue": "claude-sonnet-4-5"}},
                                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "1200"}},
                                    {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 80}},
                                ],
                                "aFieldFromTheFuture": {"ignored": True},
                            }
                        ],
                    }
                ],
            }
        ]
    }
    mapped = SpanMapper().map_request(decode_request(json.dumps(body).encode(), JSON))
    (event,) = mapped.events
    assert event.event_id == "otlp-5b8efff798038103d269b633813fc60c-eee19b7ec3c1b174"
    assert (event.provider, event.model, event.input_tokens, event.output_tokens) == (
        "anthropic",
        "claude-sonnet-4-5",
        1200,
        80,
    )
    assert event.latency_ms == 1000


def test_base64_ids_in_json_are_still_understood() -> None:
    """Some older exporters wrote protobuf's canonical JSON (base64 ids): their lengths tell them apart."""
    original = request(span(7, chat()))
    document = json_format.MessageToDict(original)
    assert len(document["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["traceId"]) == 24
    assert decode_request(json.dumps(document).encode(), JSON) == original


@pytest.mark.parametrize(
    ("body", "media_type", "message"),
    [
        (b"\xff\xff\xff\xff", PROTOBUF, "protobuf"),
        (b"{not json", JSON, "malformed JSON"),
        (b"[1, 2]", JSON, "JSON object"),
        (b'{"resourceSpans": "many"}', JSON, "OTLP/JSON"),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"endTimeUnixNano": "soon"}]}]}]}', JSON, "OTLP/JSON"),
    ],
)
def test_undecodable_bodies_raise_with_a_reason(body: bytes, media_type: str, message: str) -> None:
    with pytest.raises(UndecodableRequest, match=message):
        decode_request(body, media_type)


# ---------------------------------------------------------------- mapping
def test_the_semantic_convention_attributes_map_to_the_event() -> None:
    attrs = chat(
        **{
            "gen_ai.response.model": "gpt-4o-2024-08-06",
            "gen_ai.usage.input_tokens": 5000,
            "gen_ai.usage.output_tokens": 700,
            "gen_ai.usage.cache_read.input_tokens": 3000,
            "gen_ai.usage.cache_creation.input_tokens": 1000,
            "gen_ai.usage.reasoning.output_tokens": 400,
            "gen_ai.conversation.id": "conv-9",
            "gen_ai.response.id": "chatcmpl-123",
            "user.id": "u-42",
            "feature": "search",
        }
    )
    resource = {"tenant.id": "acme", "deployment.environment": "prod", "service.name": "api"}
    event = one_event(span(0xAB, attrs, status=Status.STATUS_CODE_OK, duration_ms=2345), resource=resource)
    assert event.model_dump(exclude_defaults=True) == {
        "event_id": f"otlp-{TRACE.hex()}-00000000000000ab",
        "timestamp": END,
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o-2024-08-06",  # the response's model over the requested alias
        "input_tokens": 5000,
        "output_tokens": 700,
        "cache_read_tokens": 3000,
        "cache_write_tokens": 1000,
        "reasoning_tokens": 400,
        "user_id": "u-42",
        "feature": "search",
        "environment": "prod",
        "trace_id": TRACE.hex(),
        "session_id": "conv-9",
        "request_id": "chatcmpl-123",
        "latency_ms": 2345,
        "status": "ok",
    }


@pytest.mark.parametrize("attribute", ["openai.response.service_tier", "gen_ai.openai.response.service_tier"])
def test_the_tier_that_served_the_call_is_kept_and_a_requested_tier_is_not(attribute: str) -> None:
    """The response's tier bills the call (a flex call costs the flex price); the requested one can be
    "auto" and is ignored."""
    served = one_event(span(0xAC, chat(**{attribute: "flex", "openai.request.service_tier": "auto"})))
    assert served.service_tier == "flex"
    requested_only = one_event(span(0xAD, chat(**{"openai.request.service_tier": "priority"})))
    assert requested_only.service_tier is None


def test_older_and_vendor_attribute_names_are_understood() -> None:
    """gen_ai.system, prompt/completion tokens (older conventions), OpenLLMetry's and OpenLIT's cache and
    reasoning names; OpenLLMetry's capitalised system names."""
    attrs = {
        "gen_ai.system": "Anthropic",
        "gen_ai.request.model": "claude-sonnet-4-5",
        "gen_ai.usage.prompt_tokens": 2000,
        "gen_ai.usage.completion_tokens": 50,
        "gen_ai.usage.cache_read_input_tokens": 1500,
        "gen_ai.usage.cache_creation_input_tokens": 400,
        "gen_ai.usage.reasoning_tokens": 20,
    }
    event = one_event(span(3, attrs))
    assert (event.provider, event.input_tokens, event.output_tokens) == ("anthropic", 2000, 50)
    assert (event.cache_read_tokens, event.cache_write_tokens, event.reasoning_tokens) == (1500, 400, 20)


def test_the_current_name_wins_over_the_older_one() -> None:
    attrs = chat(**{"gen_ai.usage.prompt_tokens": 1, "gen_ai.system": "anthropic", "gen_ai.provider.name": "openai"})
    event = one_event(span(3, attrs))
    assert (event.input_tokens, event.provider) == (1000, "openai")


def test_counts_sent_as_doubles_or_decimal_strings_are_accepted() -> None:
    attrs = chat(**{"gen_ai.usage.input_tokens": 1200.0, "gen_ai.usage.output_tokens": "35"})
    event = one_event(span(3, attrs))
    assert (event.input_tokens, event.output_tokens) == (1200, 35)


def test_an_embedding_reports_input_only() -> None:
    attrs = {
        "gen_ai.operation.name": "embeddings",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "text-embedding-3-small",
        "gen_ai.usage.input_tokens": 800,
    }
    event = one_event(span(3, attrs))
    assert (event.input_tokens, event.output_tokens) == (800, 0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("openai", "openai"),
        ("OpenAI", "openai"),
        ("anthropic", "anthropic"),
        ("gcp.gemini", "google"),
        ("gcp.vertex_ai", "google"),
        ("gcp.gen_ai", "google"),
        ("gemini", "google"),
        ("vertex_ai", "google"),
        ("VertexAI", "google"),
        ("aws.bedrock", "aws"),
        ("Bedrock", "aws"),
        ("azure.ai.openai", "azure"),
        ("az.ai.inference", "azure"),
        ("mistral_ai", "mistral"),
        ("MistralAI", "mistral"),
        ("x_ai", "x-ai"),
        ("xai", "x-ai"),
        ("Together AI", "together"),
        ("groq", "groq"),
        ("ollama", "ollama"),  # unknown to the table: lower-cased as is (unpriced, alerted by the pipeline)
        (" IBM.WatsonX.AI ", "ibm.watsonx.ai"),
    ],
)
def test_provider_names_map_to_the_project_provider_ids(name: str, expected: str) -> None:
    assert provider_id(name) == expected


def test_provider_ids_are_the_ones_genai_prices_knows() -> None:
    from genai_prices import data_snapshot

    from producers.otlp import PROVIDER_IDS

    known = {provider.id for provider in data_snapshot.get_snapshot().providers}
    assert set(PROVIDER_IDS.values()) <= known


def test_span_attributes_override_resource_attributes() -> None:
    resource = {"tenant.id": "acme", "user.id": "service-account", "deployment.environment": "prod"}
    event = one_event(span(3, chat(**{"tenant.id": "globex", "user.id": "u-1"})), resource=resource)
    assert (event.tenant_id, event.user_id, event.environment) == ("globex", "u-1", "prod")


def test_the_current_environment_attribute_name_is_accepted_too() -> None:
    event = one_event(span(3, chat()), resource={"tenant.id": "acme", "deployment.environment.name": "staging"})
    assert event.environment == "staging"


def test_configured_attribute_names_replace_the_defaults() -> None:
    names = AttributeNames(tenant=("app.customer", "org.id"), user=("enduser.id",), feature=("app.feature",))
    resource = {"org.id": "initech", "tenant.id": "ignored"}
    attrs = chat(**{"enduser.id": "u-7", "app.feature": "summarize", "feature": "ignored"})
    event = one_event(span(3, attrs), resource=resource, attributes=names)
    assert (event.tenant_id, event.user_id, event.feature) == ("initech", "u-7", "summarize")


def test_settings_build_the_mapping_config() -> None:
    settings = Settings(
        otlp_tenant_attributes=["app.customer"],
        otlp_environment_attributes=["env"],
        otlp_count_rule="operation",
    )
    config = MappingConfig.from_settings(settings)
    assert config.attributes.tenant == ("app.customer",)
    assert config.attributes.environment == ("env",)
    assert config.attributes.user == ("user.id",)
    assert config.count_rule == "operation"
    assert MappingConfig.from_settings(Settings()) == MappingConfig()


def test_numeric_ids_become_text_and_empty_ones_are_unset() -> None:
    event = one_event(span(3, chat(**{"tenant.id": 4711, "user.id": ""})))
    assert (event.tenant_id, event.user_id) == ("4711", None)


def test_the_event_id_is_the_same_for_the_same_span_and_differs_between_spans() -> None:
    spans = [span(1, chat()), span(2, chat()), span(1, chat(), trace=bytes(15) + b"\x01")]
    first = SpanMapper().map_request(request(*spans)).events
    again = SpanMapper().map_request(request(*spans)).events
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert len({e.event_id for e in first}) == 3


def test_the_timestamp_is_the_end_time_or_else_the_start_time() -> None:
    assert one_event(span(3, chat())).timestamp == END
    started_only = span(3, chat())
    started_only.end_time_unix_nano = 0
    event = one_event(started_only)
    assert event.timestamp == END - timedelta(milliseconds=1500)
    assert event.latency_ms is None


def test_an_error_span_with_usage_is_billed_with_its_status() -> None:
    assert one_event(span(3, chat(), status=Status.STATUS_CODE_ERROR)).status == "error"


def test_a_span_longer_than_a_day_keeps_its_usage_without_latency() -> None:
    event = one_event(span(3, chat(), duration_ms=2 * 86_400_000))
    assert event.latency_ms is None and event.input_tokens == 1000


def test_spans_without_usage_are_ignored() -> None:
    http_span = span(5, {"http.request.method": "GET"}, name="GET /")
    no_tokens = span(6, {"gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o"})
    mapped = SpanMapper().map_request(request(http_span, no_tokens, resource={}))
    assert (mapped.spans, mapped.events, mapped.rejected, mapped.not_counted) == (2, [], [], 0)


# ---------------------------------------------------------------- nested spans
def agent(span_id: int, input_tokens: int, output_tokens: int, parent: int | None = None) -> Span:
    """An agent span repeating the totals of the model calls under it, as agent frameworks do."""
    attrs = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.agent.name": "researcher",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o",
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
    }
    return span(span_id, attrs, parent=parent, name="invoke_agent researcher")


def test_leaf_rule_a_parent_repeating_its_childrens_totals_is_counted_once() -> None:
    children = [span(10 + i, chat(), parent=1) for i in range(3)]
    mapped = SpanMapper().map_request(request(agent(1, 3000, 300), *children))
    assert sorted(e.event_id[-2:] for e in mapped.events) == ["0a", "0b", "0c"]
    assert sum(e.input_tokens for e in mapped.events) == 3000
    assert mapped.not_counted == 1


def test_leaf_rule_sees_usage_through_spans_without_usage_and_nested_agents() -> None:
    # agent 1 → tool 2 (no usage) → chat 3;  agent 1 → sub-agent 4 → chat 5, chat 6
    spans = [
        agent(1, 3000, 300),
        span(2, {"gen_ai.operation.name": "execute_tool"}, parent=1, name="execute_tool search"),
        span(3, chat(), parent=2),
        agent(4, 2000, 200, parent=1),
        span(5, chat(), parent=4),
        span(6, chat(), parent=4),
    ]
    mapped = SpanMapper().map_request(request(*spans))
    assert sorted(int(e.event_id[-2:], 16) for e in mapped.events) == [3, 5, 6]
    assert mapped.not_counted == 2


def test_leaf_rule_remembers_children_exported_before_their_parent() -> None:
    """A batch span processor exports spans as they end: a long agent's model calls arrive first."""
    mapper = SpanMapper()
    first = mapper.map_request(request(span(10, chat(), parent=2), span(11, chat(), parent=2)))
    step = span(2, {"gen_ai.operation.name": "execute_tool"}, parent=1, name="step")
    later = mapper.map_request(request(step))
    last = mapper.map_request(request(agent(1, 2000, 200)))
    assert len(first.events) == 2
    assert later.events == [] and last.events == [] and last.not_counted == 1


def test_leaf_rule_caveat_a_parent_alone_in_a_fresh_receiver_is_counted() -> None:
    """What the memory cannot know (a restarted receiver, another replica): documented in the module."""
    assert len(SpanMapper().map_request(request(agent(1, 2000, 200))).events) == 1


def test_leaf_rule_memory_is_bounded() -> None:
    mapper = SpanMapper(memory_capacity=10)
    for parent in range(100, 150):
        mapper.map_request(request(span(parent + 1000, chat(), parent=parent)))
    assert len(mapper._above_usage) == 10


def test_a_retried_batch_maps_to_the_same_events() -> None:
    mapper = SpanMapper()
    batch = request(agent(1, 3000, 300), *[span(10 + i, chat(), parent=1) for i in range(3)])
    first, retry = mapper.map_request(batch), mapper.map_request(batch)
    assert first.events == retry.events and len(first.events) == 3


def test_operation_rule_counts_only_model_call_operations() -> None:
    mapper = SpanMapper(MappingConfig(count_rule="operation"))
    children = [span(10 + i, chat(), parent=1) for i in range(3)]
    embedding = span(20, chat(**{"gen_ai.operation.name": "embeddings"}), parent=1)
    # OpenLLMetry's older spans name the operation only as llm.request.type
    untyped = {key: raw for key, raw in chat().items() if key != "gen_ai.operation.name"}
    llm_request_type = span(21, {**untyped, "llm.request.type": "completion"})
    mapped = mapper.map_request(request(agent(1, 4000, 300), *children, embedding, llm_request_type))
    assert sorted(int(e.event_id[-2:], 16) for e in mapped.events) == [10, 11, 12, 20, 21]
    assert mapped.not_counted == 1
    # the parent alone, in another batch: still not a model call
    assert mapper.map_request(request(agent(1, 4000, 300))).events == []


def test_operation_rule_caveat_a_model_call_without_operation_name_is_not_billed() -> None:
    attrs = {k: v for k, v in chat().items() if k != "gen_ai.operation.name"}
    mapped = SpanMapper(MappingConfig(count_rule="operation")).map_request(request(span(3, attrs)))
    assert (mapped.events, mapped.not_counted) == ([], 1)
    assert len(SpanMapper().map_request(request(span(3, attrs))).events) == 1  # leaf counts it


# ---------------------------------------------------------------- rejections
def test_a_span_with_usage_but_no_tenant_is_rejected_with_the_reason_and_its_fields() -> None:
    rejected = one_rejection(span(3, chat(), name="chat gpt-4o"), resource={"service.name": "api"})
    assert rejected.reason == "no tenant: none of tenant.id is set on the span or its resource"
    assert rejected.event_id == f"otlp-{TRACE.hex()}-0000000000000003"
    assert "chat gpt-4o" in rejected.describe() and rejected.event_id in rejected.describe()
    fields = json.loads(rejected.to_json())
    assert fields["event_id"] == rejected.event_id and fields["model"] == "gpt-4o"
    assert "tenant_id" not in fields and fields["timestamp"] == END.isoformat()


def test_every_missing_fact_is_named() -> None:
    attrs = {"gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 1}
    reason = one_rejection(span(3, attrs), resource={}).reason
    assert "no tenant" in reason
    assert "no provider: none of gen_ai.provider.name, gen_ai.system is set on the span" in reason
    assert "no model: none of gen_ai.response.model, gen_ai.request.model" in reason


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"gen_ai.usage.input_tokens": "lots"}, "gen_ai.usage.input_tokens must be a whole number, got 'lots'"),
        ({"gen_ai.usage.output_tokens": 1.5}, "gen_ai.usage.output_tokens must be a whole number, got 1.5"),
        ({"gen_ai.usage.output_tokens": True}, "must be a whole number, got True"),
        ({"gen_ai.usage.input_tokens": -5}, "input_tokens"),
        ({"tenant.id": ["a", "b"]}, "tenant.id must be a string, got a array value"),
        ({"tenant.id": "ac\x00me"}, "tenant_id: control character U+0000 at position 2"),
        ({"user.id": "u" * 300}, "user_id"),
        ({"gen_ai.usage.reasoning.output_tokens": 500}, "reasoning_tokens must not exceed output_tokens"),
    ],
)
def test_counts_and_names_the_contract_rejects_are_dead_lettered_with_the_reason(
    extra: dict[str, object], reason: str
) -> None:
    assert reason in one_rejection(span(3, chat(**extra))).reason


def test_cache_tokens_above_input_tokens_name_the_likely_cause() -> None:
    attrs = chat(**{"gen_ai.usage.input_tokens": 100, "gen_ai.usage.cache_read.input_tokens": 900})
    reason = one_rejection(span(3, attrs)).reason
    assert "cache_read_tokens + cache_write_tokens must not exceed input_tokens" in reason
    assert "without its cache tokens" in reason


def test_invalid_ids_and_missing_times_are_rejected() -> None:
    no_trace = span(3, chat(), trace=bytes(16))
    assert "invalid trace id" in one_rejection(no_trace).reason
    no_time = span(4, chat(), end=None)
    assert "neither an end nor a start time" in one_rejection(no_time).reason


def test_a_timestamp_the_contract_rejects_is_dead_lettered() -> None:
    future = span(3, chat(), end=datetime.now(UTC) + timedelta(days=3))
    assert "in the future" in one_rejection(future).reason


def test_good_spans_beside_rejected_ones_are_still_events() -> None:
    mapped = SpanMapper().map_request(request(span(1, chat()), span(2, chat(**{"tenant.id": ""}))))
    assert len(mapped.events) == 2 and not mapped.rejected  # "" on the span: the resource's tenant applies
    mapped = SpanMapper().map_request(request(span(1, chat()), span(2, chat(**{"gen_ai.usage.input_tokens": "x"}))))
    assert (len(mapped.events), len(mapped.rejected)) == (1, 1)


# ---------------------------------------------------------------- the client library stays light
def test_importing_the_client_library_loads_no_protobuf_or_otlp_classes() -> None:
    code = "import json, sys, producers; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout.splitlines()[-1]))
    assert "producers.otlp" not in modules
    # (redis imports the OpenTelemetry SDK when it is installed, as in the dev environment: not ours to avoid)
    assert not {name for name in modules if name.startswith(("google", "opentelemetry.proto"))}
