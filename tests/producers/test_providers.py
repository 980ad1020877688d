"""Provider responses (shaped like the SDKs' JSON) become events without double-counting cache tokens."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest

from producers.providers import (
    estimate_event,
    from_anthropic,
    from_anthropic_batch_result,
    from_bedrock_converse,
    from_gemini,
    from_openai_batch_line,
    from_openai_chat,
    from_openai_responses,
)
from schemas.events import UsageEvent, validate_event
from streams.pricing import PriceBook

OPENAI_CHAT = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "model": "gpt-4o-2024-08-06",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}
OPENAI_RESPONSES = {
    "id": "resp_1",
    "object": "response",
    "model": "o3-2025-04-16",
    "usage": {
        "input_tokens": 2000,
        "input_tokens_details": {"cached_tokens": 500},
        "output_tokens": 900,
        "output_tokens_details": {"reasoning_tokens": 700},
        "total_tokens": 2900,
    },
}
ANTHROPIC = {
    "id": "msg_01",
    "type": "message",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "hello"}],
    "usage": {
        "input_tokens": 100,
        "cache_creation_input_tokens": 300,
        "cache_read_input_tokens": 600,
        "output_tokens": 50,
    },
}
GEMINI = {
    "modelVersion": "gemini-2.5-flash",
    "candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}],
    "usageMetadata": {
        "promptTokenCount": 1000,
        "candidatesTokenCount": 100,
        "thoughtsTokenCount": 40,
        "cachedContentTokenCount": 200,
        "totalTokenCount": 1140,
    },
}
BEDROCK_CONVERSE = {
    "output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}},
    "stopReason": "end_turn",
    "usage": {
        "inputTokens": 100,
        "outputTokens": 50,
        "totalTokens": 1050,
        "cacheReadInputTokens": 600,
        "cacheWriteInputTokens": 300,
    },
    "metrics": {"latencyMs": 420},
}


class FakeSdkObject:
    """SDK responses are pydantic models with model_dump(); the helpers accept them as they are."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def model_dump(self) -> dict[str, Any]:
        return self._data


CASES: list[tuple[Any, dict[str, Any]]] = [
    (
        lambda: from_openai_chat(OPENAI_CHAT),
        {"model": "gpt-4o", "input_tokens": 1200, "cache_read_tokens": 1024, "output_tokens": 300},
    ),
    (
        lambda: from_openai_chat(FakeSdkObject(OPENAI_CHAT)),
        {"model": "gpt-4o", "input_tokens": 1200, "output_tokens": 300},
    ),
    (
        lambda: from_openai_responses(OPENAI_RESPONSES),
        {"model": "o3", "input_tokens": 2000, "cache_read_tokens": 500, "output_tokens": 900, "reasoning_tokens": 700},
    ),
    (
        lambda: from_anthropic(ANTHROPIC),
        {
            "model": "claude-sonnet-4-5",
            "input_tokens": 1000,
            "cache_read_tokens": 600,
            "cache_write_tokens": 300,
            "output_tokens": 50,
        },
    ),
    (
        lambda: from_gemini(GEMINI),
        {
            "model": "gemini-2.5-flash",
            "input_tokens": 1000,
            "cache_read_tokens": 200,
            "output_tokens": 140,
            "reasoning_tokens": 40,
        },
    ),
    (
        lambda: from_bedrock_converse(BEDROCK_CONVERSE, model="anthropic.claude-3-5-sonnet-20240620-v1:0"),
        {"input_tokens": 1000, "cache_read_tokens": 600, "cache_write_tokens": 300, "output_tokens": 50},
    ),
]


@pytest.mark.parametrize(("build", "expected"), CASES)
def test_provider_usage_maps_to_event(build: Any, expected: dict[str, Any]) -> None:
    fields = build()
    for key, value in expected.items():
        assert fields[key] == value, key
    # the mapped fields satisfy the contract (cache tokens are subsets of input tokens)
    validate_event({**fields, "event_id": "e", "timestamp": "2025-07-01T00:00:00Z", "tenant_id": "t"})


