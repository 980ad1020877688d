"""Provider responses (shaped like the SDKs' JSON) become events without double-counting cache tokens."""

from __future__ import annotations

from typing import Any

import pytest

from producers.providers import (
    estimate_event,
    from_anthropic,
    from_bedrock_converse,
    from_gemini,
    from_openai_chat,
    from_openai_responses,
)
from schemas.events import validate_event

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
