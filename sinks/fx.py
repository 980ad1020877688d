"""FX rates in Postgres (``tokenmeter.fx_rates``, migration 0014): append-only entries, and the rate
an invoice month uses (the rules are in ``schemas/currencies.py``)."""

from __future__ import annotations

from typing import Any

import psycopg

from schemas.currencies import USAGE_CURRENCY, CurrencyError, FxRate, first_day_of, rate_in_effect

_COLUMNS = "from_currency, to_currency, rate, effective, source, entered_at, id"


def add_fx_rate(conn: psycopg.Connection, rate: FxRate) -> FxRate:
    """Record a rate (a new entry, even for a pair and date that has one: the later entry corrects
    it); returns it with the time it was entered and its id."""
    row = conn.execute(
        "INSERT INTO tokenmeter.fx_rates (from_currency, to_currency, rate, effective, source)"
        f" VALUES (%s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
        (rate.from_currency, rate.to_currency, rate.rate, rate.effective, rate.source),
    ).fetchone()
    assert row is not None
    return FxRate(*row)


def fx_rates(
    conn: psycopg.Connection, from_currency: str | None = None, to_currency: str | None = None
) -> list[FxRate]:
    """Every valid entry (of one pair or side when asked), by pair, then newest effective date and entry first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM tokenmeter.fx_rates"
        " WHERE (%(from)s::text IS NULL OR from_currency = %(from)s)"
        " AND (%(to)s::text IS NULL OR to_currency = %(to)s)"
        " ORDER BY from_currency, to_currency, effective DESC, entered_at DESC, id DESC",
        {"from": from_currency, "to": to_currency},
    ).fetchall()
    return [rate for rate in (_valid(row) for row in rows) if rate is not None]


def _valid(row: tuple[Any, ...]) -> FxRate | None:
    """A stored entry, or None for one the table's checks let through but tokenmeter would not enter
    (a well-formed code that is not ISO 4217, written by hand): it is never used, and never crashes
    a command that reads the table."""
    try:
        return FxRate(*row)
    except CurrencyError:
        return None


def rate_for_month(conn: psycopg.Connection, currency: str, period: str) -> FxRate | None:
    """The USD → ``currency`` rate an invoice of the month ``YYYY-MM`` converts with, or None."""
    return rate_in_effect(fx_rates(conn, USAGE_CURRENCY, currency), USAGE_CURRENCY, currency, first_day_of(period))