def test_attribution_fields_pass_through() -> None:
    fields = from_anthropic(ANTHROPIC, tenant_id="acme", feature="search", tags={"k": "v"})
    assert (fields["tenant_id"], fields["feature"], fields["tags"]) == ("acme", "search", {"k": "v"})


def test_bedrock_without_model_is_an_error() -> None:
    with pytest.raises(TypeError):
        from_bedrock_converse(BEDROCK_CONVERSE)  # type: ignore[call-arg]


def test_stream_without_usage_is_estimated() -> None:
    fields = estimate_event(provider="openai", model="gpt-4o", prompt="x" * 401, completion="y" * 80)
    assert fields["estimated"] is True
    assert (fields["input_tokens"], fields["output_tokens"]) == (101, 20)


# ---------------------------------------------------------------- price context and extra usage (issue #18)
LATE = "2026-11-02T15:00:00Z"  # after genai-prices' tier and batch variants start (2026-10-12/14)


def chat(tier: str | None = None, model: str = "gpt-5-2025-08-07") -> dict[str, Any]:
    body = {**OPENAI_CHAT, "model": model, "usage": {**OPENAI_CHAT["usage"], "prompt_tokens": 120_000}}
    return body if tier is None else {**body, "service_tier": tier}


def anthropic_1h() -> dict[str, Any]:
    usage = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 3000,
        "cache_read_input_tokens": 9000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
        "output_tokens": 700,
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
        "service_tier": "standard",
    }
    return {**ANTHROPIC, "model": "claude-sonnet-4-5-20250929", "usage": usage}


GEMINI_IMAGE = {
    "modelVersion": "gemini-2.5-flash-image",
    "usageMetadata": {
        "promptTokenCount": 10,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
        "candidatesTokenCount": 1304,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}],
        "totalTokenCount": 1314,
    },
}


def full(fields: dict[str, Any]) -> UsageEvent:
    return validate_event({**fields, "event_id": fields.get("event_id", "e"), "timestamp": LATE, "tenant_id": "t"})


def genai_prices_price(data: Any, provider: str, flavor: str, context: dict[str, str] | None) -> Decimal:
    """What genai-prices itself says: its full extracted usage, priced with the matching context."""
    extracted = genai_prices.extract_usage(data, provider_id=provider, api_flavor=flavor)
    assert extracted.model is not None
    return genai_prices.calc_price(
        extracted.usage,
        extracted.model.id,
        provider_id=provider,
        genai_request_timestamp=datetime(2026, 11, 2, 15, tzinfo=UTC),
        price_context=context,
    ).total_price


BOOK = PriceBook()


@pytest.mark.parametrize("tier", ["default", "flex", "priority", "fast", "scale"])
@pytest.mark.parametrize("helper", ["chat", "responses"])
def test_openai_tiers_are_taken_from_the_response_and_priced_as_genai_prices(tier: str, helper: str) -> None:
    if helper == "chat":
        data, fields = chat(tier), from_openai_chat(chat(tier))
    else:
        data = {**OPENAI_RESPONSES, "model": "gpt-5-2025-08-07", "service_tier": tier}
        fields = from_openai_responses(data)
    assert fields["service_tier"] == tier and "processing" not in fields
    event = full(fields)
    expected = genai_prices_price(data, "openai", helper, {"service_tier": tier})
    assert BOOK.price(event).total_cost == expected
    standard = genai_prices_price(data, "openai", helper, None)
    if tier in ("flex", "priority", "fast"):
        assert expected != standard  # the tier changes the price, so the match above is not a coincidence


