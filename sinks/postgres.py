"""The Postgres sink: ledger rows and rollups, written in batches, idempotently.

One transaction per batch: COPY the batch into a temporary staging table, insert into the ledger
with ``ON CONFLICT (event_id) DO NOTHING``, and advance the rollups from exactly the rows that insert
returned. A replayed batch (a worker killed before it committed its Kafka offsets) inserts nothing
and so changes nothing: each distinct event_id is counted once, whatever Kafka redelivers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

import psycopg

from schemas.events import UsageEvent
from streams.pricing import PriceResult

SCALE = Decimal("1e-12")  # the ledger's numeric(38, 12) and the wire's Avro decimal scale 12


def money(value: Decimal) -> Decimal:
    """Round to 12 places as Postgres ``numeric(38, 12)`` does (half away from zero)."""
    return value.quantize(SCALE, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class PricedEvent:
    event: UsageEvent
    price: PriceResult


_COLUMNS = (
    "event_id", "ts", "tenant_id", "provider", "model", "user_id", "feature", "environment", "trace_id",
    "session_id", "team_id", "request_id", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "latency_ms", "status", "estimated", "tags", "price_status",
    "input_cost", "output_cost", "total_cost", "price_source",
)  # fmt: skip
_COLUMN_LIST = ", ".join(_COLUMNS)

GRANULARITIES = ("minute", "hour", "day", "week", "month")
DIMENSIONS = ("tenant", "feature", "model", "user", "environment")
# Dimension values: '' for the tenant itself and for events without that attribute.
_WINDOWS_AND_DIMENSIONS = """
CROSS JOIN (VALUES ('minute'), ('hour'), ('day'), ('week'), ('month')) AS g(granularity)
CROSS JOIN LATERAL (VALUES
    ('tenant', ''),
    ('feature', coalesce({src}.feature, '')),
    ('model', {src}.provider || '/' || {src}.model),
    ('user', coalesce({src}.user_id, '')),
    ('environment', coalesce({src}.environment, ''))
) AS d(dimension, value)
"""
_ROLLUP_COLUMNS = (
    "r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value, r.calls, r.unpriced_calls,"
    " r.input_tokens, r.output_tokens, r.cache_read_tokens, r.cache_write_tokens, r.input_cost, r.output_cost, r.cost"
)


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


@dataclass(frozen=True)
class BatchResult:
    inserted: int  # ledger rows that were new; the rest were duplicates
    rollups: list[Rollup]  # every window the batch touched, with its totals after the batch


_ADVANCE_ROLLUPS = f"""
WITH new AS (
    INSERT INTO tokenmeter.ledger ({_COLUMN_LIST})
    SELECT DISTINCT ON (event_id) {_COLUMN_LIST} FROM ledger_staging
    ON CONFLICT (event_id) DO NOTHING
    RETURNING *
), rolled AS (
INSERT INTO tokenmeter.rollups AS r
SELECT new.tenant_id, g.granularity,
       date_trunc(g.granularity, new.ts, 'UTC') AS window_start,
       d.dimension, d.value,
       count(*), count(*) FILTER (WHERE new.price_status = 'unpriced'),
       sum(new.input_tokens), sum(new.output_tokens), sum(new.cache_read_tokens), sum(new.cache_write_tokens),
       sum(new.input_cost), sum(new.output_cost), sum(new.total_cost)
FROM new
{_WINDOWS_AND_DIMENSIONS.format(src="new")}
GROUP BY 1, 2, 3, 4, 5
ON CONFLICT (tenant_id, granularity, window_start, dimension, dimension_value) DO UPDATE SET
    calls = r.calls + excluded.calls,
    unpriced_calls = r.unpriced_calls + excluded.unpriced_calls,
    input_tokens = r.input_tokens + excluded.input_tokens,
    output_tokens = r.output_tokens + excluded.output_tokens,
    cache_read_tokens = r.cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = r.cache_write_tokens + excluded.cache_write_tokens,
    input_cost = r.input_cost + excluded.input_cost,
    output_cost = r.output_cost + excluded.output_cost,
    cost = r.cost + excluded.cost
RETURNING 1
)
SELECT count(*) FROM new
"""

# Every rollup the batch's events belong to (duplicates included), read back after the update: the
# absolute values the Redis sink and the worker's tables mirror. Reading them even when nothing was
# new repairs a mirror left stale by a worker killed between the Postgres commit and its own write.
_TOUCHED_ROLLUPS = f"""
SELECT {_ROLLUP_COLUMNS} FROM tokenmeter.rollups AS r
JOIN (SELECT DISTINCT staging.tenant_id, g.granularity,
             date_trunc(g.granularity, staging.ts, 'UTC') AS window_start, d.dimension, d.value
      FROM ledger_staging AS staging
      {_WINDOWS_AND_DIMENSIONS.format(src="staging")}) AS k
  ON (r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value)
   = (k.tenant_id, k.granularity, k.window_start, k.dimension, k.value)
