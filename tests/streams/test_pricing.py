"""Pricing equals an independent genai-prices computation, to the last decimal."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
from genai_prices.types import TieredPrices
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


# ---------------------------------------------------------------- price context and extra usage (issue #18)
# Tier and batch variants start on 2026-10-12/14 in genai-prices' data: these calls are after that.
LATE = datetime(2026, 11, 2, 15, tzinfo=UTC)
TIERS = [None, "default", "flex", "priority", "fast", "standard", "scale"]
CONTEXT_MODELS = [
    ("openai", "gpt-5"),
    ("openai", "gpt-4o"),
    ("openai", "gpt-5.4"),  # tiered standard prices, flat priority ones
    ("openai", "gpt-5-mini"),
    ("anthropic", "claude-sonnet-4-5"),  # batch, 1-hour cache writes, tiers by prompt size
    ("anthropic", "claude-opus-4-6"),
    ("google", "gemini-2.5-flash"),  # batch, audio and web searches priced
    ("google", "gemini-3.8-flash-tts"),  # flex and priority variants
    ("azure", "gpt-5"),  # a fallback provider's model: genai-prices ignores the price context there
]


def context_of(event: UsageEvent) -> dict[str, str]:
    context = {"service_tier": event.service_tier} if event.service_tier else {}
    if event.processing:
        context["processing"] = event.processing
    return context


def reference(event: UsageEvent) -> genai_prices.types.PriceCalculation:
    """genai-prices' own answer: calc_price with the event's usage keys and price context."""
    return genai_prices.calc_price(
        usage_of(event),
        event.model,
        provider_id=event.provider,
        genai_request_timestamp=event.timestamp,
        price_context=context_of(event) or None,
    )


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(CONTEXT_MODELS),
    tier=st.sampled_from(TIERS),
    batch=st.booleans(),
    input_tokens=st.integers(0, 400_000),
    output_tokens=st.integers(0, 50_000),
    shares=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
    searches=st.integers(0, 3),
    day=st.dates(min_value=date(2026, 9, 1), max_value=min(date(2026, 11, 20), datetime.now(UTC).date())),
)
def test_tiers_batch_and_1h_cache_writes_match_genai_prices_exactly(
    model: tuple[str, str],
    tier: str | None,
    batch: bool,
    input_tokens: int,
    output_tokens: int,
    shares: tuple[float, float, float],
    searches: int,
    day: date,
) -> None:
    read = int(input_tokens * shares[0])
    write = int((input_tokens - read) * shares[1])
    event = make(
        *model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=int(write * shares[2]),
        service_tier=tier,
        processing="batch" if batch else None,
        usage_details={"web_searches": searches} if searches else {},
        timestamp=datetime(day.year, day.month, day.day, 9, tzinfo=UTC),
    )
    result = BOOK.price(event)
    expected = reference(event)
    assert result.status == "priced"
    assert result.total_cost == expected.total_price
    assert result.output_cost == expected.output_price  # searches have no direction: counted as input


def test_priority_flex_and_batch_prices_differ_from_standard() -> None:
    """The context reaches the price: otherwise the test above would pass with it ignored."""
    base = {"input_tokens": 1_000_000, "output_tokens": 1_000_000, "timestamp": LATE}
    standard = BOOK.price(make(model="gpt-5", **base)).total_cost
    assert BOOK.price(make(model="gpt-5", service_tier="priority", **base)).total_cost == 2 * standard
    assert BOOK.price(make(model="gpt-5", service_tier="flex", **base)).total_cost == standard / 2
    assert BOOK.price(make(model="gpt-5", processing="batch", **base)).total_cost == standard / 2
    assert BOOK.price(make(model="gpt-5", service_tier="default", **base)).total_cost == standard
    assert BOOK.price(make(model="gpt-5", service_tier="no-such-tier", **base)).total_cost == standard
    # Before the variants' start date (genai-prices has no earlier batch history) the standard price applies.
    early = {**base, "timestamp": datetime(2026, 9, 1, tzinfo=UTC)}
    assert BOOK.price(make(model="gpt-5", processing="batch", **early)).total_cost == standard


def base_rate(rate: object) -> Decimal:
    """A rate per million for a prompt below any prompt-size tier (these calls are far below 200k tokens)."""
    if isinstance(rate, TieredPrices):
        assert all(tier.start >= 200_000 for tier in rate.tiers)
        return rate.base
    assert isinstance(rate, Decimal)
    return rate


def test_a_batch_call_costs_the_batch_price_in_genai_prices_data() -> None:
    """Read the batch rates from the data (not copied by hand) and price a batch call with them."""
    from genai_prices.data_snapshot import get_snapshot

    for provider_id, model_ref in [
        ("openai", "gpt-5"),
        ("anthropic", "claude-sonnet-4-5"),
        ("google", "gemini-2.5-flash"),
    ]:
        provider, model = get_snapshot().find_provider_model(model_ref, None, provider_id, None)
        variant = next(v for v in model.price_variants or () if v.when == {"processing": "batch"})
        assert variant.constraint is None or variant.constraint.active(LATE)
        event = make(provider_id, model_ref, input_tokens=12_345, output_tokens=678, processing="batch", timestamp=LATE)
        result = BOOK.price(event)
        input_rate, output_rate = base_rate(variant.prices.input_mtok), base_rate(variant.prices.output_mtok)
        assert result.input_cost == input_rate * 12_345 / 1_000_000, provider.id
        assert result.output_cost == output_rate * 678 / 1_000_000, provider.id
        assert result.total_cost < BOOK.price(event.model_copy(update={"processing": None})).total_cost


def test_one_hour_cache_writes_cost_the_1h_rate() -> None:
    from genai_prices.data_snapshot import get_snapshot

    _, model = get_snapshot().find_provider_model("claude-sonnet-4-5", None, "anthropic", None)
    prices = model.get_prices(LATE)
    base = {"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 100_000, "output_tokens": 0}
    five_minutes = BOOK.price(make(cache_write_tokens=100_000, timestamp=LATE, **base))
    one_hour = BOOK.price(make(cache_write_tokens=100_000, cache_write_1h_tokens=100_000, timestamp=LATE, **base))
    assert one_hour.input_cost == base_rate(prices.cache_write_1h_mtok) * 100_000 / 1_000_000
    assert five_minutes.input_cost == base_rate(prices.cache_write_mtok) * 100_000 / 1_000_000
    assert one_hour.total_cost > five_minutes.total_cost


def test_per_request_units_and_output_images_are_billed() -> None:
    search = (
        BOOK.price(make("anthropic", "claude-sonnet-4-5", timestamp=LATE, usage_details={"web_searches": 3})).total_cost
        - BOOK.price(make("anthropic", "claude-sonnet-4-5", timestamp=LATE)).total_cost
    )
    assert search == Decimal("0.03")  # $10 per 1,000 searches
    image = make(
        "google",
        "gemini-2.5-flash-image",
        input_tokens=10,
        output_tokens=1304,
        usage_details={"output_image_tokens": 1290},
        timestamp=LATE,
    )
    assert BOOK.price(image).total_cost == reference(image).total_price
    assert BOOK.price(image).total_cost > 10 * BOOK.price(image.model_copy(update={"usage_details": {}})).total_cost


def test_fast_path_takes_only_extras_genai_prices_bills_nothing() -> None:
    """A text/image split for a model pricing audio is billed nothing (fast); a cached audio read for it is
    a part of its priced audio input, which genai-prices asks to be reported: both agree with genai-prices."""
    book = PriceBook()
    split = make("google", "gemini-2.5-flash", usage_details={"input_text_tokens": 900}, timestamp=LATE)
    assert book.price(split).total_cost == reference(split).total_price
    audio = make(
        "google",
        "gemini-2.5-flash",
        cache_read_tokens=500,
        usage_details={"cache_audio_read_tokens": 400},
        timestamp=LATE,
    )
    result = book.price(audio)
    with pytest.raises(ValueError, match="input_audio_tokens"):
        reference(audio)
    assert result.status == "unpriced" and "input_audio_tokens" in result.reason


def test_override_replaces_the_model_price_whatever_the_context() -> None:
    book = PriceBook()
    book.set_override(
        PriceOverride(
            "acme", "openai", "gpt-5", datetime(2026, 1, 1, tzinfo=UTC), TokenRates(Decimal(1), Decimal(2)), "o"
        )
    )
    for context in [{}, {"service_tier": "priority"}, {"processing": "batch"}, {"usage_details": {"web_searches": 5}}]:
        result = book.price(
            make(model="gpt-5", input_tokens=1_000_000, output_tokens=1_000_000, timestamp=LATE, **context)
        )
        assert (result.total_cost, result.source) == (Decimal(3), "override:o"), context
