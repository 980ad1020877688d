"""Pricing equals an independent genai-prices computation, to the last decimal."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import UsageEvent, validate_event
from schemas.records import TokenRates
from streams.pricing import PriceBook, PriceOverride, usage_of

MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("openai", "o3"),
    ("openai", "gpt-4.1"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku"),
    ("google", "gemini-2.5-flash"),
    ("google", "gemini-2.5-pro"),
]


def make(provider: str = "openai", model: str = "gpt-4o", **overrides: Any) -> UsageEvent:
    data: dict[str, Any] = {
        "event_id": "e",
        "timestamp": datetime(2025, 9, 1, tzinfo=UTC),
        "tenant_id": "acme",
        "provider": provider,
        "model": model,
        "input_tokens": 1000,
        "output_tokens": 100,
    }
    data.update(overrides)
    return validate_event(data)


def independent(event: UsageEvent) -> Decimal:
    return genai_prices.calc_price(
        usage_of(event), event.model, provider_id=event.provider, genai_request_timestamp=event.timestamp
    ).total_price


BOOK = PriceBook()


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    input_tokens=st.integers(0, 3_000_000),
    output_tokens=st.integers(0, 200_000),
    cache_share=st.tuples(st.floats(0, 1), st.floats(0, 1)),
    day=st.dates(min_value=datetime(2025, 1, 1).date(), max_value=datetime(2026, 10, 1).date()),
)
def test_matches_genai_prices_exactly(
    model: tuple[str, str], input_tokens: int, output_tokens: int, cache_share: tuple[float, float], day: Any
) -> None:
    read = int(input_tokens * cache_share[0])
    write = int((input_tokens - read) * cache_share[1])
    event = make(
        *model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
        timestamp=datetime(day.year, day.month, day.day, tzinfo=UTC),
    )
    result = BOOK.price(event)
    assert result.status == "priced"
    assert result.total_cost == independent(event)
    assert isinstance(result.total_cost, Decimal)


def test_o3_is_priced_at_its_own_date() -> None:
    may = BOOK.price(
        make(model="o3", input_tokens=1_000_000, output_tokens=1_000_000, timestamp=datetime(2025, 5, 20, tzinfo=UTC))
    )
    july = BOOK.price(
        make(model="o3", input_tokens=1_000_000, output_tokens=1_000_000, timestamp=datetime(2025, 7, 20, tzinfo=UTC))
    )
    assert (may.input_cost, may.output_cost) == (Decimal(10), Decimal(40))
    assert (july.input_cost, july.output_cost) == (Decimal(2), Decimal(8))


def test_unknown_model_is_unpriced_not_zero_dollar_priced() -> None:
    result = BOOK.price(make(model="my-finetune-xyz"))
    assert result.status == "unpriced"
    assert result.total_cost == 0 and "my-finetune-xyz" in result.reason


def test_cache_tokens_are_not_counted_twice() -> None:
    plain = BOOK.price(make(provider="anthropic", model="claude-sonnet-4-5", input_tokens=1_000_000, output_tokens=0))
    cached = BOOK.price(
        make(
            provider="anthropic",
            model="claude-sonnet-4-5",
            input_tokens=1_000_000,
            output_tokens=0,
            cache_read_tokens=1_000_000,
        )
    )
    assert cached.total_cost < plain.total_cost / 5  # cache reads cost a tenth of input


def test_tenant_override_wins_from_its_effective_date() -> None:
    book = PriceBook()
    book.set_override(
        PriceOverride(
            "acme",
            "openai",
            "gpt-4o",
            datetime(2025, 8, 1, tzinfo=UTC),
            TokenRates(Decimal("1"), Decimal("2")),
            "ovr-1",
        )
    )
    before = make(input_tokens=1_000_000, output_tokens=1_000_000, timestamp=datetime(2025, 7, 1, tzinfo=UTC))
    after = make(input_tokens=1_000_000, output_tokens=1_000_000)
    other_tenant = make(input_tokens=1_000_000, output_tokens=1_000_000, tenant_id="globex")
    assert book.price(before).total_cost == independent(before)
    assert book.price(after).total_cost == Decimal(3) and book.price(after).source == "override:ovr-1"
    assert book.price(other_tenant).total_cost == independent(other_tenant)
    book.remove_override("ovr-1")
    assert book.price(after).total_cost == independent(after)


@pytest.mark.parametrize(("provider", "model"), MODELS)
def test_every_listed_model_resolves(provider: str, model: str) -> None:
    assert BOOK.price(make(provider, model)).status == "priced"
