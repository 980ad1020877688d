"""Printing values that come from usage data (tenant, feature, user and model names, alert messages)
so that they show as written and do nothing else: in rich tables and lines, and in CSV files; and money
rounded for people (``usd``) in tables and the HTML report, while JSON and CSV keep the exact amounts.

Names are whatever a service sent: ``[/bold]`` is rich markup that raises ``MarkupError`` and stops a
command, ``[red]x`` restyles the rest of a line, ``:warning:`` becomes an emoji, an ESC byte drives the
terminal, and a CSV cell starting with ``=`` is a formula to a spreadsheet (OWASP "CSV Injection").
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import Literal

from rich.text import Text

from schemas.currencies import MINOR_UNITS, USAGE_CURRENCY

# C0 controls, DEL and C1 controls: shown as escapes, never sent to the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Cells a spreadsheet reads as a formula (or, for tab and CR, strips before reading one).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A dollar amount written at the ledger's precision (7 to 12 decimals) inside a message or reason.
_EXACT_AMOUNT = re.compile(r"\$(-?\d+\.\d{7,})(?!\d)")


def _visible(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]


def cell(value: object, style: str = "") -> Text:
    """``value`` as literal rich text, for table cells, titles and lines: ``Text`` is never parsed for
    markup or emoji codes, and control characters are shown as escapes (``\\x1b``, ``\\t``)."""
    return Text(_CONTROL.sub(_visible, "" if value is None else str(value)), style=style)


def csv_safe(value: str | int | Decimal | None) -> str:
    """One CSV cell. Text that a spreadsheet would run as a formula gets a leading ``'`` (OWASP); numbers
    are written as they are, so a negative amount such as ``-0.5`` stays a number. Decimals in plain
    notation (``0.0000001``, not ``1E-7``), exactly as the ledger holds them."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, int):
        return str(value)
    return "'" + value if value.startswith(FORMULA_START) else value


def usd(amount: Decimal | str | int, kind: Literal["total", "per_call"] = "total") -> str:
    """A dollar amount for people; the ledger keeps 12 decimals, nobody reads them.

    ``total`` (totals, breakdowns, invoice lines, budgets): cents, with thousands separators (``$1,258.52``).
    ``per_call`` (average cost per call, one request): 4 significant digits, at least 2 decimals
    (``$0.008916``, ``$1.235``, ``$12.35``). Either way a nonzero amount never shows as ``$0.00``: an
    amount under half a cent keeps 2 significant digits as a total (``$0.0042``) and 4 per call, up to
    the ledger's 12 decimals. Halves round up; negative amounts read ``-$0.26``. Text that is not a number
    is returned as it is.
    """
    try:
        value = Decimal(amount)
    except InvalidOperation:
        return str(amount)
    if not value.is_finite():
        return str(amount)
    sign, value = ("-" if value < 0 else ""), abs(value)
    cents = value.quantize(Decimal("0.01"), ROUND_HALF_UP)
    if not value or (kind == "total" and cents):
        return f"{sign}${cents:,.2f}"
    digits = 4 if kind == "per_call" else 2
    places = min(12, max(2, digits - 1 - value.adjusted()))
    rounded = value.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)
    if not rounded:  # below the ledger's precision
        return f"{sign}<$0.000000000001"
    whole, _, decimals = f"{rounded:,f}".partition(".")
    decimals = decimals.rstrip("0").ljust(2, "0")  # $0.0089, not $0.008900 (which would claim precision)
    return f"{sign}${whole}.{decimals}"


def rounding_note(*exact: str) -> str:
    """The line under a table (and in the HTML report) that shows money through ``usd``, naming the
    ``--format`` choices that keep the exact amounts."""
    formats = " and ".join(exact)
    return f"amounts rounded for display (cents; per call: 4 significant digits); --format {formats} " + (
        "are exact" if len(exact) > 1 else "is exact"
    )


def usd_in_text(text: str) -> str:
    """``text`` (an alert message, a quota reason) with the amounts written at full ledger precision
    (``$30.5012345678``) rounded as totals; amounts already written for people (``$30.24``, ``$0.00892``)
    stay as they are."""
    return _EXACT_AMOUNT.sub(lambda found: usd(found.group(1)), text)


# ---------------------------------------------------------------- invoice tables
def _half_up(value: Fraction) -> int:
    """``value`` rounded to a whole number, halves away from zero (Decimal's ROUND_HALF_UP, which the
    invoice's ``total_rounded`` uses)."""
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return -magnitude if value < 0 else magnitude


def _minor_units(units: int, places: int) -> Decimal:
    # From text, so no context precision ever rounds it: 1234 with 2 places is Decimal("12.34").
    return Decimal(f"{units}E-{places}")


def allocate_rounded(exact: Sequence[Decimal], places: int) -> tuple[list[Decimal], Decimal]:
    """Round the lines of a table so that they add up to their rounded total (largest remainder).

    The total is the exact sum rounded half up to ``places`` decimals (the invoice's ``total_rounded``).
    Every line is first rounded down; the minor units the total still needs then go, one each, to the
    lines with the largest remainders (ties: the earlier line). So each shown line is its exact amount
    rounded down or up (less than one minor unit away), the lines add up to the shown total, and the
    units given out are at most the number of lines that were not already whole.
    Returns ``(lines, total)``, both with exactly ``places`` decimals.
    """
    scale = 10**places
    scaled = [Fraction(amount) * scale for amount in exact]  # Fraction: exact at any number of digits
    floors = [math.floor(value) for value in scaled]
    total = _half_up(sum(scaled, Fraction(0)))
    missing = total - sum(floors)  # 0 <= missing <= lines with a remainder (total is within 1/2 of the sum)
    by_remainder = sorted(range(len(scaled)), key=lambda i: (floors[i] - scaled[i], i))
    raised = set(by_remainder[:missing])
    lines = [_minor_units(floor + (i in raised), places) for i, floor in enumerate(floors)]
    return lines, _minor_units(total, places)


@dataclass(frozen=True)
class SummingColumn:
    """An amount column of an invoice table as shown: line cells that add up to the total cell."""

    lines: list[str]
    total: str


def summing_column(exact: Sequence[Decimal], currency: str) -> SummingColumn:
    """The amounts of a table column for people, in ``currency``'s minor units (cents; none for JPY; 3
    decimals for KWD), allocated by ``allocate_rounded`` so the rows add up to the shown total, which is
    the exact total rounded half up. Dollars read as every table shows them (``$1,234.57``), another
    currency as a plain number (its code is in the column header). A line below one minor unit can show as
    zero here: the exact amounts are in JSON and CSV."""
    lines, total = allocate_rounded(exact, MINOR_UNITS[currency])

    def shown(amount: Decimal) -> str:
        return usd(amount) if currency == USAGE_CURRENCY else f"{amount:,f}"

    return SummingColumn([shown(amount) for amount in lines], shown(total))


def invoice_rounding_note(currency: str) -> str:
    """The line under an invoice table that says how its rows are rounded (``summing_column``)."""
    unit = "cent" if MINOR_UNITS[currency] == 2 else "minor unit"
    return (
        "invoice lines add up to the total: the total is rounded half up, and each line is its exact amount"
        f" rounded down or up so they sum to it (largest remainder): at most one {unit} from its own rounding"
    )
