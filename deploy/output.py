"""Printing values that come from usage data (tenant, feature, user and model names, alert messages)
so that they show as written and do nothing else: in rich tables and lines, and in CSV files.

Names are whatever a service sent: ``[/bold]`` is rich markup that raises ``MarkupError`` and stops a
command, ``[red]x`` restyles the rest of a line, ``:warning:`` becomes an emoji, an ESC byte drives the
terminal, and a CSV cell starting with ``=`` is a formula to a spreadsheet (OWASP "CSV Injection").
"""

from __future__ import annotations

import re
from decimal import Decimal

from rich.text import Text

# C0 controls, DEL and C1 controls: shown as escapes, never sent to the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Cells a spreadsheet reads as a formula (or, for tab and CR, strips before reading one).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


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