"""


def _row(item: PricedEvent) -> tuple[object, ...]:
    e, p = item.event, item.price
    return (
        e.event_id, e.timestamp, e.tenant_id, e.provider, e.model, e.user_id, e.feature, e.environment, e.trace_id,
        e.session_id, e.team_id, e.request_id, e.input_tokens, e.output_tokens, e.cache_read_tokens,
        e.cache_write_tokens, e.reasoning_tokens, e.latency_ms, e.status, e.estimated, json.dumps(e.tags),
        p.status, p.input_cost, p.output_cost, p.total_cost, p.source,
    )  # fmt: skip


def write_batch(conn: psycopg.Connection, batch: Sequence[PricedEvent]) -> BatchResult:
    """Write a batch in one transaction; return the new-row count and the touched rollups' totals."""
    if not batch:
        return BatchResult(0, [])
    with conn.transaction():
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ledger_staging"
            " (LIKE tokenmeter.ledger INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        with conn.cursor().copy(f"COPY ledger_staging ({_COLUMN_LIST}) FROM STDIN") as copy:
            for item in batch:
                copy.write_row(_row(item))
        inserted = conn.execute(_ADVANCE_ROLLUPS).fetchone()
        rollups = [Rollup(*row) for row in conn.execute(_TOUCHED_ROLLUPS)]
    return BatchResult(int(inserted[0]) if inserted else 0, rollups)


MTOK = Decimal(1_000_000)


