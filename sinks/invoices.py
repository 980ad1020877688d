"""Invoices: a tenant's month under its rate card, finalization, and late usage as adjustments.

An open invoice is computed from the month rollups (in the tenant's time zone) whenever it is asked
for. ``finalize`` freezes it: the usage it billed per model and the rate card are stored, and from
then on the invoice reads back exactly as frozen. Usage that reaches a finalized month afterwards
(late events) never changes that invoice: it is the month's rollups minus everything billed for it
so far, and appears as an adjustment line on the tenant's next open invoice (DESIGN.md §4.3).
Money is exact: no rounding anywhere here (``total_rounded`` in the JSON is the one, documented rounding).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from schemas.currencies import (
    USAGE_CURRENCY,
    FxRate,
    currency_code,
    exact_sum,
    round_to_minor_units,
)
from schemas.periods import local_midnight
from schemas.records import TokenRates
from sinks.credits import CreditApplied, freeze_credits, frozen_credits, month_bounds, open_invoice_credits
from sinks.fx import rate_for_month
from sinks.postgres import tenant_time_zone

_PERIOD = re.compile(r"\d{4}-(0[1-9]|1[0-2])")


class InvoiceError(ValueError):
    pass


@dataclass(frozen=True)
class RateCard:
    """How a tenant is billed. ``rates``: "provider/model" → USD per million tokens of each kind
    (``input_mtok``, ``output_mtok``, optional ``cache_read_mtok`` / ``cache_write_mtok``, which
    default to the input rate); used in ``custom`` mode, other models are billed at cost."""

    tenant_id: str
    mode: str = "pass_through"  # pass_through | cost_plus | custom
    markup_percent: Decimal = Decimal(0)
    rates: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    currency: str = USAGE_CURRENCY  # what invoices bill in (ISO 4217), converted from USD (schemas/currencies.py)

    def __post_init__(self) -> None:
        if self.mode not in ("pass_through", "cost_plus", "custom"):
            raise ValueError("mode must be pass_through, cost_plus or custom")
        if currency_code(self.currency) != self.currency:
            raise ValueError(f"the currency is an upper-case ISO 4217 code, got {self.currency!r}")
        if self.markup_percent < 0:
            raise ValueError("the markup cannot be negative")
        for model, rates in self.rates.items():
            if "input_mtok" not in rates or "output_mtok" not in rates:
                raise ValueError(f"{model}: input_mtok and output_mtok are required")

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "markup_percent": str(self.markup_percent),
            "rates": {m: {k: str(v) for k, v in r.items()} for m, r in self.rates.items()},
            "currency": self.currency,
        }

    @classmethod
    def from_json(cls, tenant_id: str, data: dict[str, Any]) -> RateCard:
        rates = {m: {k: Decimal(v) for k, v in r.items()} for m, r in data.get("rates", {}).items()}
        currency = data.get("currency", USAGE_CURRENCY)  # cards frozen before currencies are USD
        return cls(tenant_id, data["mode"], Decimal(data["markup_percent"]), rates, currency)


def set_rate_card(conn: psycopg.Connection, card: RateCard) -> None:
    conn.execute(
        "INSERT INTO tokenmeter.rate_cards (tenant_id, mode, markup_percent, rates, currency)"
        " VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id) DO UPDATE SET mode = excluded.mode, markup_percent = excluded.markup_percent,"
        " rates = excluded.rates, currency = excluded.currency, updated_at = now()",
        (card.tenant_id, card.mode, card.markup_percent, json.dumps(card.as_json()["rates"]), card.currency),
    )


def rate_card(conn: psycopg.Connection, tenant_id: str) -> RateCard:
    row = conn.execute(
        "SELECT mode, markup_percent, rates, currency FROM tokenmeter.rate_cards WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    if row is None:
        return RateCard(tenant_id)
    try:
        return RateCard.from_json(
            tenant_id, {"mode": row[0], "markup_percent": str(row[1]), "rates": row[2], "currency": row[3]}
        )
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # Written by hand past `ratecard set` (the table only checks the shape): one clear line, no traceback.
        raise InvoiceError(
            f"the rate card of {tenant_id} is invalid ({exc}); replace it, e.g.:"
            f" tokenmeter ratecard set --tenant {tenant_id} --pass-through --currency USD"
        ) from None


@dataclass(frozen=True)
class Usage:
    """One model's usage in one month: what an invoice line bills."""

    provider_model: str
    calls: int = 0
    unpriced_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    input_cost: Decimal = Decimal(0)
    output_cost: Decimal = Decimal(0)
    cost: Decimal = Decimal(0)

    def minus(self, other: Usage) -> Usage:
        values = [getattr(self, f.name) - getattr(other, f.name) for f in fields(self)[1:]]
        return Usage(self.provider_model, *values)

    @property
    def empty(self) -> bool:
        return all(not getattr(self, f.name) for f in fields(self)[1:])


