"""The typed records the stages pass to each other, with their Avro mappings next to them.

One definition each, at the bottom of the package layering (``schemas`` ← ``producers``, ``sinks`` ←
``streams`` ← ``deploy``), so sinks and streams import these and never each other:

- ``PriceResult`` — what pricing says about one event (``streams.pricing``);
- ``PricedEvent`` — an event and its price: a ledger row (``sinks.postgres``) and a ``usage.priced``
  message (``to_avro``);
- ``Rollup`` — the absolute totals of one window of one scope: a ``tokenmeter.rollups`` row, a Redis
  spend value (``sinks.redis``), an element of a ``metering.rollups`` message (``to_avro``/``from_avro``);
- ``Alert`` — a budget or anomaly alert: a ``tokenmeter.alerts`` row and an alert-topic message;
- ``TokenRates`` — custom per-token rates (price overrides, rate cards on invoices);
- ``money()`` and ``scope_label()``: the rounding of stored amounts and how a scope is named to people.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal, NamedTuple

from schemas.events import UsageEvent

MTOK = Decimal(1_000_000)  # prices are quoted in USD per million tokens
SCALE = Decimal("1e-12")  # the ledger's numeric(38, 12) and the wire's Avro decimal scale 12
ZERO = Decimal(0)


def money(value: Decimal) -> Decimal:
    """Round to 12 places as Postgres ``numeric(38, 12)`` does (half away from zero)."""
    return value.quantize(SCALE, rounding=ROUND_HALF_UP)


def scope_label(tenant_id: str, dimension: str, value: str) -> str:
    """A scope as people read it: ``acme`` for the tenant itself, else ``acme/feature=search``."""
    return tenant_id if dimension == "tenant" else f"{tenant_id}/{dimension}={value}"


# ---------------------------------------------------------------- prices
@dataclass(frozen=True)
class TokenRates:
    """USD per million tokens of each kind. Cache rates default to the input rate when absent."""

    input_mtok: Decimal
    output_mtok: Decimal
    cache_read_mtok: Decimal | None = None
    cache_write_mtok: Decimal | None = None

    def lines(
        self, input_tokens: int, output_tokens: int, cache_read_tokens: int, cache_write_tokens: int
    ) -> list[tuple[str, int, Decimal, Decimal]]:
        """(kind, tokens, rate per million, exact amount) for uncached input, cache reads, cache writes
        and output. ``input_tokens`` includes the cached ones (the event contract's convention)."""
        read_rate = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        write_rate = self.input_mtok if self.cache_write_mtok is None else self.cache_write_mtok
        kinds = (
            ("input_uncached", input_tokens - cache_read_tokens - cache_write_tokens, self.input_mtok),
            ("cache_read", cache_read_tokens, read_rate),
            ("cache_write", cache_write_tokens, write_rate),
            ("output", output_tokens, self.output_mtok),
        )
        return [(kind, tokens, rate, rate * tokens / MTOK) for kind, tokens, rate in kinds]

    def cost(self, event: UsageEvent) -> tuple[Decimal, Decimal]:
        """(input cost incl. cache, output cost) of one event; exact, equal to the sums of ``lines``
        (written out: this runs for every event)."""
        read, write = event.cache_read_tokens, event.cache_write_tokens
        read_rate = self.input_mtok if self.cache_read_mtok is None else self.cache_read_mtok
        write_rate = self.input_mtok if self.cache_write_mtok is None else self.cache_write_mtok
        uncached = event.input_tokens - read - write
        input_cost = (self.input_mtok * uncached + read_rate * read + write_rate * write) / MTOK
        return input_cost, self.output_mtok * event.output_tokens / MTOK


class PriceResult(NamedTuple):
    """What pricing says about one event (a named tuple: two of these are made per event)."""

    status: Literal["priced", "unpriced"]
    input_cost: Decimal
    output_cost: Decimal
    source: str
    reason: str = ""

    @property
    def total_cost(self) -> Decimal:
        return self.input_cost + self.output_cost


class PricedEvent(NamedTuple):
    event: UsageEvent
    price: PriceResult
    usage_avro: bytes | None = None  # the event's Avro encoding as received, when it can be reused as is

    def price_fields(self) -> dict[str, Any]:
        """The ``priced_event`` fields after ``usage``."""
        p = self.price
        return {
            "price_status": p.status,
            "input_cost": money(p.input_cost),
            "output_cost": money(p.output_cost),
            "total_cost": money(p.total_cost),
            "price_source": p.source,
            "currency": "USD",
        }

    def to_avro(self) -> dict[str, Any]:
        """A ``priced_event`` record (``usage.priced``)."""
        return {"usage": self.event.model_dump(), **self.price_fields()}


# ---------------------------------------------------------------- windows
@dataclass(frozen=True)
class Rollup:
    """Absolute totals of one window of one scope (``tokenmeter.rollups`` row)."""

    tenant_id: str
    granularity: str
    window_start: datetime
    dimension: str
    dimension_value: str
    calls: int
    unpriced_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    input_cost: Decimal
    output_cost: Decimal
    cost: Decimal
    time_zone: str = "UTC"  # the tenant's: day, week and month windows start at its midnight

    @property
    def scope_label(self) -> str:
        return scope_label(self.tenant_id, self.dimension, self.dimension_value)

    def to_avro(self) -> dict[str, Any]:
        """An element of a ``rollup_batch`` message (``metering.rollups``); the zone travels once per message."""
        return {
            "tenant_id": self.tenant_id,
            "dimension": self.dimension,
            "dimension_value": self.dimension_value,
            "granularity": self.granularity,
            "window_start": self.window_start,
            "calls": self.calls,
            "unpriced_calls": self.unpriced_calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cost": self.cost,
        }

    @classmethod
    def from_avro(cls, record: dict[str, Any], time_zone: str = "UTC") -> Rollup:
        """The inverse of ``to_avro`` (the input/output split of the cost does not travel: zero)."""
        return cls(
            tenant_id=record["tenant_id"],
            granularity=record["granularity"],
            window_start=record["window_start"],
            dimension=record["dimension"],
            dimension_value=record["dimension_value"],
            calls=record["calls"],
            unpriced_calls=record["unpriced_calls"],
            input_tokens=record["input_tokens"],
            output_tokens=record["output_tokens"],
            cache_read_tokens=record["cache_read_tokens"],
            cache_write_tokens=record["cache_write_tokens"],
            input_cost=ZERO,
            output_cost=ZERO,
            cost=record["cost"],
            time_zone=time_zone,
        )


# ---------------------------------------------------------------- alerts
@dataclass(frozen=True, kw_only=True)
class Alert:
    """A budget or anomaly alert (``alert.v1.avsc``). ``alert_id`` is deterministic: the same crossing
    always gets the same id, which is what makes storing and delivering it idempotent."""

    alert_id: str
    kind: str  # budget.threshold, budget.blocked, budget.overrun_during_outage, anomaly.<rule>
    tenant_id: str
    scope: dict[str, str]  # what the alert is about: {"dimension": …, "value": …}, {"model": …}, …
    period: str
    threshold_percent: int | None = None
    current: Decimal = ZERO
    baseline: Decimal | None = None
    limit: Decimal | None = None
    message: str
    details: dict[str, str] = field(default_factory=dict)
    created_at: datetime

    @property
    def is_budget(self) -> bool:
        return self.kind.startswith("budget")

    def to_avro(self) -> dict[str, Any]:
        return asdict(self)


ALERT_FIELDS = tuple(f.name for f in fields(Alert))
