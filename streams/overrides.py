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

from deploy.settings import Settings
from streams.config_topic import ConfigFollower
from streams.pricing import PriceBook, PriceOverride, TokenRates


def parse_override(override_id: str, value: bytes) -> PriceOverride:
    data: dict[str, Any] = json.loads(value)
    effective_from = datetime.fromisoformat(data["effective_from"])
    if effective_from.tzinfo is None:
        raise ValueError("effective_from needs a time zone")

    def rate(name: str) -> Decimal | None:
        raw = data.get(name)
        return None if raw is None else Decimal(str(raw))

    input_rate, output_rate = rate("input_mtok"), rate("output_mtok")
    if input_rate is None or output_rate is None:
        raise ValueError("input_mtok and output_mtok are required")
    return PriceOverride(
        tenant_id=data["tenant_id"],
        provider=data["provider"],
        model=data["model"],
        effective_from=effective_from,
        rates=TokenRates(input_rate, output_rate, rate("cache_read_mtok"), rate("cache_write_mtok")),
        override_id=override_id,
    )


def override_message(override: PriceOverride) -> tuple[bytes, bytes]:
    r = override.rates
    body = {
        "tenant_id": override.tenant_id, "provider": override.provider, "model": override.model,
        "effective_from": override.effective_from.isoformat(), "input_mtok": str(r.input_mtok),
        "output_mtok": str(r.output_mtok),
        "cache_read_mtok": None if r.cache_read_mtok is None else str(r.cache_read_mtok),
        "cache_write_mtok": None if r.cache_write_mtok is None else str(r.cache_write_mtok),
    }  # fmt: skip
    return override.override_id.encode(), json.dumps(body).encode()


def override_follower(settings: Settings, book: PriceBook) -> ConfigFollower:
    """Keeps ``book``'s overrides equal to the topic's."""

    def apply(key: str, value: bytes | None) -> None:
        if value is None:
            book.remove_override(key)
        else:
            book.set_override(parse_override(key, value))

    return ConfigFollower(settings.kafka_bootstrap, settings.topic_price_overrides, apply)