@dataclass(frozen=True)
class InvoiceItem:
    kind: str  # input (incl. cache, at cost), output, or with custom rates: input_uncached, cache_read, cache_write
    quantity: int  # tokens
    unit_price_mtok: Decimal | None  # USD per million tokens, when the card sets one
    amount: Decimal  # in the invoice's currency
    amount_usd: Decimal | None = None  # before conversion; set on every invoice returned (in_currency)


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
    usage_period: str  # the month the usage happened in; earlier than the invoice's for an adjustment
    unpriced_calls: int = 0
    input_cost: Decimal = Decimal(0)
    output_cost: Decimal = Decimal(0)
    amount_usd: Decimal | None = None  # ``amount`` before conversion; set on every invoice returned (in_currency)


def in_currency(lines: list[InvoiceLine], fx: FxRate | None) -> list[InvoiceLine]:
    """Lines billed in USD (``bill_line``) converted with ``fx`` (None: a USD invoice), every amount
    exactly; the USD amounts stay alongside in ``amount_usd``."""

    def convert(amount: Decimal) -> Decimal:
        return amount if fx is None else fx.convert(amount)

    return [
        replace(
            line,
            amount=convert(line.amount),
            amount_usd=line.amount,
            items=[replace(i, amount=convert(i.amount), amount_usd=i.amount) for i in line.items],
        )
        for line in lines
    ]


def billing_rate(conn: psycopg.Connection, tenant_id: str, currency: str, period: str) -> FxRate | None:
    """The USD → ``currency`` rate of the month's invoice (None for USD); InvoiceError, with the
    command that fixes it, when no rate is in effect: a missing rate is never taken as 1."""
    if currency == USAGE_CURRENCY:
        return None
    fx = rate_for_month(conn, currency, period)
    if fx is None:
        raise InvoiceError(
            f"{tenant_id} is billed in {currency} and no {USAGE_CURRENCY} to {currency} rate is effective on or"
            f" before {period}-01; enter one: tokenmeter fx set --from {USAGE_CURRENCY} --to {currency}"
            f" --rate RATE --effective {period}-01 --source SOURCE"
        )
    return fx


def bill_line(
    card: RateCard,
    model: str,
    tokens: tuple[int, int, int, int],
    costs: tuple[Decimal, Decimal],
) -> tuple[Decimal, list[InvoiceItem]]:
    """Apply a rate card to one model's month: tokens (input, output, cache read, cache write) and
    pass-through costs (input, output). Exact: no rounding. Linear, so it bills adjustments too."""
    input_tokens, output_tokens, cache_read, cache_write = tokens
    input_cost, output_cost = costs
    rates = card.rates.get(model) if card.mode == "custom" else None
    if rates is not None:
        card_rates = TokenRates(
            rates["input_mtok"], rates["output_mtok"], rates.get("cache_read_mtok"), rates.get("cache_write_mtok")
        )
        lines = card_rates.lines(input_tokens, output_tokens, cache_read, cache_write)
        items = [InvoiceItem(kind, n, rate, amount) for kind, n, rate, amount in lines if n]
        return sum((i.amount for i in items), Decimal(0)), items
    factor = 1 + card.markup_percent / 100 if card.mode == "cost_plus" else Decimal(1)
    items = [
        InvoiceItem("input", input_tokens, None, input_cost * factor),
        InvoiceItem("output", output_tokens, None, output_cost * factor),
    ]
    return (input_cost + output_cost) * factor, items


