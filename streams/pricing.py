"""Pricing: the cost of one usage event at its own timestamp, exact, in USD.

Base prices come from genai-prices (effective-dated: o3 cost $10/$40 per million tokens before June
2025 and $2/$8 after). Finding a model is the slow part (~100 µs in genai-prices), so a PriceBook
resolves each (provider, model) once and keeps the result; the per-event work is then choosing the
price in force at the event's time and a few Decimal multiplications (see ``tokenmeter bench``).
Models whose price has tiers or extra units (audio, images) take genai-prices' own calculation.

Per-tenant overrides (custom per-token rates from a compacted config topic) win over the base price
from their ``effective_from`` on. An unknown model is never a silent $0: it yields
``PriceResult.status == "unpriced"`` with zero cost, which the pipeline counts and alerts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import genai_prices
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices

from schemas.events import UsageEvent
from schemas.records import ZERO, PriceResult, TokenRates

_FAST_KEYS = frozenset({"input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok"})
_NOT_CARRIED = re.compile(r"audio|image|video|_1h_")
GENAI_PRICES_VERSION = genai_prices.__version__


@dataclass(frozen=True)
class PriceOverride:
    """A tenant's custom rates for one model from ``effective_from`` on (a rate card entry)."""

    tenant_id: str
    provider: str
    model: str
    effective_from: datetime
    rates: TokenRates
    override_id: str


Rate = Decimal | TieredPrices


def _rate_at(rate: Rate | None, input_tokens: int) -> Decimal | None:
    """genai-prices' cliff tiers: past a tier's start (in input tokens) all tokens pay the tier's rate."""
    if rate is None or isinstance(rate, Decimal):
        return rate
    for tier in reversed(rate.tiers):
        if input_tokens > tier.start:
            return tier.price
    return rate.base


@dataclass(frozen=True)
class _FastPrice:
    input_mtok: Rate
    output_mtok: Rate
    cache_read_mtok: Rate | None
    cache_write_mtok: Rate | None
    flat: TokenRates | None = None  # the rates, when none of them has tiers (most models): made once

    def at(self, input_tokens: int) -> TokenRates:
        if self.flat is not None:
            return self.flat
        input_rate = _rate_at(self.input_mtok, input_tokens)
        output_rate = _rate_at(self.output_mtok, input_tokens)
        assert input_rate is not None and output_rate is not None
        return TokenRates(
            input_rate,
            output_rate,
            _rate_at(self.cache_read_mtok, input_tokens),
            _rate_at(self.cache_write_mtok, input_tokens),
        )


@dataclass(frozen=True)
class _Resolved:
    provider: Provider
    model: ModelInfo