def test_openai_batch_output_lines_are_batch_calls() -> None:
    line = {
        "id": "batch_req_123",
        "custom_id": "request-1",
        "response": {"status_code": 200, "request_id": "req_1", "body": {**chat(), "object": "chat.completion"}},
        "error": None,
    }
    fields = from_openai_batch_line(json.dumps(line))
    assert (fields["processing"], fields["event_id"], fields["model"]) == (
        "batch",
        "openai-batch-batch_req_123",
        "gpt-5",
    )
    expected = genai_prices_price(chat(), "openai", "chat", {"processing": "batch"})
    assert BOOK.price(full(fields)).total_cost == expected < genai_prices_price(chat(), "openai", "chat", None)
    responses = {**line, "response": {"status_code": 200, "body": {**OPENAI_RESPONSES, "model": "gpt-5-2025-08-07"}}}
    assert from_openai_batch_line(responses)["reasoning_tokens"] == 700
    assert from_openai_batch_line(line, event_id="mine")["event_id"] == "mine"  # keyword arguments win
    failed = {"id": "batch_req_2", "custom_id": "r2", "response": None, "error": {"code": "server_error"}}
    with pytest.raises(ValueError, match="nothing to bill"):
        from_openai_batch_line(failed)
    with pytest.raises(ValueError, match="status 400"):
        from_openai_batch_line({**line, "response": {"status_code": 400, "body": {"error": {}}}})


def test_anthropic_1h_cache_writes_searches_and_tier() -> None:
    fields = from_anthropic(anthropic_1h())
    assert fields["input_tokens"] == 12_050 and fields["cache_write_tokens"] == 3000
    assert fields["cache_write_1h_tokens"] == 2000 and fields["service_tier"] == "standard"
    assert fields["usage_details"] == {"cache_write_5m_tokens": 1000, "web_searches": 2}
    expected = genai_prices_price(anthropic_1h(), "anthropic", "default", {"service_tier": "standard"})
    assert BOOK.price(full(fields)).total_cost == expected
    # Without the 1-hour split the writes would cost the 5-minute rate: the event keeps the difference.
    five_minutes = full({**fields, "cache_write_1h_tokens": None, "usage_details": {"web_searches": 2}})
    assert BOOK.price(five_minutes).total_cost < expected


def test_anthropic_batch_results_are_batch_calls() -> None:
    message = {**anthropic_1h(), "id": "msg_9", "usage": {**anthropic_1h()["usage"], "service_tier": "batch"}}
    result = {"custom_id": "c1", "result": {"type": "succeeded", "message": message}}
    fields = from_anthropic_batch_result(result)
    assert (fields["processing"], fields["event_id"]) == ("batch", "anthropic-batch-msg_9")
    assert "service_tier" not in fields  # Anthropic reports batch as the tier; it is the processing
    assert from_anthropic(message)["processing"] == "batch"
    expected = genai_prices_price(message, "anthropic", "default", {"processing": "batch"})
    assert BOOK.price(full(fields)).total_cost == expected
    for kind in ("errored", "canceled", "expired"):
        with pytest.raises(ValueError, match="nothing to bill"):
            from_anthropic_batch_result({"custom_id": "c2", "result": {"type": kind}})


def test_gemini_output_images_are_billed() -> None:
    fields = from_gemini(GEMINI_IMAGE)
    assert fields["usage_details"] == {"input_text_tokens": 10, "output_image_tokens": 1290}
    price = BOOK.price(full(fields)).total_cost
    assert price == genai_prices_price(GEMINI_IMAGE, "google", "default", None)
    assert price > 10 * BOOK.price(full({**fields, "usage_details": {}})).total_cost  # was 8-9 % of it


def test_a_tier_given_by_the_caller_wins_and_odd_reported_tiers_are_left_out() -> None:
    assert from_openai_chat(chat("priority"), service_tier="flex")["service_tier"] == "flex"
    assert from_openai_chat(chat(" Priority "))["service_tier"] == "priority"
    assert "service_tier" not in from_openai_chat(chat("not a tier!"))
    assert from_gemini(GEMINI, service_tier="flex", processing="batch")["processing"] == "batch"


def test_a_model_the_price_data_does_not_know_still_makes_an_event() -> None:
    """genai-prices' extract_usage raises LookupError for such a model; the call is still metered (unpriced)."""
    body = {**GEMINI, "modelVersion": "models/gemini-2.5-pro"}
    fields = from_gemini(body)
    assert (fields["model"], fields["input_tokens"], fields["output_tokens"]) == ("models/gemini-2.5-pro", 1000, 140)
    assert BOOK.price(full(fields)).status == "unpriced"