def _line(card: RateCard, usage: Usage, usage_period: str) -> InvoiceLine:
    u = usage
    amount, items = bill_line(
        card,
        u.provider_model,
        (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens),
        (u.input_cost, u.output_cost),
    )
    return InvoiceLine(
        u.provider_model,
        u.calls,
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.cost,
        amount,
        items,
        usage_period,
        u.unpriced_calls,
        u.input_cost,
        u.output_cost,
    )


@dataclass(frozen=True)
class Invoice:
    tenant_id: str
    period: str
    currency: str
    lines: list[InvoiceLine]  # this month's usage per model
    adjustments: list[InvoiceLine]  # late usage of earlier, finalized months
    rate_card: RateCard
    time_zone: str
    status: str  # open | finalized
    finalized_at: datetime | None = None
    fx: FxRate | None = None  # the USD → currency rate the amounts were converted with; None for USD
    credits: list[CreditApplied] = field(default_factory=list)  # prepaid credits for the billed usage (USD)

    @property
    def total(self) -> Decimal:
        """In the invoice's currency, exact."""
        return exact_sum(line.amount for line in self.lines + self.adjustments)

    @property
    def total_usd(self) -> Decimal:
        lines = self.lines + self.adjustments
        return exact_sum(line.amount if line.amount_usd is None else line.amount_usd for line in lines)

    @property
    def credits_applied(self) -> Decimal:
        """Prepaid credits drawn by the usage this invoice bills, its adjustments included
        (``sinks.credits.open_invoice_credits``), in the invoice's currency."""
        return self.to_currency(sum((c.applied for c in self.credits), Decimal(0)))

    @property
    def amount_due(self) -> Decimal:
        """The total less the credits applied, never below zero (credits are drawn by metered spend, which a
        custom rate card may bill for less)."""
        return max(self.total - self.credits_applied, Decimal(0))

    def to_currency(self, amount_usd: Decimal) -> Decimal:
        """A USD amount in this invoice's currency, at its rate, exactly."""
        return amount_usd if self.fx is None else self.fx.convert(amount_usd)

    @property
    def calls(self) -> int:
        return sum(line.calls for line in self.lines + self.adjustments)

    @property
    def unpriced_calls(self) -> int:
        return sum(line.unpriced_calls for line in self.lines + self.adjustments)

    def as_json(self) -> dict[str, Any]:
        """The invoice for downstream billing (DESIGN.md §5: tenant_id, period, currency, lines, total,
        calls, unpriced_calls); amounts are exact decimal strings."""

        def line_json(line: InvoiceLine) -> dict[str, Any]:
            return {
                "provider_model": line.provider_model,
                "usage_period": line.usage_period,
                "calls": line.calls,
                "unpriced_calls": line.unpriced_calls,
                "input_tokens": line.input_tokens,
                "output_tokens": line.output_tokens,
                "cache_read_tokens": line.cache_read_tokens,
                "cache_write_tokens": line.cache_write_tokens,
                "cost": str(line.cost),
                "amount": str(line.amount),
                "amount_usd": str(line.amount if line.amount_usd is None else line.amount_usd),
                "items": [
                    {
                        "kind": i.kind,
                        "quantity": i.quantity,
                        "amount": str(i.amount),
                        "amount_usd": str(i.amount if i.amount_usd is None else i.amount_usd),
                        "unit_price_mtok": None if i.unit_price_mtok is None else str(i.unit_price_mtok),
                    }
                    for i in line.items
                ],
            }

        return {
            "tenant_id": self.tenant_id,
            "period": self.period,
            "currency": self.currency,
            "status": self.status,
            "finalized_at": self.finalized_at.isoformat() if self.finalized_at else None,
            "time_zone": self.time_zone,
            "lines": [line_json(x) for x in self.lines],
            "adjustments": [line_json(x) for x in self.adjustments],
            "total": str(self.total),
            # Currencies (schemas/currencies.py): the one rounding, of the total to the currency's minor units.
            "total_rounded": str(round_to_minor_units(self.total, self.currency)),
            "total_usd": str(self.total_usd),
            "fx": None if self.fx is None else self.fx.as_json(),
            "calls": self.calls,
            "unpriced_calls": self.unpriced_calls,
            "rate_card": self.rate_card.as_json(),
            "credits": [
                {**c.as_json(), "applied": str(self.to_currency(c.applied)), "applied_usd": str(c.applied)}
                for c in self.credits
            ],
            "credits_applied": str(self.credits_applied),
            "amount_due": str(self.amount_due),
        }


