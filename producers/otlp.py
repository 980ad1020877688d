"""OpenTelemetry GenAI spans → usage events: the mapping behind ``tokenmeter otlp`` (``deploy/otlp.py``).

Pure functions over an OTLP ``ExportTraceServiceRequest`` (decoded with the maintained ``opentelemetry-proto``
classes and protobuf's own JSON parser, never by hand): no Kafka, no HTTP. ``import producers`` does not load
this module, so a service using the client library never pays for protobuf.

Mapping (first attribute present wins; "span, then resource" means a span attribute overrides the same
fact on its resource):

=====================  ==========================================================================================
event field            from
=====================  ==========================================================================================
``input_tokens``       ``gen_ai.usage.input_tokens`` (older ``gen_ai.usage.prompt_tokens``); includes cache tokens,
                       as the semantic conventions say and OpenLLMetry/OpenLIT/pydantic-ai report it
``output_tokens``      ``gen_ai.usage.output_tokens`` (older ``gen_ai.usage.completion_tokens``); includes reasoning
``cache_read_tokens``  ``gen_ai.usage.cache_read.input_tokens`` (OpenLLMetry/OpenLIT: ``…cache_read_input_tokens``)
``cache_write_tokens`` ``gen_ai.usage.cache_creation.input_tokens`` (``…cache_creation_input_tokens``)
``reasoning_tokens``   ``gen_ai.usage.reasoning.output_tokens`` (OpenLIT: ``gen_ai.usage.reasoning_tokens``)
``model``              ``gen_ai.response.model``, else ``gen_ai.request.model``
``provider``           ``gen_ai.provider.name`` (older ``gen_ai.system``) through ``PROVIDER_IDS``: ``gcp.gemini``,
                       ``gcp.vertex_ai``, ``gemini`` → ``google``; ``aws.bedrock`` → ``aws``; ``azure.ai.openai``
                       → ``azure``; ``x_ai`` → ``x-ai``; ``mistral_ai`` → ``mistral``; any other name lower-cased
``tenant_id``          span, then resource: ``AttributeNames.tenant`` (default ``tenant.id``)
``user_id``            span, then resource: ``AttributeNames.user`` (default ``user.id``)
``feature``            span, then resource: ``AttributeNames.feature`` (default ``feature``)
``environment``        span, then resource: ``AttributeNames.environment`` (default ``deployment.environment``,
                       ``deployment.environment.name``)
``session_id``         span, then resource: ``gen_ai.conversation.id``, ``session.id``
``request_id``         ``gen_ai.response.id``
``service_tier``       ``openai.response.service_tier``, else ``gen_ai.openai.response.service_tier``
``event_id``           ``otlp-<trace id hex>-<span id hex>``: a retried export maps to the same ids, and the
                       pipeline counts each id once
``trace_id``           the span's trace id, hex
``timestamp``          the span's end time (its start time if it has none), UTC
``latency_ms``         end − start (left out if over the contract's 24 h)
``status``             ``error`` / ``ok`` from the span status (left out when unset)
=====================  ==========================================================================================

Which spans count. A span "has usage" when it carries input or output tokens; spans without usage are
ignored. Agent frameworks put the totals of the model calls they made on their own span too (an
``invoke_agent`` span repeating its children's tokens), so counting every span with usage bills those calls
twice. Two rules (``CountRule``):

- ``leaf`` (default): a span with usage is a roll-up, not counted, when one of its descendants carries usage.
  Descendants are found in the same request, and among the spans with usage this mapper saw recently
  (``memory``: SDK batch processors export a span when it ends, so an agent's model calls usually reach
  us in an earlier export than the agent span itself). Works whatever the instrumentation names its
  operations. Caveat: a roll-up exported *before* its children, or after this process restarted (the
  memory is per process, so also across several receivers), is counted with them. Keep one receiver per
  trace source, or use ``operation``.
- ``operation``: only spans whose ``gen_ai.operation.name`` (OpenLLMetry's older ``llm.request.type``) is a
  model call (``MODEL_CALL_OPERATIONS``: chat, text_completion, generate_content, embeddings) count, in any
  batch, on any receiver. Caveat: a model-call span from an instrumentation that sets no operation name is
  not billed.

``leaf`` is the default because it bills every instrumentation that reports tokens (many older ones set
no operation name) and, for SDK exports, its caveat needs an uncommon order.

A span with usage that cannot become a valid event (no tenant, no model or provider, counts the contract
rejects) is a ``RejectedSpan`` with the reason and the fields as mapped, bound for ``usage.dlq``.
"""

