"""The usage event's rules, the same for library dicts, JSON and Avro."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    InvalidEvent,
    UsageEvent,
    decode_usage,
    parse_json_event,
    surely_valid,
    validate_event,
)


def event(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "evt-1",
        "timestamp": "2025-07-01T12:00:00+02:00",
        "tenant_id": "acme",
        "provider": "anthropic",
        "model": "claude-sonnet-4-5",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 600,
        "cache_write_tokens": 300,
    }
    base.update(overrides)
    return base


def test_valid_event_is_normalised_to_utc() -> None:
    e = validate_event(event())
    assert e.timestamp == datetime(2025, 7, 1, 10, 0, tzinfo=UTC)
    assert e.timestamp.tzinfo == UTC


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": "12"}, "output_tokens"),
        ({"output_tokens": True}, "output_tokens"),
        ({"input_tokens": 1.5}, "input_tokens"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "x" * 5000}, "tenant_id"),
        ({"timestamp": "2025-07-01T12:00:00"}, "timestamp"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"timestamp": (datetime.now(UTC) + timedelta(days=2)).isoformat()}, "more than 24 h in the future"),
        ({"cache_read_tokens": 900}, "cache_write_tokens must not exceed"),
        ({"reasoning_tokens": 201}, "reasoning_tokens"),
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "at most 32 tags"),
        ({"tags": {"k": "v" * 300}}, "longer than 256"),
        ({"surprise": 1}, "surprise"),
        ({"model": None}, "model"),
    ],
)
def test_invalid_events_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        validate_event(event(**overrides))
    assert field in info.value.reason


def test_missing_required_field_is_named() -> None:
    data = event()
    del data["provider"]
    with pytest.raises(InvalidEvent, match="provider: Field required"):
        validate_event(data)


def test_json_and_avro_decode_to_the_same_event() -> None:
    e = validate_event(event(tags={"team": "search"}, user_id="u-1", estimated=True))
    assert decode_usage(e.to_avro()) == e
    assert decode_usage(e.to_json().encode()) == e
    assert parse_json_event(e.to_json()) == e


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty message"),
        (b"\x00\xff\x10binary", "neither Avro"),
        (b"not json at all", "neither Avro"),
        (b'{"event_id": "x",', "malformed JSON"),
        (b'{"event_id": 5}', "event_id"),
        (b"\xc3\x01garbage!!", "unknown writer schema"),
    ],
)
def test_raw_bytes_rejections_have_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        decode_usage(payload)


def test_other_offsets_compare_equal_after_normalising() -> None:
    a = validate_event(event(timestamp=datetime(2025, 1, 1, 5, tzinfo=timezone(timedelta(hours=5)))))
    b = validate_event(event(timestamp=datetime(2025, 1, 1, 0, tzinfo=UTC)))
    assert a.timestamp == b.timestamp
    assert isinstance(a, UsageEvent)


# ---------------------------------------------------------------- the library's fast check
_AWARE = st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7))]))
_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**13), st.text(max_size=210), _AWARE, st.datetimes(),
    st.dictionaries(st.text(max_size=70), st.text(max_size=260), max_size=34),
    st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
)  # fmt: skip
_FIELDS = [*UsageEvent.model_fields, "unknown_field"]


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ANY_VALUE), st.booleans())
def test_surely_valid_accepts_only_what_the_model_accepts(mutations: dict[str, Any], plausible: bool) -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **mutations} if plausible else mutations
    if surely_valid(data):
        validate_event({"timestamp": datetime.now(UTC), **data})  # must not raise (the producer fills in now)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"user_id": "u-1", "feature": "search", "tags": {"team": "ml"}, "latency_ms": 812, "estimated": True},
     {"reasoning_tokens": 100, "session_id": "s-1", "environment": "prod"}],
)  # fmt: skip
def test_everyday_library_events_take_the_fast_path(overrides: dict[str, Any]) -> None:
    data = {**event(timestamp=datetime(2025, 7, 1, tzinfo=UTC)), **overrides}
    assert surely_valid(data)
    without_timestamp = {k: v for k, v in data.items() if k != "timestamp"}
    assert surely_valid(without_timestamp)  # the producer fills in now
    assert not surely_valid({**data, "input_tokens": -1})
    assert not surely_valid({**data, "timestamp": "2025-07-01T00:00:00Z"})  # strings go through pydantic
    assert not surely_valid({**data, "timestamp": datetime.now(UTC) + timedelta(days=2)})  # a clock far ahead
