"""``tokenmeter fx set|list``: FX rates with an effective date and a source, and how an invoice in
another currency than USD shows its amounts and its rate (``invoice`` in deploy/cli.py)."""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from deploy.output import cell, usd
from deploy.settings import get_settings
from schemas.currencies import (
    MINOR_UNITS,
    USAGE_CURRENCY,
    CurrencyError,
    FxRate,
    currency_code,
    parse_effective,
    parse_rate,
    parse_source,
    round_to_minor_units,
    superseded,
)

if TYPE_CHECKING:
    from sinks.invoices import Invoice


def _fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


# ---------------------------------------------------------------- invoice display
def money(amount: Decimal, currency: str) -> str:
    """An invoice amount for people: USD as every table shows dollars (``usd``); another currency
    rounded half up to its minor units (``1,234.57`` EUR, ``1,235`` JPY), its code in the column
    header (``amount_header``); a nonzero amount below one minor unit shows as ``<0.01``, not as zero."""
    if currency == USAGE_CURRENCY:
        return usd(amount)
    rounded = round_to_minor_units(amount, currency)
    if amount and not rounded:
        smallest = Decimal(1).scaleb(-MINOR_UNITS[currency])
        return f"{'-' if amount < 0 else ''}<{smallest:f}"
    return f"{rounded:,f}"


def amount_header(currency: str) -> str:
    return "amount" if currency == USAGE_CURRENCY else f"amount {currency}"


def fx_csv_columns(bill: Invoice) -> dict[str, Any]:
    """Columns every CSV row of an invoice carries: its currency and the rate it was converted with
    (empty for USD), so each row stands on its own in a spreadsheet."""
    fx = bill.fx
    return {
        "currency": bill.currency,
        "fx_rate": None if fx is None else fx.rate,
        "fx_effective": None if fx is None else fx.effective.isoformat(),
        "fx_source": None if fx is None else fx.source,
    }


def fx_note(bill: Invoice) -> str | None:
    """The line under an invoice table in another currency: the rate, its source and effective date,
    the USD total, and where rounding happens."""
    if bill.fx is None:
        return None
    return (
        f"converted from USD at {bill.fx.label}; USD total {usd(bill.total_usd)}; the {bill.currency} total"
        f" rounded half up to {MINOR_UNITS[bill.currency]} decimals, lines allocated to add up to it"
    )


# ---------------------------------------------------------------- commands
@click.group("fx")
def fx() -> None:
    """Foreign exchange rates for invoices billed in another currency than USD.

    An invoice for month M converts at the rate with the latest effective date on or before the
    first day of M; a later entry for the same pair and date corrects an earlier one.
    """


@fx.command("set")
@click.option("--from", "from_code", default=USAGE_CURRENCY, show_default=True, help="ISO 4217 code converted from.")
@click.option("--to", "to_code", required=True, help="ISO 4217 code converted to, e.g. EUR.")
@click.option("--rate", required=True, help="Units of --to per unit of --from, e.g. 0.9213 (exact decimal).")
@click.option("--effective", required=True, help="First day the rate applies, YYYY-MM-DD.")
@click.option("--source", required=True, help="Where the rate comes from, e.g. ECB.")
def fx_set(from_code: str, to_code: str, rate: str, effective: str, source: str) -> None:
    """Record a rate (append-only: entering one again for the same date corrects it)."""
    import psycopg

    from sinks.fx import add_fx_rate, fx_rates

    try:
        wanted = FxRate(
            currency_code(from_code),
            currency_code(to_code),
            parse_rate(rate),
            parse_effective(effective),
            parse_source(source),
        )
    except CurrencyError as exc:
        _fail(str(exc))
    try:
        with psycopg.connect(get_settings().database_url, connect_timeout=5) as conn:
            earlier = [
                r for r in fx_rates(conn, wanted.from_currency, wanted.to_currency) if r.effective == wanted.effective
            ]
            stored = add_fx_rate(conn, wanted)
    except psycopg.Error as exc:
        _fail(f"cannot write to the metering database: {exc}".strip())
    click.echo(f"{stored.label} recorded (entry {stored.id})")
    if stored.from_currency != USAGE_CURRENCY:  # easy to enter the wrong way round: EUR→USD for a EUR invoice
        click.secho(
            f"note: invoices convert from {USAGE_CURRENCY} only (a rate is never inverted), so no invoice uses"
            f" this rate; a tenant billed in {stored.from_currency} needs --from {USAGE_CURRENCY}"
            f" --to {stored.from_currency}",
            fg="yellow",
            err=True,
        )
    if earlier:
        click.echo(f"it corrects {len(earlier)} earlier entr{'y' if len(earlier) == 1 else 'ies'} for that date")


@fx.command("list")
@click.option("--from", "from_code", default=None, help="Only rates from this currency.")
@click.option("--to", "to_code", default=None, help="Only rates to this currency.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def fx_list(from_code: str | None, to_code: str | None, fmt: str) -> None:
    """Every rate entered, newest effective date first; corrected entries are marked superseded."""
    import psycopg

    from sinks.fx import fx_rates

    try:
        pair = (
            None if from_code is None else currency_code(from_code),
            None if to_code is None else currency_code(to_code),
        )
    except CurrencyError as exc:
        _fail(str(exc))
    try:
        with psycopg.connect(get_settings().database_url, connect_timeout=5) as conn:
            rates = fx_rates(conn, *pair)
    except psycopg.Error as exc:
        _fail(f"cannot read the metering database: {exc}".strip())
    replaced = superseded(rates)
    if fmt == "json":
        click.echo(json.dumps([{**r.as_json(), "id": r.id, "superseded": r.id in replaced} for r in rates], indent=2))
        return
    table = Table(title="FX rates")
    for column in ("from", "to", "rate", "effective", "source", "entered at", ""):
        table.add_column(column, justify="right" if column == "rate" else "left")
    for r in rates:
        entered = r.entered_at.isoformat(timespec="seconds") if r.entered_at else ""
        note = "superseded" if r.id in replaced else ""
        table.add_row(r.from_currency, r.to_currency, f"{r.rate:f}", str(r.effective), cell(r.source), entered, note)
    Console().print(table)