from __future__ import annotations

import base64
import collections
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from deploy.settings import Settings
from schemas.events import InvalidEvent, UsageEvent, validate_event

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
CACHE_READ_TOKENS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens")
CACHE_WRITE_TOKENS = ("gen_ai.usage.cache_creation.input_tokens", "gen_ai.usage.cache_creation_input_tokens")
REASONING_TOKENS = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens")
MODEL = ("gen_ai.response.model", "gen_ai.request.model")
PROVIDER = ("gen_ai.provider.name", "gen_ai.system")
OPERATION = ("gen_ai.operation.name", "llm.request.type")
SESSION = ("gen_ai.conversation.id", "session.id")
RESPONSE_ID = ("gen_ai.response.id",)
# The tier that served (and bills) the call; the request's tier can be "auto", which prices nothing.
SERVICE_TIER = ("openai.response.service_tier", "gen_ai.openai.response.service_tier")

MODEL_CALL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content", "embeddings"})
# OpenLLMetry's llm.request.type names two of them differently.
_OPERATION_ALIASES = {"completion": "text_completion", "embedding": "embeddings"}

# gen_ai.provider.name / gen_ai.system values (semantic conventions, older ones, and the capitalised names
# OpenLLMetry sends) → the genai-prices provider ids the pipeline prices and reports by. Keys are
# lower-cased with spaces as underscores.
PROVIDER_IDS = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gcp.gemini": "google",
    "gcp.gen_ai": "google",
    "gcp.vertex_ai": "google",
    "gemini": "google",
    "vertex_ai": "google",
    "vertexai": "google",
    "google": "google",
    "google.ai.studio": "google",
    "aws.bedrock": "aws",
    "bedrock": "aws",
    "aws": "aws",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "az.ai.openai": "azure",
    "az.ai.inference": "azure",
    "azure": "azure",
    "mistral_ai": "mistral",
    "mistralai": "mistral",
    "mistral": "mistral",
    "x_ai": "x-ai",
    "xai": "x-ai",
    "together_ai": "together",
    "together-ai": "together",
    "together": "together",
    "cohere": "cohere",
    "deepseek": "deepseek",
    "groq": "groq",
    "perplexity": "perplexity",
}

MAX_LATENCY_MS = 86_400_000  # UsageEvent.latency_ms's bound: a longer span keeps its usage, without latency
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

CountRule = Literal["leaf", "operation"]


@dataclass(frozen=True)
class AttributeNames:
    """Span or resource attributes that name who is billed; the first one set wins, span before resource."""

    tenant: tuple[str, ...] = ("tenant.id",)
    user: tuple[str, ...] = ("user.id",)
    feature: tuple[str, ...] = ("feature",)
    # deployment.environment is what most SDKs still set; deployment.environment.name is its current name.
    environment: tuple[str, ...] = ("deployment.environment", "deployment.environment.name")


@dataclass(frozen=True)
class MappingConfig:
    attributes: AttributeNames = field(default_factory=AttributeNames)
    count_rule: CountRule = "leaf"

    @classmethod
    def from_settings(cls, settings: Settings) -> MappingConfig:
        names = AttributeNames(
            tenant=tuple(settings.otlp_tenant_attributes),
            user=tuple(settings.otlp_user_attributes),
            feature=tuple(settings.otlp_feature_attributes),
            environment=tuple(settings.otlp_environment_attributes),
        )
        return cls(names, settings.otlp_count_rule)

    def describe(self) -> str:
        rule = (
            "leaf spans (a span whose descendants carry usage is a roll-up)"
            if self.count_rule == "leaf"
            else f"spans whose operation is {', '.join(sorted(MODEL_CALL_OPERATIONS))}"
        )
        names = self.attributes
        return (
            f"counting {rule}; tenant from {'/'.join(names.tenant)}, user from {'/'.join(names.user)}, "
            f"feature from {'/'.join(names.feature)}, environment from {'/'.join(names.environment)}"
        )