_USAGE_COLUMNS = (
    "calls, unpriced_calls, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,"
    " input_cost, output_cost, cost"
)


def month_usage(conn: psycopg.Connection, tenant_id: str, period: str, time_zone: str) -> dict[str, Usage]:
    """Per model, everything the ledger holds for the month (in the tenant's time zone), from the month rollups."""
    rows = conn.execute(
        f"SELECT dimension_value, {_USAGE_COLUMNS} FROM tokenmeter.rollups WHERE tenant_id = %s"
        " AND granularity = 'month' AND dimension = 'model' AND window_start = %s",
        (tenant_id, local_midnight(datetime.strptime(period, "%Y-%m").date(), time_zone)),
    ).fetchall()
    return {row[0]: Usage(*row) for row in rows}


def _billed_usage(conn: psycopg.Connection, tenant_id: str, usage_period: str) -> dict[str, Usage]:
    """Per model, the usage of a month that finalized invoices have billed (as the month or as adjustments)."""
    rows = conn.execute(
        "SELECT provider_model, sum(calls)::bigint, sum(unpriced_calls)::bigint, sum(input_tokens)::bigint,"
        " sum(output_tokens)::bigint, sum(cache_read_tokens)::bigint, sum(cache_write_tokens)::bigint,"
        " sum(input_cost), sum(output_cost), sum(cost)"
        " FROM tokenmeter.invoice_usage WHERE tenant_id = %s AND usage_period = %s GROUP BY provider_model",
        (tenant_id, usage_period),
    ).fetchall()
    return {row[0]: Usage(*row) for row in rows}


def _ordered(lines: list[InvoiceLine]) -> list[InvoiceLine]:
    return sorted(lines, key=lambda x: (x.usage_period, -x.cost, x.provider_model))


def _check_period(period: str) -> None:
    if not _PERIOD.fullmatch(period):
        raise InvoiceError(f"the period must be a month, YYYY-MM, got {period!r}")


def _frozen(conn: psycopg.Connection, tenant_id: str, period: str) -> Invoice | None:
    row = conn.execute(
        "SELECT rate_card, time_zone, finalized_at, currency, fx_rate, fx_effective, fx_source, fx_entered_at, fx_id"
        " FROM tokenmeter.invoices WHERE tenant_id = %s AND period = %s",
        (tenant_id, period),
    ).fetchone()
    if row is None:
        return None
    card = RateCard.from_json(tenant_id, row[0])
    currency, rate = row[3], row[4]
    try:
        fx = None if rate is None else FxRate(USAGE_CURRENCY, currency, rate, row[5], row[6], row[7], row[8] or 0)
    except (ValueError, TypeError) as exc:  # a row edited by hand: say which invoice, not a traceback
        raise InvoiceError(f"the finalized invoice {tenant_id} {period} has an unusable exchange rate: {exc}") from None
    rows = conn.execute(
        f"SELECT usage_period, provider_model, {_USAGE_COLUMNS} FROM tokenmeter.invoice_usage"
        " WHERE tenant_id = %s AND period = %s",
        (tenant_id, period),
    ).fetchall()
    lines = [_line(card, Usage(*r[1:]), r[0]) for r in rows]
    own = _ordered([x for x in lines if x.usage_period == period])
    adjustments = _ordered([x for x in lines if x.usage_period != period])
    own, adjustments = in_currency(own, fx), in_currency(adjustments, fx)
    credits = frozen_credits(conn, tenant_id, period)
    return Invoice(tenant_id, period, currency, own, adjustments, card, row[1], "finalized", row[2], fx, credits)


