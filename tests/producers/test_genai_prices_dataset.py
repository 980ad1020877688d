"""genai-prices' dataset of real provider responses (pydantic-ai's recorded cassettes), vendored in
``data/genai_prices_usages.json`` (see ``data/README.md``): each response, turned into an event by our
provider helpers and priced by the pipeline's PriceBook, costs exactly what genai-prices says its full
extracted usage costs. Before issue 18 the helpers dropped Gemini's output image tokens (image calls billed
at 8-9 % of their price) and Anthropic's server-side web searches, and raised on models the price data does
not know."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import genai_prices
import pytest

from producers.providers import from_anthropic, from_gemini, from_openai_chat, from_openai_responses
from schemas.events import validate_event
from streams.pricing import PriceBook

DATA = Path(__file__).parent / "data" / "genai_prices_usages.json"
BODIES: list[dict[str, Any]] = json.loads(DATA.read_text())
WHEN = datetime(2026, 11, 20, 12, tzinfo=UTC)
Helper = Callable[..., dict[str, Any]]


def route(body: dict[str, Any]) -> tuple[Helper, str, str] | str:
    """The helper a service would call for this response (by its shape: the cassettes' file names do not
    always say which API answered), with genai-prices' provider and API flavor; or why there is none."""
    usage = body.get("usage") or {}
    if "usageMetadata" in body:
        return from_gemini, "google", "default"
    if "cache_creation_input_tokens" in usage or "cache_read_input_tokens" in usage:
        return from_anthropic, "anthropic", "default"
    if "input_tokens_details" in usage or "output_tokens_details" in usage:
        return from_openai_responses, "openai", "responses"
    if "prompt_tokens" in usage:
        return from_openai_chat, "openai", "chat"
    if "inputTokens" in usage:
        return "Bedrock Converse: the response names no model (from_bedrock_converse needs model=...)"
    if "billed_units" in usage:
        return "Cohere: no provider helper, and the response names no model"
    return "unrecognised response shape"


# Responses the test cannot price, each for the reason given (none of them is silently skipped: the counts
# are asserted, and every other response must match genai-prices exactly).
EXPECTED_WITHOUT_HELPER = {
    "Bedrock Converse: the response names no model (from_bedrock_converse needs model=...)": 33,
    "Cohere: no provider helper, and the response names no model": 4,
}


def reference(body: dict[str, Any], provider: str, flavor: str) -> Any:
    """genai-prices' own price of its full extracted usage, or None when it cannot price the response (the
    price data does not list the model for that provider: the pipeline must then say unpriced too)."""
    try:
        extracted = genai_prices.extract_usage(body, provider_id=provider, api_flavor=flavor)
    except LookupError:
        return None
    assert extracted.model is not None
    return extracted.calc_price(genai_request_timestamp=WHEN)


def test_every_response_prices_exactly_as_genai_prices() -> None:
    book = PriceBook()
    outcomes: Counter[str] = Counter()
    mismatches = []
    for index, body in enumerate(BODIES):
        routed = route(body)
        if isinstance(routed, str):
            outcomes[routed] += 1
            continue
        helper, provider, flavor = routed
        event = validate_event({**helper(body), "event_id": f"dataset-{index}", "timestamp": WHEN, "tenant_id": "t"})
        assert event.provider == provider
        price = book.price(event)
        expected = reference(body, provider, flavor)
        if expected is None:
            outcomes["unpriced by both (model unknown to genai-prices for the provider)"] += 1
            if price.status != "unpriced":
                mismatches.append((index, event.model, "genai-prices cannot price it", price.total_cost))
            continue
        outcomes["priced"] += 1
        if (price.status, price.total_cost, price.output_cost) != (
            "priced",
            expected.total_price,
            expected.output_price,
        ):
            mismatches.append((index, event.model, expected.total_price, price.total_cost, price.reason))
    assert not mismatches, mismatches
    assert {k: v for k, v in outcomes.items() if k in EXPECTED_WITHOUT_HELPER} == EXPECTED_WITHOUT_HELPER
    assert outcomes["priced"] >= 400, outcomes
    assert sum(outcomes.values()) == len(BODIES)


@pytest.mark.parametrize(
    ("model", "detail"),
    [("gemini-2.5-flash-image", "output_image_tokens"), ("claude-sonnet-4-20250514", "web_searches")],
)
def test_the_units_that_were_dropped_are_in_the_events(model: str, detail: str) -> None:
    """The responses behind the issue's under-billing: their extra units now reach the event."""
    carried = []
    for body in BODIES:
        routed = route(body)
        if isinstance(routed, str) or (body.get("model") or body.get("modelVersion")) != model:
            continue
        carried.append(routed[0](body).get("usage_details", {}).get(detail, 0))
    assert any(carried), (model, detail)