@dataclass(frozen=True)
class RejectedSpan:
    """A span with usage that is not a valid usage event: why, and what it mapped to (JSON-ready)."""

    event_id: str
    span_name: str
    reason: str
    fields: dict[str, Any]

    def describe(self) -> str:
        return f"span {self.span_name!r} ({self.event_id or 'no valid ids'}): {self.reason}"

    def to_json(self) -> bytes:
        return json.dumps(self.fields, default=_json_default, ensure_ascii=False).encode(errors="backslashreplace")


@dataclass
class MappedSpans:
    events: list[UsageEvent] = field(default_factory=list)
    rejected: list[RejectedSpan] = field(default_factory=list)
    spans: int = 0  # every span in the request
    not_counted: int = 0  # spans with usage that the count rule left out (roll-ups)


class UndecodableRequest(ValueError):
    """The body is not an OTLP trace export in the declared encoding."""


# ---------------------------------------------------------------- decoding
def decode_request(body: bytes, media_type: str) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` from an OTLP/HTTP body, binary protobuf or OTLP/JSON."""
    request = ExportTraceServiceRequest()
    if media_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (DecodeError, ValueError) as exc:
            raise UndecodableRequest(f"not an OTLP protobuf trace export: {exc}") from None
        return request
    if media_type != JSON:
        raise UndecodableRequest(f"unsupported media type {media_type!r}")
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise UndecodableRequest(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise UndecodableRequest("an OTLP/JSON export must be a JSON object")
    _hex_ids_to_base64(document)
    try:
        # Receivers must ignore fields they do not know (OTLP/JSON), e.g. from a newer protocol version.
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except Exception as exc:  # ParseError, and whatever odd shapes make protobuf's parser raise
        raise UndecodableRequest(f"not an OTLP/JSON trace export: {exc}") from None
    return request


# OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping expects base64 for bytes: hex digits
# are base64 characters too, so parsing them unconverted would silently give wrong ids. The lengths tell
# them apart (32 hex / 24 base64 characters for a trace id, 16 / 12 for a span id).
_HEX_ID_LENGTHS = {
    "traceId": 32,
    "trace_id": 32,
    "spanId": 16,
    "span_id": 16,
    "parentSpanId": 16,
    "parent_span_id": 16,
}
_HEX = re.compile(r"[0-9a-fA-F]+")


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    for resource_spans in _children(document, "resourceSpans", "resource_spans"):
        for scope_spans in _children(resource_spans, "scopeSpans", "scope_spans"):
            for span in _children(scope_spans, "spans"):
                _convert_ids(span)
                for link in _children(span, "links"):
                    _convert_ids(link)


def _children(node: object, *names: str) -> list[dict[str, Any]]:
    if not isinstance(node, dict):
        return []
    for name in names:
        items = node.get(name)
        if isinstance(items, list):
            return [item for item in items if isinstance(item, dict)]
    return []


def _convert_ids(node: dict[str, Any]) -> None:
    for key, hex_length in _HEX_ID_LENGTHS.items():
        value = node.get(key)
        if isinstance(value, str) and len(value) == hex_length and _HEX.fullmatch(value):
            node[key] = base64.b64encode(bytes.fromhex(value)).decode()


# ---------------------------------------------------------------- mapping
class SpanMapper:
    """Maps export requests to usage events and rejected spans under one ``MappingConfig``.

    Keeps the ``leaf`` rule's memory: (trace id, span id) of recent spans known to have a descendant with
    usage, at most ``memory_capacity`` (oldest forgotten first). Thread-safe.
    """

    def __init__(self, config: MappingConfig | None = None, *, memory_capacity: int = 100_000) -> None:
        self.config = config or MappingConfig()
        self.memory_capacity = memory_capacity
        self._above_usage: collections.OrderedDict[tuple[bytes, bytes], None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def map_request(self, request: ExportTraceServiceRequest) -> MappedSpans:
        spans = [
            _SpanView(span, resource_attributes)
            for resource_spans in request.resource_spans
            for resource_attributes in [_attributes(resource_spans.resource.attributes)]
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]
        out = MappedSpans(spans=len(spans))
        leaf_rule = self.config.count_rule == "leaf"
        with self._lock:
            rollups = self._rollups(spans) if leaf_rule else set()
        for view in spans:
            if not view.has_usage:
                continue
            counted = view.key not in rollups if leaf_rule else _is_model_call(view.attributes)
            if not counted:
                out.not_counted += 1
                continue
            outcome = map_span(view.span, view.attributes, view.resource, self.config.attributes)
            if isinstance(outcome, UsageEvent):
                out.events.append(outcome)
            else:
                out.rejected.append(outcome)
        return out

    def _rollups(self, spans: Sequence[_SpanView]) -> set[tuple[bytes, bytes]]:
        """Spans of this request with a descendant that has usage (here or remembered); remembers them."""
        parent_of = {view.key: view.span.parent_span_id for view in spans}
        remembered = self._above_usage
        above_usage: set[tuple[bytes, bytes]] = set()
        # Walk up from every span with usage, and from every span remembered as being above one.
        for view in spans:
            if not (view.has_usage or view.key in remembered):
                continue
            trace_id, parent = view.span.trace_id, view.span.parent_span_id
            while parent and (trace_id, parent) not in above_usage:
                above_usage.add((trace_id, parent))
                parent = parent_of.get((trace_id, parent), b"")
        rollups = {view.key for view in spans if view.key in above_usage or view.key in remembered}
        for key in above_usage:
            remembered[key] = None
            remembered.move_to_end(key)
        while len(remembered) > self.memory_capacity:
            remembered.popitem(last=False)
        return rollups


@dataclass
class _SpanView:
    span: Span
    resource: dict[str, AnyValue]
    attributes: dict[str, AnyValue] = field(init=False)
    has_usage: bool = field(init=False)
    key: tuple[bytes, bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.attributes = _attributes(self.span.attributes)
        self.has_usage = any(name in self.attributes for name in (*INPUT_TOKENS, *OUTPUT_TOKENS))
        self.key = (self.span.trace_id, self.span.span_id)


def _is_model_call(attributes: Mapping[str, AnyValue]) -> bool:
    for name in OPERATION:
        value = attributes.get(name)
        if value is not None and value.WhichOneof("value") == "string_value":
            operation = value.string_value.strip().lower()
            return _OPERATION_ALIASES.get(operation, operation) in MODEL_CALL_OPERATIONS
    return False


class _SpanProblem(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def map_span(
    span: Span,
    attributes: Mapping[str, AnyValue],
    resource: Mapping[str, AnyValue],
    names: AttributeNames,
) -> UsageEvent | RejectedSpan:
    """One span with usage as a usage event, or why it cannot be one."""
    fields: dict[str, Any] = {}
    problems: list[str] = []
    try:
        fields["event_id"] = event_id_of(span)
        fields["trace_id"] = span.trace_id.hex()
    except _SpanProblem as exc:
        problems.append(exc.reason)
    end, start = span.end_time_unix_nano, span.start_time_unix_nano
    if end or start:
        fields["timestamp"] = _EPOCH + timedelta(microseconds=(end or start) // 1000)
    else:
        problems.append("the span has neither an end nor a start time")
    if end and start and 0 <= (end - start) // 1_000_000 <= MAX_LATENCY_MS:
        fields["latency_ms"] = (end - start) // 1_000_000
    both = (attributes, resource)
    wanted: list[tuple[str, Sequence[Mapping[str, AnyValue]], tuple[str, ...], bool]] = [
        ("tenant_id", both, names.tenant, True),
        ("provider", (attributes,), PROVIDER, True),
        ("model", (attributes,), MODEL, True),
        ("user_id", both, names.user, False),
        ("feature", both, names.feature, False),
        ("environment", both, names.environment, False),
        ("session_id", both, SESSION, False),
        ("request_id", (attributes,), RESPONSE_ID, False),
        ("service_tier", (attributes,), SERVICE_TIER, False),
    ]
    for name, sources, candidates, required in wanted:
        try:
            value = _text(sources, candidates)
        except _SpanProblem as exc:
            problems.append(exc.reason)
            continue
        if value is not None:
            fields[name] = provider_id(value) if name == "provider" else value
        elif required:
            where = "on the span or its resource" if len(sources) == 2 else "on the span"
            problems.append(f"no {name.removesuffix('_id')}: none of {', '.join(candidates)} is set {where}")
    counts = (
        ("input_tokens", INPUT_TOKENS),
        ("output_tokens", OUTPUT_TOKENS),
        ("cache_read_tokens", CACHE_READ_TOKENS),
        ("cache_write_tokens", CACHE_WRITE_TOKENS),
        ("reasoning_tokens", REASONING_TOKENS),
    )
    for name, candidates in counts:
        try:
            count = _count(attributes, candidates)
        except _SpanProblem as exc:
            problems.append(exc.reason)
            continue
        if count is not None:
            fields[name] = count
        elif name in ("input_tokens", "output_tokens"):
            fields[name] = 0  # an embedding reports input only; the span has usage, so one of the two is set
    if span.status.code == Status.STATUS_CODE_ERROR:
        fields["status"] = "error"
    elif span.status.code == Status.STATUS_CODE_OK:
        fields["status"] = "ok"
    if problems:
        return RejectedSpan(fields.get("event_id", ""), span.name, "; ".join(problems), fields)
    try:
        return validate_event(fields)
    except InvalidEvent as exc:
        reason = exc.reason
        if "cache_read_tokens + cache_write_tokens" in reason:
            reason += " (the instrumentation reports gen_ai.usage.input_tokens without its cache tokens)"
        return RejectedSpan(fields["event_id"], span.name, reason, fields)


def event_id_of(span: Span) -> str:
    """``otlp-<trace id>-<span id>`` in hex: the same span always maps to the same event id."""
    trace_id, span_id = span.trace_id, span.span_id
    if len(trace_id) != 16 or not any(trace_id):
        raise _SpanProblem(f"invalid trace id {trace_id.hex() or '(empty)'}: OTLP trace ids are 16 non-zero bytes")
    if len(span_id) != 8 or not any(span_id):
        raise _SpanProblem(f"invalid span id {span_id.hex() or '(empty)'}: OTLP span ids are 8 non-zero bytes")
    return f"otlp-{trace_id.hex()}-{span_id.hex()}"


def provider_id(name: str) -> str:
    """The project's provider id for a ``gen_ai.provider.name`` / ``gen_ai.system`` value."""
    key = name.strip().lower().replace(" ", "_")
    return PROVIDER_IDS.get(key, key)


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, AnyValue]:
    return {pair.key: pair.value for pair in pairs}


def _text(sources: Sequence[Mapping[str, AnyValue]], names: Sequence[str]) -> str | None:
    """The first of ``names`` set in the first source that has one; numbers become text, empty is unset."""
    for source in sources:
        for name in names:
            value = source.get(name)
            kind = None if value is None else value.WhichOneof("value")
            if value is None or kind is None:
                continue
            if kind == "string_value":
                if value.string_value:
                    return value.string_value
                continue
            if kind == "int_value":
                return str(value.int_value)
            raise _SpanProblem(f"{name} must be a string, got {_shown(value)}")
    return None


def _count(attributes: Mapping[str, AnyValue], names: Sequence[str]) -> int | None:
    """A token count: an integer, or a whole number sent as a double or decimal string (some SDKs do)."""
    for name in names:
        value = attributes.get(name)
        kind = None if value is None else value.WhichOneof("value")
        if value is None or kind is None:
            continue
        if kind == "int_value":
            return value.int_value
        if kind == "double_value" and value.double_value.is_integer():
            return int(value.double_value)
        text = value.string_value.strip()
        if kind == "string_value" and text.isascii() and text.isdigit():
            return int(text)
        raise _SpanProblem(f"{name} must be a whole number, got {_shown(value)}")
    return None


def _shown(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind in ("string_value", "bool_value", "int_value", "double_value"):
        return repr(getattr(value, kind))[:100]
    return f"a {str(kind).removesuffix('_value')} value"


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return repr(value)
