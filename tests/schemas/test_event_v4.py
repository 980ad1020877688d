"""Usage event contract v4: ``api_key_id``, the id of the API key that made a call (budgets per key).

The field is optional and follows the id rules (1-200 printable characters) on every path: the model,
JSON, Avro v4 and the library's fast check. Records written with v1-v3 still decode, without a key.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from producers.context import apply_attribution, usage_context
from schemas import codec
from schemas.events import (
    InvalidEvent,
    decode_usage,
    decode_usage_body,
    parse_json_event,
    surely_valid,
    trusted_event,
    validate_event,
)

write_usage = codec.record_writer("usage_event")
write_priced_after_usage = codec.record_writer_after_first("priced_event")


def event(**overrides: Any) -> dict[str, Any]:
    return {
        "event_id": "evt-key-1",
        "timestamp": datetime(2025, 7, 1, 12, tzinfo=UTC),
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1000,
        "output_tokens": 200,
        **overrides,
    }


def test_v4_is_the_newest_usage_schema_and_the_priced_event_embeds_it() -> None:
    usage = codec.latest("usage_event")
    priced = codec.latest("priced_event")
    assert usage.version == 4 and priced.version == 3
    assert usage.parsed["fields"][-1]["name"] == "api_key_id"
    embedded = priced.parsed["fields"][0]["type"]
    assert [f["name"] for f in embedded["fields"]] == [f["name"] for f in usage.parsed["fields"]]


def test_api_key_id_travels_in_avro_and_json_and_takes_both_fast_paths() -> None:
    data = event(api_key_id="key-prod-7", team_id="search-team")
    assert surely_valid(data)
    e = validate_event(data)
    assert e.api_key_id == "key-prod-7"
    assert decode_usage(e.to_avro()) == e == parse_json_event(e.to_json()) == decode_usage(e.to_json().encode())
    assert write_usage(data) == e.to_avro()  # the library's fast writer gives the same bytes
    decoded, body = decode_usage_body(e.to_avro())
    assert decoded == e and body is not None  # trusted: its body is reused in usage.priced
    assert trusted_event(codec.decode("usage_event", e.to_avro())) == e
    price = {
        "price_status": "priced",
        "input_cost": Decimal("0.0025"),
        "output_cost": Decimal("0.002"),
        "total_cost": Decimal("0.0045"),
        "price_source": "t",
        "currency": "USD",
    }
    priced = codec.decode("priced_event", write_priced_after_usage(body, price))
    assert priced["usage"]["api_key_id"] == "key-prod-7" and priced["total_cost"] == Decimal("0.0045")
    assert "api_key_id" not in validate_event(event()).to_json()  # absent: left out of JSON


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "api_key_id: String should have at least 1 character"),
        ("k" * 201, "api_key_id: String should have at most 200 characters"),
        ("key\x00", "api_key_id: control character U+0000"),
        ("key\u0085", "api_key_id: control character U+0085"),
        ("\ud800", "api_key_id: lone surrogate"),
        (7, "api_key_id: Input should be a valid string"),
    ],
)
def test_api_key_id_follows_the_id_rules_on_every_path(value: object, reason: str) -> None:
    data = event(api_key_id=value)
    assert not surely_valid(data)
    with pytest.raises(InvalidEvent) as info:
        validate_event(data)
    assert reason in info.value.reason
    if isinstance(value, str) and "\ud800" not in value:
        with pytest.raises(InvalidEvent):
            parse_json_event(json.dumps({**data, "timestamp": "2025-07-01T12:00:00Z"}))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_records_of_older_producers_still_decode_without_a_key(version: int) -> None:
    e = validate_event(event())
    fields = {f["name"] for f in codec.SCHEMAS["usage_event"][version - 1].parsed["fields"]}
    old = codec.encode("usage_event", {k: v for k, v in e.model_dump().items() if k in fields}, version=version)
    assert codec.writer_of(old).version == version
    decoded, body = decode_usage_body(old)
    assert decoded == e and decoded.api_key_id is None
    assert body is None  # an older body cannot be embedded in a v3 priced event


def test_usage_context_carries_the_api_key_id() -> None:
    with usage_context(tenant_id="acme", team_id="search-team", api_key_id="key-prod-7"):
        filled = apply_attribution({"event_id": "e"})
        explicit = apply_attribution({"event_id": "e", "api_key_id": "key-batch-1"})
    assert filled == {"tenant_id": "acme", "team_id": "search-team", "api_key_id": "key-prod-7", "event_id": "e"}
    assert explicit["api_key_id"] == "key-batch-1"  # explicit fields win
