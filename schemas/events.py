"""The usage event as a validated model: the one set of rules for library callers, JSON and Avro input.

Limits protect the pipeline's state and Redis from unbounded input (DESIGN.md §4.5): strings are
bounded, tags are bounded in count and size, and token counts are non-negative.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas import codec

MAX_ID_LEN = 200
MAX_LABEL_LEN = 200
MAX_TAGS = 32
MAX_TAG_KEY_LEN = 64
MAX_TAG_VALUE_LEN = 256
MAX_TOKENS = 10**12  # far above any real call, far below Avro long overflow

Id = Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_LEN)]
Label = Annotated[StrictStr, Field(min_length=1, max_length=MAX_LABEL_LEN)]
Tokens = Annotated[StrictInt, Field(ge=0, le=MAX_TOKENS)]

USAGE_FIELDS_V1 = frozenset(f["name"] for f in codec.SCHEMAS["usage_event"][0].parsed["fields"])


class InvalidEvent(ValueError):
    """A usage event that breaks the contract; ``reason`` names the field and the rule."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UsageEvent(BaseModel):
    """One model call (DESIGN.md §1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    event_id: Id
    timestamp: AwareDatetime
    tenant_id: Id
    provider: Label
    model: Label
    input_tokens: Tokens
    output_tokens: Tokens
    cache_read_tokens: Tokens = 0
    cache_write_tokens: Tokens = 0
    user_id: Id | None = None
    feature: Label | None = None
    environment: Label | None = None
    trace_id: Id | None = None
    request_id: Id | None = None
    latency_ms: Annotated[StrictInt, Field(ge=0, le=86_400_000)] | None = None
    status: Label | None = None
    session_id: Id | None = None
    team_id: Id | None = None
    reasoning_tokens: Tokens | None = None
    input_audio_tokens: Tokens | None = None
    output_audio_tokens: Tokens | None = None
    input_image_tokens: Tokens | None = None
    estimated: StrictBool = False
    tags: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    @field_validator("timestamp")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @field_validator("tags")
    @classmethod
    def _bounded_tags(cls, tags: dict[str, str]) -> dict[str, str]:
        if len(tags) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags are allowed, got {len(tags)}")
        for key, value in tags.items():
            if not key or len(key) > MAX_TAG_KEY_LEN:
                raise ValueError(f"tag keys must be 1-{MAX_TAG_KEY_LEN} characters, got {len(key)}")
            if len(value) > MAX_TAG_VALUE_LEN:
                raise ValueError(f"tag {key!r} is longer than {MAX_TAG_VALUE_LEN} characters")
        return tags

    @model_validator(mode="after")
    def _subsets_fit(self) -> UsageEvent:
        if self.cache_read_tokens + self.cache_write_tokens > self.input_tokens:
            raise ValueError(
                "cache_read_tokens + cache_write_tokens must not exceed input_tokens "
                f"({self.cache_read_tokens} + {self.cache_write_tokens} > {self.input_tokens}); "
                "input_tokens includes cache tokens"
            )
        if self.reasoning_tokens is not None and self.reasoning_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens must not exceed output_tokens (output_tokens includes reasoning)")
        return self

    # ---------------------------------------------------------------- wire formats
    def to_avro(self) -> bytes:
        return codec.encode("usage_event", self.model_dump())

    def to_json(self) -> str:
        return self.model_dump_json(exclude_defaults=True)


def _explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "event"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def validate_event(data: dict[str, Any] | UsageEvent) -> UsageEvent:
    """Validate a mapping (library callers) into a UsageEvent, raising InvalidEvent with a clear reason."""
    if isinstance(data, UsageEvent):
        return data
    if not isinstance(data, dict):
        raise InvalidEvent(f"event must be a mapping, got {type(data).__name__}")
    try:
        return UsageEvent.model_validate(data)
    except ValidationError as exc:
        raise InvalidEvent(_explain(exc)) from None


def parse_json_event(text: str | bytes) -> UsageEvent:
    """Validate one JSON document into a UsageEvent (same rules as the library)."""
    try:
        return UsageEvent.model_validate_json(text)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InvalidEvent(f"malformed JSON: {exc.errors()[0]['msg']}") from None
        raise InvalidEvent(_explain(exc)) from None


def decode_usage(data: bytes) -> UsageEvent:
    """Decode raw bytes from ``usage.raw``: Avro (library) or JSON (kcat, other languages)."""
    if not data:
        raise InvalidEvent("empty message")
    if data[:2] == codec.MAGIC:
        try:
            record = codec.decode("usage_event", data)
        except codec.SchemaDecodeError as exc:
            raise InvalidEvent(str(exc)) from None
        return validate_event(record)
    stripped = data.lstrip()
    if stripped[:1] != b"{":
        raise InvalidEvent("neither Avro single-object encoding nor a JSON object")
    return parse_json_event(data)


def dumps_event(event: UsageEvent) -> str:
    return json.dumps(event.model_dump(mode="json"), separators=(",", ":"))
