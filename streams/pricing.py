"""Pricing: the cost of one usage event at its own timestamp, exact, in USD.

Base prices come from genai-prices (effective-dated: o3 cost $10/$40 per million tokens before June
2025 and $2/$8 after). Finding a model is the slow part (~100 µs in genai-prices), so a PriceBook
resolves each (provider, model) once and keeps the result; the per-event work is then choosing the
price in force at the event's time and a few Decimal multiplications (see ``tokenmeter bench``).

The price context. An event's ``service_tier`` and ``processing`` (``batch``) select genai-prices' price
variants (priority/flex tiers, Batch API prices) exactly as ``genai_prices.calc_price(...,
price_context={"service_tier": …, "processing": …})`` does: variants apply from their own start dates, only
to a provider's own models (not to those it serves through a fallback provider), and a tier without a
variant costs the standard price. The variant price of each (model, date range, variants) is made once.

Extra usage. 1-hour cache writes, reasoning, audio/image counts and ``usage_details`` (genai-prices usage
keys: output image tokens, web searches, modality splits…) are passed to genai-prices as they are. The fast
path (the four standard counts times cached rates) is taken only when it is certain to give genai-prices'
answer: when none of the event's extra keys can touch a unit the model prices (their dimensions conflict
with every priced unit beyond the standard four: a text/image split or a 5-minute cache write for a model
that prices only audio, 1-hour writes or searches). Otherwise genai-prices' own calculation prices the event.

Per-tenant overrides (custom per-token rates from a compacted config topic) win over the base price
from their ``effective_from`` on. An override replaces the model's whole price, whatever the price context:
its rates bill input (cache reads and writes at its cache rates; 1-hour writes are cache writes, the
modality and tool splits in ``usage_details`` parts of input or output), and output; tier and batch
variants do not apply, nor do per-request units (web searches and the other non-token keys of
``usage_details`` are not billed under an override). ``price_source`` then says ``override:<id>``.

Units genai-prices prices without a direction (web searches and other tool calls, per-request fees) are in
its total but in neither its input nor its output price; they count as input cost here, so that input +
output is the call's total in the ledger, the rollups and invoices alike.

An unknown model is never a silent $0: it yields ``PriceResult.status == "unpriced"`` with zero cost,
which the pipeline counts and alerts on.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import genai_prices
from genai_prices import Usage
from genai_prices.data_snapshot import get_snapshot
from genai_prices.data_units import unit_data
from genai_prices.types import ModelInfo, ModelPrice, Provider, TieredPrices
from genai_prices.units import UnitDef, UnitRegistry

from schemas.events import UsageEvent
from schemas.records import ZERO, PriceResult, TokenRates

GENAI_PRICES_VERSION = genai_prices.__version__
_UNITS = UnitRegistry(unit_data)
# The counts the fast path prices itself (every event reports them, zero or not).
_STANDARD_KEYS = frozenset({"input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"})
_NAMED_EXTRAS = (
    ("cache_write_1h_tokens", "cache_write_1h_tokens"),
    ("reasoning_tokens", "output_reasoning_tokens"),
    ("input_audio_tokens", "input_audio_tokens"),
    ("output_audio_tokens", "output_audio_tokens"),
    ("input_image_tokens", "input_image_tokens"),
)


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
    own: bool  # the provider lists the model itself: genai-prices applies the price context only then
    source: str  # the price_source of the events it prices (made once here, not per event)


class PriceBook:
    """Prices events; caches model resolution per (provider, model) and fast rates per price object."""

    def __init__(self, overrides: list[PriceOverride] | None = None) -> None:
        self._snapshot = get_snapshot()
        self._models: dict[tuple[str, str], _Resolved | str] = {}
        # Keyed by id() but holding the price object too, so an id can never be reused by another object.
        self._fast: dict[int, tuple[ModelPrice, _FastPrice | None]] = {}
        # (model, standard price, active variants) -> the price with the variants applied
        self._variants: dict[tuple[int, int, tuple[int, ...]], tuple[ModelInfo, ModelPrice, ModelPrice]] = {}
        # (price, an event's extra usage keys) -> whether the fast path prices them as genai-prices does
        self._extras_fast: dict[tuple[int, frozenset[str]], tuple[ModelPrice, bool]] = {}
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
                own = any(listed is model_info for listed in provider_info.models)
                source = f"genai-prices@{GENAI_PRICES_VERSION}:{provider_info.id}/{model_info.id}"
                found = _Resolved(provider_info, model_info, own, source)
            except LookupError as exc:
                found = f"unknown model: {exc}"
            self._models[key] = found
        return found

    def _model_price(self, resolved: _Resolved, event: UsageEvent) -> ModelPrice:
        """The price in force at the event's time, with the variants its tier and processing select."""
        model = resolved.model
        standard = model.get_prices(event.timestamp)
        tier, processing = event.service_tier, event.processing
        if (tier is None and processing is None) or not model.price_variants or not resolved.own:
            return standard
        context = {"service_tier": tier} if tier is not None else {}
        if processing is not None:
            context["processing"] = processing
        active = tuple(
            i
            for i, variant in enumerate(model.price_variants)
            if (variant.constraint is None or variant.constraint.active(event.timestamp))
            and all(context.get(name) == value for name, value in variant.when.items())
        )
        if not active:
            return standard
        key = (id(model), id(standard), active)
        cached = self._variants.get(key)
        if cached is not None and cached[0] is model and cached[1] is standard:
            return cached[2]
        price = model.get_prices(event.timestamp, context)
        self._variants[key] = (model, standard, price)
        return price

    def _fast_rates(self, price: ModelPrice) -> _FastPrice | None:
        key = id(price)
        cached = self._fast.get(key)
        if cached is not None and cached[0] is price:
            return cached[1]
        values = {k: v for k, v in vars(price).items() if v is not None and not k.startswith("_")}
        # Rates of other units do not change the cost of an event that reports none of them (genai-prices
        # bills them nothing); ``_extras_take_fast_path`` sends an event that does to genai-prices. Only a
        # per-request price applies to every call.
        simple = "requests_kcount" not in values and all(
            isinstance(values[k], Decimal | TieredPrices)
            for k in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
            if k in values
        )
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

    def _extras_take_fast_path(self, price: ModelPrice, extras: frozenset[str]) -> bool:
        """Whether genai-prices bills these extra usage keys nothing and raises nothing for ``price``: each
        key's dimensions conflict with every unit it prices beyond the standard four. A key that is a
        priced unit, or a part of one (a cache read of audio for a model pricing audio input), or that
        could combine with another into one (genai-prices then asks for the combined count), is not."""
        key = (id(price), extras)
        cached = self._extras_fast.get(key)
        if cached is not None and cached[0] is price:
            return cached[1]
        priced = [_unit_priced_by(name) for name, value in vars(price).items() if value is not None]
        others = [unit for unit in priced if unit is not None and unit.usage_key not in _STANDARD_KEYS]
        fast = all(not _UNITS.units[name].is_compatible_with(unit) for name in extras for unit in others)
        self._extras_fast[key] = (price, fast)
        return fast

    def price(self, event: UsageEvent) -> PriceResult:
        override = self._override_for(event)
        if override is not None:
            input_cost, output_cost = override.rates.cost(event)
            return PriceResult("priced", input_cost, output_cost, f"override:{override.override_id}")
        resolved = self._resolve(event.provider, event.model)
        if isinstance(resolved, str):
            return PriceResult("unpriced", ZERO, ZERO, "none", resolved)
        model_price = self._model_price(resolved, event)
        source = resolved.source
        rates = self._fast_rates(model_price)
        if rates is not None:
            extras = extra_usage_keys(event)
            if extras is None or self._extras_take_fast_path(model_price, extras):
                input_cost, output_cost = rates.at(event.input_tokens).cost(event)
                return PriceResult("priced", input_cost, output_cost, source)
        try:
            calc = model_price.calc_price(usage_of(event))
        except Exception as exc:  # a unit the price table cannot bill: surfaced, not $0
            return PriceResult("unpriced", ZERO, ZERO, source, f"cannot price usage: {exc}")
        # Units without a direction (web searches, per-request fees) are in genai-prices' total only; they
        # are part of making the request, so they count as input: input + output stays the total everywhere.
        undirected = calc["total_price"] - calc["input_price"] - calc["output_price"]
        return PriceResult("priced", calc["input_price"] + undirected, calc["output_price"], source)