class PriceBook:
    """Prices events; caches model resolution per (provider, model) and fast rates per price object."""

    def __init__(self, overrides: list[PriceOverride] | None = None) -> None:
        self._snapshot = get_snapshot()
        self._models: dict[tuple[str, str], _Resolved | str] = {}
        # Keyed by id() but holding the price object too, so an id can never be reused by another object.
        self._fast: dict[int, tuple[ModelPrice, _FastPrice | None]] = {}
        self._overrides: dict[tuple[str, str, str], list[PriceOverride]] = {}
        for override in overrides or []:
            self.set_override(override)

    # ---------------------------------------------------------------- overrides
    def set_override(self, override: PriceOverride) -> None:
        key = (override.tenant_id, override.provider, override.model)
        entries = [o for o in self._overrides.get(key, []) if o.override_id != override.override_id]
        entries.append(override)
        entries.sort(key=lambda o: o.effective_from)
        self._overrides[key] = entries

    def remove_override(self, override_id: str) -> None:
        for key, entries in list(self._overrides.items()):
            self._overrides[key] = [o for o in entries if o.override_id != override_id]

    def _override_for(self, event: UsageEvent) -> PriceOverride | None:
        entries = self._overrides.get((event.tenant_id, event.provider, event.model))
        if not entries:
            return None
        chosen = None
        for entry in entries:
            if entry.effective_from <= event.timestamp:
                chosen = entry
        return chosen

    # ---------------------------------------------------------------- base prices
    def _resolve(self, provider: str, model: str) -> _Resolved | str:
        key = (provider, model)
        found = self._models.get(key)
        if found is None:
            try:
                provider_info, model_info = self._snapshot.find_provider_model(model, None, provider, None)
                found = _Resolved(provider_info, model_info)
            except LookupError as exc:
                found = f"unknown model: {exc}"
            self._models[key] = found
        return found

    def _fast_rates(self, price: ModelPrice) -> _FastPrice | None:
        key = id(price)
        cached = self._fast.get(key)
        if cached is not None and cached[0] is price:
            return cached[1]
        values = {k: v for k, v in vars(price).items() if v is not None and not k.startswith("_")}
        # Rates for units a text-only event never carries (searches, audio, image, video, 1-hour cache
        # writes) do not change its cost; any other token rate needs genai-prices' own calculation.
        token_rates = {k for k in values if k.endswith("_mtok") and not _NOT_CARRIED.search(k)}
        simple = token_rates <= _FAST_KEYS and all(isinstance(values[k], Decimal | TieredPrices) for k in token_rates)
        if simple and "input_mtok" in values and "output_mtok" in values:
            rates = (
                values["input_mtok"],
                values["output_mtok"],
                values.get("cache_read_mtok"),
                values.get("cache_write_mtok"),
            )
            untiered = not any(isinstance(rate, TieredPrices) for rate in rates)
            fast: _FastPrice | None = _FastPrice(*rates, flat=TokenRates(*rates) if untiered else None)
        else:
            fast = None
        self._fast[key] = (price, fast)
        return fast

    def price(self, event: UsageEvent) -> PriceResult:
        override = self._override_for(event)
        if override is not None:
            input_cost, output_cost = override.rates.cost(event)
            return PriceResult("priced", input_cost, output_cost, f"override:{override.override_id}")
        resolved = self._resolve(event.provider, event.model)
        if isinstance(resolved, str):
            return PriceResult("unpriced", ZERO, ZERO, "none", resolved)
        model_price = resolved.model.get_prices(event.timestamp)
        source = f"genai-prices@{GENAI_PRICES_VERSION}:{resolved.provider.id}/{resolved.model.id}"
        has_media = event.input_audio_tokens or event.output_audio_tokens or event.input_image_tokens
        rates = None if has_media else self._fast_rates(model_price)
        if rates is not None:
            input_cost, output_cost = rates.at(event.input_tokens).cost(event)
            return PriceResult("priced", input_cost, output_cost, source)
        try:
            calc = model_price.calc_price(usage_of(event))
        except Exception as exc:  # a unit the price table cannot bill: surfaced, not $0
            return PriceResult("unpriced", ZERO, ZERO, source, f"cannot price usage: {exc}")
        return PriceResult("priced", calc["input_price"], calc["output_price"], source)


def usage_of(event: UsageEvent) -> Usage:
    """The event's token counts as a genai-prices Usage (same convention: input includes cache)."""
    fields: dict[str, int] = {
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_tokens": event.cache_write_tokens,
    }
    for name in ("input_audio_tokens", "output_audio_tokens", "input_image_tokens"):
        value = getattr(event, name)
        if value:
            fields[name] = value
    return Usage(**fields)


_ESTIMATE_BOOK: PriceBook | None = None


def estimate_cost(
    provider: str, model: str, input_tokens: int, max_output_tokens: int = 0, cache_read_tokens: int = 0
) -> Decimal | None:
    """The most a call can cost, before making it (for ``QuotaClient.reserve``): today's price of ``model``
    for the prompt's input tokens and the request's output cap. None for an unknown model."""
    from datetime import UTC

    global _ESTIMATE_BOOK
    if _ESTIMATE_BOOK is None:
        _ESTIMATE_BOOK = PriceBook()
    event = UsageEvent(
        event_id="estimate",
        timestamp=datetime.now(UTC),
        tenant_id="estimate",
        provider=provider,
        model=model,
        input_tokens=input_tokens,
        output_tokens=max_output_tokens,
        cache_read_tokens=cache_read_tokens,
    )
    price = _ESTIMATE_BOOK.price(event)
    return price.total_cost if price.status == "priced" else None
