"""Printing values that come from usage data (tenant, feature, user and model names, alert messages)
so that they show as written and do nothing else: in rich tables and lines, and in CSV files; and money
rounded for people (``usd``) in tables and the HTML report, while JSON and CSV keep the exact amounts.

Names are whatever a service sent: ``[/bold]`` is rich markup that raises ``MarkupError`` and stops a
command, ``[red]x`` restyles the rest of a line, ``:warning:`` becomes an emoji, an ESC byte drives the
terminal, and a CSV cell starting with ``=`` is a formula to a spreadsheet (OWASP "CSV Injection").
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Literal

from rich.text import Text

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
