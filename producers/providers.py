"""Build usage events from providers' raw responses, with genai-prices' usage extraction.

Every helper returns a plain dict of event fields (pass it to ``UsageProducer.record``; attribution
such as tenant and feature comes from ``usage_context`` or keyword arguments). genai-prices applies
the convention of DESIGN.md §1: ``input_tokens`` *includes* cache read and cache write tokens — so an
Anthropic response with ``input_tokens=100, cache_read_input_tokens=600, cache_creation_input_tokens=300``
becomes ``input_tokens=1000`` with the two cache counts as subsets, never counted twice.

Everything else genai-prices extracts is kept: 1-hour cache writes (Anthropic
``cache_creation.ephemeral_1h_input_tokens``) in ``cache_write_1h_tokens``, and the other usage keys
(Gemini's output image tokens and modality splits, Anthropic's server-side web searches, 5-minute cache
writes…) in ``usage_details`` under genai-prices' names, zeros left out. The price context comes from the
response too: OpenAI's ``service_tier``, Anthropic's ``usage.service_tier`` (``batch`` there means
``processing="batch"``), and ``processing="batch"`` for Batch API results (:func:`from_openai_batch_line`,
:func:`from_anthropic_batch_result`). Keyword arguments win over anything taken from the response.

Streams that end without a usage block get :func:`estimate_event`: tokens estimated from text length
(4 characters per token, the providers' own rule of thumb for English) and ``estimated=True``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from schemas.events import NAMED_USAGE_KEYS, SERVICE_TIER

CHARS_PER_TOKEN = 4


def _as_data(response: Any) -> Any:
    """Accept SDK response objects (pydantic models, Gemini/Bedrock dict-likes) as well as dicts."""
    for method in ("model_dump", "to_dict", "to_json_dict"):
        if hasattr(response, method):
            return getattr(response, method)()
    return response


def _count(key: str, value: Any) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, float | Decimal) and value == int(value):
        return int(value)
    raise ValueError(f"{key} = {value!r} is not a whole number; usage events carry counts")


def _tier_of(value: Any) -> str | None:
    """A reported service tier as the event contract takes it (lowercase token), or None."""
    if not isinstance(value, str):
        return None
    tier = value.strip().lower()
    return tier if SERVICE_TIER.fullmatch(tier) else None


def _event(
    response: Any,
    provider: str,
    api_flavor: str,
    model: str | None,
    fields: Mapping[str, Any],
    context: Mapping[str, Any] | None = None,
) -> dict:
    from genai_prices import extract_usage  # here, not at the top: importing producers stays light
    from genai_prices.data_snapshot import get_snapshot

    data = _as_data(response)
    try:
        extracted = extract_usage(data, provider_id=provider, api_flavor=api_flavor)
        usage, found = extracted.usage, extracted.model.id if extracted.model else None
    except LookupError:
        # The price data does not know the model: the usage is still the call's (the pipeline will report
        # the model as unpriced), taken by the same extractor, with the model named as the response names it.
        found, usage = get_snapshot().find_provider(None, provider, None).extract_usage(data, api_flavor=api_flavor)
    event: dict[str, Any] = {"provider": provider, "input_tokens": 0, "output_tokens": 0}
    details: dict[str, int] = {}
    for key, value in vars(usage).items():
        if value is None:
            continue
        named = NAMED_USAGE_KEYS.get(key)
        if named is not None:
            event[named] = _count(key, value)
        elif value:  # genai-prices treats a zero as absent: a smaller event
            details[key] = _count(key, value)
    if details:
        event["usage_details"] = details
    chosen = model or found
    if chosen is None:
        raise ValueError(f"the {provider} response names no model; pass model=...")
    event["model"] = chosen
    if context:
        event.update(context)
    event.update(fields)
    return event


def _openai_context(data: Any) -> dict[str, Any]:
    tier = _tier_of(data.get("service_tier")) if isinstance(data, Mapping) else None
    return {"service_tier": tier} if tier else {}


def _anthropic_context(data: Any) -> dict[str, Any]:
    usage = data.get("usage") if isinstance(data, Mapping) else None
    tier = _tier_of(usage.get("service_tier")) if isinstance(usage, Mapping) else None
    if tier == "batch":  # Message Batches results say so in the tier; genai-prices prices it as processing
        return {"processing": "batch"}
    return {"service_tier": tier} if tier else {}


def _openai_flavor(body: Mapping[str, Any]) -> str:
    kind = body.get("object")
    if kind == "response":
        return "responses"
    if kind == "list":  # embeddings
        return "embeddings"
    if kind == "chat.completion":
        return "chat"
    usage = body.get("usage")
    return "responses" if isinstance(usage, Mapping) and "input_tokens" in usage else "chat"


def from_openai_chat(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """OpenAI Chat Completions (``usage.prompt_tokens``, ``prompt_tokens_details.cached_tokens``...) and the
    response's ``service_tier`` (``default``, ``flex``, ``priority``...)."""
    data = _as_data(response)
    return _event(data, "openai", "chat", model, fields, _openai_context(data))


