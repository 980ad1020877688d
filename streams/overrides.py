"""Per-tenant price overrides from the compacted ``config.price-overrides`` topic.

Each message: key = override id, value = JSON ``{"tenant_id", "provider", "model", "effective_from",
"input_mtok", "output_mtok", "cache_read_mtok"?, "cache_write_mtok"?}`` (USD per million tokens as
decimal strings); a null value (tombstone) removes the override. Every worker follows the whole topic
(``streams/config_topic.py``), so all of them price alike.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

from deploy.settings import Settings, kafka_config
from schemas.events import MAX_ID_LEN, MAX_LABEL_LEN, printable_problem
from schemas.records import TokenRates
from streams.config_topic import ConfigFollower, config_amount, config_text
from streams.pricing import PriceBook, PriceOverride

# USD per million tokens. A dollar a token is orders of magnitude above any model's price; a rate
# beyond it is a typo, and would bill absurd sums.
MAX_RATE = Decimal(1_000_000)


def parse_override(override_id: str, value: bytes) -> PriceOverride:
    """Validate one ``config.price-overrides`` record; ValueError says what is wrong with it."""
    if not override_id or printable_problem(override_id) is not None:
        raise ValueError(f"override id {override_id!r} must be non-empty printable text")
    try:
        data: Any = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"an override is a JSON object, got {type(data).__name__}")
    raw_from = data.get("effective_from")
    if not isinstance(raw_from, str):
        raise ValueError("effective_from must be an ISO 8601 string with a time zone")
    try:
        effective_from = datetime.fromisoformat(raw_from)
    except ValueError:
        raise ValueError(f"effective_from: {raw_from[:40]!r} is not an ISO 8601 timestamp") from None
    if effective_from.tzinfo is None:
        raise ValueError("effective_from needs a time zone")

    def rate(name: str) -> Decimal | None:
        raw = data.get(name)
        return None if raw is None else config_amount(raw, name, positive=False, below=MAX_RATE)

    input_rate, output_rate = rate("input_mtok"), rate("output_mtok")
    if input_rate is None or output_rate is None:
        raise ValueError("input_mtok and output_mtok are required")
    return PriceOverride(
        tenant_id=config_text(data, "tenant_id", max_len=MAX_ID_LEN),
        provider=config_text(data, "provider", max_len=MAX_LABEL_LEN),
        model=config_text(data, "model", max_len=MAX_LABEL_LEN),
        effective_from=effective_from,
        rates=TokenRates(input_rate, output_rate, rate("cache_read_mtok"), rate("cache_write_mtok")),
        override_id=override_id,
    )


def override_message(override: PriceOverride) -> tuple[bytes, bytes]:
    r = override.rates
    body = {
        "tenant_id": override.tenant_id,
        "provider": override.provider,
        "model": override.model,
        "effective_from": override.effective_from.isoformat(),
        "input_mtok": str(r.input_mtok),
        "output_mtok": str(r.output_mtok),
        "cache_read_mtok": None if r.cache_read_mtok is None else str(r.cache_read_mtok),
        "cache_write_mtok": None if r.cache_write_mtok is None else str(r.cache_write_mtok),
    }
    return override.override_id.encode(), json.dumps(body).encode()


def override_follower(settings: Settings, book: PriceBook) -> ConfigFollower:
    """Keeps ``book``'s overrides equal to the topic's."""

    def apply(key: str, value: bytes | None) -> None:
        if value is None:
            book.remove_override(key)
        else:
            book.set_override(parse_override(key, value))

    return ConfigFollower(kafka_config(settings), settings.topic_price_overrides, apply)
