"""The usage event's rules, the same for library dicts, JSON and Avro."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from schemas.events import InvalidEvent, UsageEvent, decode_usage, parse_json_event, validate_event


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