def invoice(conn: psycopg.Connection, tenant_id: str, period: str) -> Invoice:
    """A tenant's invoice for the month ``YYYY-MM`` (in its time zone): as frozen once finalized;
    otherwise this month's usage under the current rate card, plus every earlier finalized month's
    usage that no invoice has billed yet, as adjustments."""
    _check_period(period)
    frozen = _frozen(conn, tenant_id, period)
    if frozen is not None:
        return frozen
    card = rate_card(conn, tenant_id)
    zone = tenant_time_zone(conn, tenant_id)
    lines = [_line(card, u, period) for u in month_usage(conn, tenant_id, period, zone).values()]
    adjustments = []
    earlier = conn.execute(
        "SELECT period FROM tokenmeter.invoices WHERE tenant_id = %s AND period < %s", (tenant_id, period)
    ).fetchall()
    for (finalized,) in earlier:
        billed = _billed_usage(conn, tenant_id, finalized)
        for model, usage in month_usage(conn, tenant_id, finalized, zone).items():
            late = usage.minus(billed.get(model, Usage(model)))
            if not late.empty:
                adjustments.append(_line(card, late, finalized))
    fx = billing_rate(conn, tenant_id, card.currency, period)
    lines, adjustments = in_currency(_ordered(lines), fx), in_currency(_ordered(adjustments), fx)
    # Credits for this month's usage and for the late usage billed above (sinks.credits.open_invoice_credits).
    credits = open_invoice_credits(conn, tenant_id, period, zone, [finalized for (finalized,) in earlier])
    return Invoice(tenant_id, period, card.currency, lines, adjustments, card, zone, "open", fx=fx, credits=credits)


_FROZEN_RATE_COLUMNS = "currency, fx_rate, fx_effective, fx_source, fx_entered_at, fx_id"


def _frozen_rate(currency: str, fx: FxRate | None) -> tuple[Any, ...]:
    """A finalizing invoice's currency and rate, stored with it: later corrections never change it."""
    if fx is None:
        return (currency, None, None, None, None, None)
    return (currency, fx.rate, fx.effective, fx.source, fx.entered_at, fx.id)


def finalize(conn: psycopg.Connection, tenant_id: str, period: str, now: datetime) -> Invoice:
    """Freeze the invoice of an ended month: what it bills now is what it bills forever."""
    _check_period(period)
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise InvoiceError("finalize commits on its own: call it outside a transaction (or autocommit)")
    with conn.transaction():
        # Serialize finalizations of one tenant, so an adjustment is frozen into one invoice only.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('tokenmeter.invoice:' || %s))", (tenant_id,))
        if _frozen(conn, tenant_id, period) is not None:
            raise InvoiceError(f"the invoice of {tenant_id} for {period} is already finalized")
        draft = invoice(conn, tenant_id, period)
        ends = month_bounds(period, draft.time_zone)[1]
        if now < ends:
            raise InvoiceError(f"{period} has not ended yet for {tenant_id} (it ends {ends.isoformat()})")
        frozen_rate = _frozen_rate(draft.currency, draft.fx)
        conn.execute(
            "INSERT INTO tokenmeter.invoices (tenant_id, period, time_zone, rate_card, total, finalized_at,"
            f" {_FROZEN_RATE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (tenant_id, period, draft.time_zone, json.dumps(draft.rate_card.as_json()), draft.total, now, *frozen_rate),
        )
        freeze_credits(conn, tenant_id, period, draft.credits)
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO tokenmeter.invoice_usage (tenant_id, period, usage_period, provider_model,"
                f" {_USAGE_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        tenant_id,
                        period,
                        x.usage_period,
                        x.provider_model,
                        x.calls,
                        x.unpriced_calls,
                        x.input_tokens,
                        x.output_tokens,
                        x.cache_read_tokens,
                        x.cache_write_tokens,
                        x.input_cost,
                        x.output_cost,
                        x.cost,
                    )
                    for x in draft.lines + draft.adjustments
                ],
            )
    frozen = _frozen(conn, tenant_id, period)
    assert frozen is not None
    return frozen
