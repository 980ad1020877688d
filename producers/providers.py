"""Build usage events from providers' raw responses, with genai-prices' usage extraction.

Every helper returns a plain dict of event fields (pass it to ``UsageProducer.record``; attribution
such as tenant and feature comes from ``usage_context`` or keyword arguments). genai-prices applies
the convention of DESIGN.md §1: ``input_tokens`` *includes* cache read and cache write tokens — so an
Anthropic response with ``input_tokens=100, cache_read_input_tokens=600, cache_creation_input_tokens=300``
becomes ``input_tokens=1000`` with the two cache counts as subsets, never counted twice.

Streams that end without a usage block get :func:`estimate_event`: tokens estimated from text length
(4 characters per token, the providers' own rule of thumb for English) and ``estimated=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

_USAGE_TO_EVENT = {
    "input_tokens": "input_tokens",
    "output_tokens": "output_tokens",
    "cache_read_tokens": "cache_read_tokens",
    "cache_write_tokens": "cache_write_tokens",
    "output_reasoning_tokens": "reasoning_tokens",
    "input_audio_tokens": "input_audio_tokens",
    "output_audio_tokens": "output_audio_tokens",
    "input_image_tokens": "input_image_tokens",
}
CHARS_PER_TOKEN = 4


def _as_data(response: Any) -> Any:
    """Accept SDK response objects (pydantic models, Gemini/Bedrock dict-likes) as well as dicts."""
    for method in ("model_dump", "to_dict", "to_json_dict"):
        if hasattr(response, method):
            return getattr(response, method)()
    return response


def _event(response: Any, provider: str, api_flavor: str, model: str | None, fields: Mapping[str, Any]) -> dict:
    from genai_prices import extract_usage  # here, not at the top: importing producers stays light

    extracted = extract_usage(_as_data(response), provider_id=provider, api_flavor=api_flavor)
    reported = vars(extracted.usage)
    event: dict[str, Any] = {"provider": provider}
    for source, target in _USAGE_TO_EVENT.items():
        value = reported.get(source)
        if value is not None:
            event[target] = int(value)
    event.setdefault("input_tokens", 0)
    event.setdefault("output_tokens", 0)
    chosen = model or (extracted.model.id if extracted.model else None)
    if chosen is None:
        raise ValueError(f"the {provider} response names no model; pass model=...")
    event["model"] = chosen
    event.update(fields)
    return event


def from_openai_chat(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """OpenAI Chat Completions (``usage.prompt_tokens``, ``prompt_tokens_details.cached_tokens``...)."""
    return _event(response, "openai", "chat", model, fields)


def from_openai_responses(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """OpenAI Responses API (``usage.input_tokens``, ``input_tokens_details.cached_tokens``...)."""
    return _event(response, "openai", "responses", model, fields)


def from_anthropic(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """Anthropic Messages; cache read/creation tokens are added into ``input_tokens``."""
    return _event(response, "anthropic", "default", model, fields)


def from_gemini(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """Google Gemini ``generateContent``; thoughts count as output (reasoning) tokens."""
    return _event(response, "google", "default", model, fields)


def from_bedrock_converse(response: Any, *, model: str, **fields: Any) -> dict:
    """AWS Bedrock Converse; the response does not name the model, so ``model`` is required."""
    return _event(response, "aws", "default", model, fields)


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN) if text else 0


def estimate_event(*, provider: str, model: str, prompt: str, completion: str, **fields: Any) -> dict:
    """An event for a streamed call that returned no usage block: token counts estimated from text."""
    return {
        "provider": provider,
        "model": model,
        "input_tokens": estimate_tokens(prompt),
        "output_tokens": estimate_tokens(completion),
        "estimated": True,
        **fields,
    }