def _unit_priced_by(price_key: str) -> UnitDef | None:
    try:
        return _UNITS.unit_for_price_key(price_key)
    except KeyError:  # not a unit genai-prices knows: it ignores the price too
        return None


def extra_usage_keys(event: UsageEvent) -> frozenset[str] | None:
    """The genai-prices usage keys the event reports beyond the standard four (non-zero ones: genai-prices
    treats a zero as absent), or None when there are none (most events: a few attribute reads)."""
    details = event.usage_details
    if not (
        details
        or event.reasoning_tokens
        or event.cache_write_1h_tokens
        or event.input_audio_tokens
        or event.output_audio_tokens
        or event.input_image_tokens
    ):
        return None
    keys = {key for key, value in details.items() if value}
    for field, key in _NAMED_EXTRAS:
        if getattr(event, field):
            keys.add(key)
    return frozenset(keys) if keys else None


def usage_of(event: UsageEvent) -> Usage:
    """The event's usage as a genai-prices Usage: the named counts under genai-prices' names (same convention:
    input includes cache, output includes reasoning) and ``usage_details`` as they are."""
    fields: dict[str, int] = {
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_tokens": event.cache_write_tokens,
    }
    for field, key in _NAMED_EXTRAS:
        value = getattr(event, field)
        if value:
            fields[key] = value
    for key, value in event.usage_details.items():
        if value:
            fields[key] = value
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