@dataclass(frozen=True)
class RateCard:
    """How a tenant is billed. ``rates``: "provider/model" → USD per million tokens of each kind
    (``input_mtok``, ``output_mtok``, optional ``cache_read_mtok`` / ``cache_write_mtok``, which
    default to the input rate); used in ``custom`` mode, other models are billed at cost."""

    tenant_id: str
    mode: str = "pass_through"  # pass_through | cost_plus | custom
    markup_percent: Decimal = Decimal(0)
    rates: dict[str, dict[str, Decimal]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("pass_through", "cost_plus", "custom"):
            raise ValueError("mode must be pass_through, cost_plus or custom")
        if self.markup_percent < 0:
            raise ValueError("the markup cannot be negative")
        for model, rates in self.rates.items():
            if "input_mtok" not in rates or "output_mtok" not in rates:
                raise ValueError(f"{model}: input_mtok and output_mtok are required")


def set_rate_card(conn: psycopg.Connection, card: RateCard) -> None:
    rates = {m: {k: str(v) for k, v in r.items()} for m, r in card.rates.items()}
    conn.execute(
        "INSERT INTO tokenmeter.rate_cards (tenant_id, mode, markup_percent, rates) VALUES (%s, %s, %s, %s)"
        " ON CONFLICT (tenant_id) DO UPDATE SET mode = excluded.mode, markup_percent = excluded.markup_percent,"
        " rates = excluded.rates, updated_at = now()",
        (card.tenant_id, card.mode, card.markup_percent, json.dumps(rates)),
    )


def rate_card(conn: psycopg.Connection, tenant_id: str) -> RateCard:
    row = conn.execute("SELECT mode, markup_percent, rates FROM tokenmeter.rate_cards WHERE tenant_id = %s",
                       (tenant_id,)).fetchone()  # fmt: skip
    if row is None:
        return RateCard(tenant_id)
    rates = {m: {k: Decimal(v) for k, v in r.items()} for m, r in row[2].items()}
    return RateCard(tenant_id, row[0], row[1], rates)


@dataclass(frozen=True)
class InvoiceItem:
    kind: str  # input (incl. cache, at cost), output, or with custom rates: input_uncached, cache_read, cache_write
    quantity: int  # tokens
    unit_price_mtok: Decimal | None  # USD per million tokens, when the card sets one
    amount: Decimal


@dataclass(frozen=True)
class InvoiceLine:
    provider_model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost: Decimal  # what the calls cost us (pass-through)
    amount: Decimal  # what the tenant is billed under its rate card
    items: list[InvoiceItem]


def bill_line(card: RateCard, model: str, tokens: tuple[int, int, int, int], costs: tuple[Decimal, Decimal],
              ) -> tuple[Decimal, list[InvoiceItem]]:  # fmt: skip
    """Apply a rate card to one model's month: tokens (input, output, cache read, cache write) and
    pass-through costs (input, output). Exact: no rounding."""
    input_tokens, output_tokens, cache_read, cache_write = tokens
    input_cost, output_cost = costs
    rates = card.rates.get(model) if card.mode == "custom" else None
    if rates is not None:
        read_rate = rates.get("cache_read_mtok", rates["input_mtok"])
        write_rate = rates.get("cache_write_mtok", rates["input_mtok"])
        uncached = input_tokens - cache_read - cache_write
        kinds = [("input_uncached", uncached, rates["input_mtok"]), ("cache_read", cache_read, read_rate),
                 ("cache_write", cache_write, write_rate), ("output", output_tokens, rates["output_mtok"])]  # fmt: skip
        items = [InvoiceItem(kind, n, rate, rate * n / MTOK) for kind, n, rate in kinds if n]
        return sum((i.amount for i in items), Decimal(0)), items
    factor = 1 + card.markup_percent / 100 if card.mode == "cost_plus" else Decimal(1)
    items = [InvoiceItem("input", input_tokens, None, input_cost * factor),
             InvoiceItem("output", output_tokens, None, output_cost * factor)]  # fmt: skip
    return (input_cost + output_cost) * factor, items


@dataclass(frozen=True)
class Invoice:
    tenant_id: str
    period: str
    currency: str
    lines: list[InvoiceLine]
    total: Decimal
    calls: int
    unpriced_calls: int
    rate_card: RateCard


def invoice(conn: psycopg.Connection, tenant_id: str, period: str) -> Invoice:
    """A tenant's invoice for a UTC calendar month ``YYYY-MM`` from the month rollups, under its rate card."""
    card = rate_card(conn, tenant_id)
    rows = conn.execute(
        "SELECT dimension_value, calls, unpriced_calls, input_tokens, output_tokens, cache_read_tokens,"
        " cache_write_tokens, cost, input_cost, output_cost FROM tokenmeter.rollups"
        " WHERE tenant_id = %s AND granularity = 'month' AND dimension = 'model'"
        " AND window_start = (%s || '-01')::timestamp AT TIME ZONE 'UTC' ORDER BY cost DESC, dimension_value",
        (tenant_id, period),
    ).fetchall()
    lines = []
    for r in rows:
        amount, items = bill_line(card, r[0], (r[3], r[4], r[5], r[6]), (r[8], r[9]))
        lines.append(InvoiceLine(r[0], r[1], r[3], r[4], r[5], r[6], r[7], amount, items))
    return Invoice(
        tenant_id=tenant_id,
        period=period,
        currency="USD",
        lines=lines,
        total=sum((line.amount for line in lines), Decimal(0)),
        calls=sum(r[1] for r in rows),
        unpriced_calls=sum(r[2] for r in rows),
        rate_card=card,
    )