def from_openai_responses(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """OpenAI Responses API (``usage.input_tokens``, ``input_tokens_details.cached_tokens``...) and the
    response's ``service_tier``."""
    data = _as_data(response)
    return _event(data, "openai", "responses", model, fields, _openai_context(data))


def from_openai_batch_line(line: Any, *, model: str | None = None, **fields: Any) -> dict:
    """One line of an OpenAI Batch API output file (``{"id", "custom_id", "response": {"status_code", "body"},
    "error"}``, as a dict or the JSON text): the body priced as a batch call (``processing="batch"``), chat,
    responses or embeddings by its ``object``. ``event_id`` defaults to ``openai-batch-<line id>``, so
    recording an output file twice counts each request once. A line without a successful body (an error, a
    non-2xx status) bills nothing: ValueError with the reason."""
    data = json.loads(line) if isinstance(line, str | bytes) else _as_data(line)
    response = data.get("response") if isinstance(data, Mapping) else None
    body = response.get("body") if isinstance(response, Mapping) else None
    status = response.get("status_code", 200) if isinstance(response, Mapping) else None
    if not isinstance(body, Mapping) or not isinstance(status, int) or not 200 <= status < 300:
        error = data.get("error") if isinstance(data, Mapping) else None
        raise ValueError(f"batch line has no successful response (status {status}, error {error!r}): nothing to bill")
    context: dict[str, Any] = {**_openai_context(body), "processing": "batch"}
    if isinstance(data.get("id"), str) and data["id"]:
        context["event_id"] = f"openai-batch-{data['id']}"
    return _event(body, "openai", _openai_flavor(body), model, fields, context)


def from_anthropic(response: Any, *, model: str | None = None, **fields: Any) -> dict:
    """Anthropic Messages; cache read/creation tokens are added into ``input_tokens``, 1-hour cache writes
    are ``cache_write_1h_tokens``, server-side web searches ``usage_details["web_searches"]``, and
    ``usage.service_tier`` the tier (``batch`` there: ``processing="batch"``)."""
    data = _as_data(response)
    return _event(data, "anthropic", "default", model, fields, _anthropic_context(data))


def from_anthropic_batch_result(result: Any, *, model: str | None = None, **fields: Any) -> dict:
    """One Message Batches result (``{"custom_id", "result": {"type": "succeeded", "message": {...}}}``, a dict
    or the JSON text): the message priced as a batch call (``processing="batch"``). ``event_id`` defaults to
    ``anthropic-batch-<message id>``. Errored, canceled and expired requests bill nothing: ValueError."""
    data = json.loads(result) if isinstance(result, str | bytes) else _as_data(result)
    outcome = data.get("result") if isinstance(data, Mapping) else None
    kind = outcome.get("type") if isinstance(outcome, Mapping) else None
    message = outcome.get("message") if isinstance(outcome, Mapping) else None
    if kind != "succeeded" or not isinstance(message, Mapping):
        raise ValueError(f"batch result is {kind!r}, not succeeded: nothing to bill")
    context: dict[str, Any] = {**_anthropic_context(message), "processing": "batch"}
    if isinstance(message.get("id"), str) and message["id"]:
        context["event_id"] = f"anthropic-batch-{message['id']}"
    return _event(message, "anthropic", "default", model, fields, context)


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
