"""Currencies and FX rates: ISO 4217 codes and their minor units, validated rates, exact conversion,
and which rate is in effect for a billing month. Pure functions; Postgres I/O is in ``sinks/fx.py``.

Usage is always priced in USD (genai-prices); a rate card may bill in another currency, and an invoice
converts each USD amount by multiplying it with one rate, exactly (no rounding: the product of two
decimals has at most as many digits as both together). Rounding to a currency's minor units happens
once, on the invoice's total (``round_to_minor_units``), and in tables shown to people.

The rate in effect for a month is the one with the latest effective date on or before the month's
first day (a correction, entered later for the same effective date, replaces the earlier entry). So
an invoice's rate is known when its month begins and does not move while the month is open.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, Inexact, InvalidOperation, localcontext
from typing import Any

from schemas.events import printable_problem

# Active ISO 4217 codes that can appear on an invoice (funds codes included, precious metals, SDR and
# test codes left out), with their minor units where they are not 2.
_MINOR_UNITS_NOT_TWO = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX"), 0),
    **dict.fromkeys(("UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}
_TWO_DECIMAL_CODES = """
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN BWP BYN BZD CAD CDF CHE
CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL
HTG HUF IDR ILS INR IRR JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR
MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD SCR SDG SEK
SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD
XCG YER ZAR ZMW ZWG
"""
MINOR_UNITS: dict[str, int] = {**dict.fromkeys(_TWO_DECIMAL_CODES.split(), 2), **_MINOR_UNITS_NOT_TWO}

USAGE_CURRENCY = "USD"  # what genai-prices prices in, so what every ledger amount is
# A rate is "units of the target currency per unit of the source": the largest real ones are around
# 10^6 (IRR, VES per USD); beyond 10^8 it is a typo. 18 decimals is more than any published rate has.
MAX_RATE = Decimal(10) ** 8
MAX_RATE_DECIMALS = 18
# Effective dates: from before the first model APIs (backfills) to a bound that catches typos (20266).
MIN_EFFECTIVE = date(2000, 1, 1)
MAX_EFFECTIVE = date(2100, 12, 31)
MAX_SOURCE_LENGTH = 200

_CODE = re.compile(r"[A-Za-z]{3}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PERIOD = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")


class CurrencyError(ValueError):
    pass


def currency_code(value: object) -> str:
    """An ISO 4217 code (``EUR``; lower case accepted), upper-cased; CurrencyError otherwise."""
    if not isinstance(value, str):
        raise CurrencyError(f"a currency is a three-letter ISO 4217 code, got {type(value).__name__}")
    if not _CODE.fullmatch(value) or value.upper() not in MINOR_UNITS:
        raise CurrencyError(f"unknown currency {value!r}: use an ISO 4217 code such as USD, EUR, GBP, JPY")
    return value.upper()


def parse_rate(value: object) -> Decimal:
    """An FX rate from text or a Decimal (never a float: it is not exact), in plain notation;
    CurrencyError unless 0 < rate ≤ MAX_RATE with at most MAX_RATE_DECIMALS decimals."""
    if isinstance(value, bool) or not isinstance(value, str | Decimal | int):
        raise CurrencyError(f"a rate is a decimal number written as text, got {type(value).__name__}")
    try:
        rate = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise CurrencyError(f"the rate must be a decimal number, got {str(value)[:40]!r}") from None
    if not rate.is_finite() or rate <= 0:
        raise CurrencyError(f"the rate must be a positive number, got {str(value)[:40]!r}")
    if rate > MAX_RATE:
        raise CurrencyError(f"the rate must be at most {MAX_RATE:,}, got {str(value)[:40]!r}")
    with localcontext() as context:  # as precise as the rate is long: the default 28 digits would round
        context.prec = max(28, len(rate.as_tuple().digits))  # 1.000…0001 (29 digits) to 1 before the check
        context.traps[Inexact] = True
        normal = rate.normalize()
    exponent = normal.as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    if -exponent > MAX_RATE_DECIMALS:
        raise CurrencyError(f"the rate may have at most {MAX_RATE_DECIMALS} decimals, got {str(value)[:40]!r}")
    return Decimal(f"{normal:f}")  # 1E+1 -> 10: amounts converted with it stay in plain notation


def parse_effective(value: object) -> date:
    """An effective date, ``YYYY-MM-DD`` (or a date), between MIN_EFFECTIVE and MAX_EFFECTIVE."""
    if isinstance(value, datetime) or not isinstance(value, str | date):
        raise CurrencyError(f"the effective date is YYYY-MM-DD, got {type(value).__name__}")
    if isinstance(value, str):
        if not _DATE.fullmatch(value):
            raise CurrencyError(f"the effective date must be YYYY-MM-DD, got {value[:40]!r}")
        try:
            value = date.fromisoformat(value)
        except ValueError:
            raise CurrencyError(f"no such date: {value!r}") from None
    if not MIN_EFFECTIVE <= value <= MAX_EFFECTIVE:
        raise CurrencyError(f"the effective date must be between {MIN_EFFECTIVE} and {MAX_EFFECTIVE}, got {value}")
    return value


def parse_source(value: object) -> str:
    """Where a rate comes from (``ECB``, ``Bloomberg 16:00 fix``): printable text, 1–200 characters."""
    if not isinstance(value, str):
        raise CurrencyError(f"the source is text, got {type(value).__name__}")
    problem = printable_problem(value)
    if problem is not None:
        raise CurrencyError(f"source: {problem}")
    source = value.strip()
    if not source or len(source) > MAX_SOURCE_LENGTH:
        raise CurrencyError(f"the source must be 1 to {MAX_SOURCE_LENGTH} characters")
    return source


def exact_product(amount: Decimal, rate: Decimal) -> Decimal:
    """``amount × rate`` with every digit kept: the context is as precise as the product can be long,
    and an inexact result would raise instead of rounding (the default context keeps 28 digits)."""
    with localcontext() as context:
        context.prec = len(amount.as_tuple().digits) + len(rate.as_tuple().digits) + 2
        context.traps[Inexact] = True
        product = amount * rate
    return _without_trailing_zeros(product)


def _without_trailing_zeros(value: Decimal) -> Decimal:
    """The same number, shortest in plain notation: a ledger amount (12 decimals) times a markup and a
    rate has 20-odd decimals, mostly trailing zeros; ``0E-16`` and ``1E+2`` would print as such."""
    if not value:
        return Decimal(0)
    with localcontext() as context:
        context.prec = len(value.as_tuple().digits) + abs(value.as_tuple().exponent) + 2  # type: ignore[arg-type]
        context.traps[Inexact] = True
        trimmed = value.normalize()
        return trimmed.quantize(Decimal(1)) if trimmed.as_tuple().exponent > 0 else trimmed  # type: ignore[operator]


def exact_sum(amounts: Iterable[Decimal]) -> Decimal:
    """The sum of ``amounts`` with every digit kept (converted amounts can exceed 28 digits)."""
    with localcontext() as context:
        context.prec = 200
        context.traps[Inexact] = True
        return sum(amounts, Decimal(0))


def round_to_minor_units(amount: Decimal, currency: str) -> Decimal:
    """``amount`` rounded half up to ``currency``'s minor units (cents; none for JPY; 3 for KWD)."""
    return amount.quantize(Decimal(1).scaleb(-MINOR_UNITS[currency]), ROUND_HALF_UP)


def first_day_of(period: str) -> date:
    """The first day of a billing month ``YYYY-MM``: the day whose rate the month's invoice uses."""
    match = _PERIOD.fullmatch(period)
    if match is None:
        raise CurrencyError(f"the period must be a month, YYYY-MM, got {period!r}")
    return date(int(match.group(1)), int(match.group(2)), 1)


@dataclass(frozen=True)
class FxRate:
    """``1 from_currency = rate to_currency`` from ``effective`` on, as published by ``source``.
    ``entered_at`` is when it was recorded (None before it is stored); ``id`` orders entries made
    in the same instant."""

    from_currency: str
    to_currency: str
    rate: Decimal
    effective: date
    source: str
    entered_at: datetime | None = None
    id: int = 0

    def __post_init__(self) -> None:
        if currency_code(self.from_currency) != self.from_currency or (
            currency_code(self.to_currency) != self.to_currency
        ):
            raise CurrencyError("currency codes are stored upper case")
        if self.from_currency == self.to_currency:
            raise CurrencyError(f"a rate converts between two currencies, got {self.from_currency} to itself")
        if parse_rate(self.rate) != self.rate or parse_effective(self.effective) != self.effective:
            raise CurrencyError("build FxRate from parse_rate and parse_effective")
        if parse_source(self.source) != self.source:
            raise CurrencyError("the source has leading or trailing spaces")

    def convert(self, amount: Decimal) -> Decimal:
        """An amount in ``from_currency`` in ``to_currency``, exactly."""
        return exact_product(amount, self.rate)

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.from_currency,
            "to": self.to_currency,
            "rate": f"{self.rate:f}",
            "effective": self.effective.isoformat(),
            "source": self.source,
            "entered_at": self.entered_at.isoformat() if self.entered_at else None,
        }

    @property
    def label(self) -> str:
        """One line for people: ``1 USD = 0.9213 EUR (ECB, effective 2026-11-01)``."""
        return (
            f"1 {self.from_currency} = {self.rate:f} {self.to_currency}"
            f" ({self.source}, effective {self.effective.isoformat()})"
        )


_NEVER = datetime.min.replace(tzinfo=UTC)


def _entry_order(rate: FxRate) -> tuple[date, datetime, int]:
    return rate.effective, rate.entered_at or _NEVER, rate.id


def rate_in_effect(rates: Iterable[FxRate], from_currency: str, to_currency: str, day: date) -> FxRate | None:
    """The rate from ``from_currency`` to ``to_currency`` in effect on ``day``: the latest effective
    date on or before it, and of the entries for that date the one entered last (a correction).
    None when there is none: callers say so, a missing rate is never taken as 1."""
    candidates = [
        r for r in rates if (r.from_currency, r.to_currency) == (from_currency, to_currency) and r.effective <= day
    ]
    return max(candidates, key=_entry_order, default=None)


def superseded(rates: Iterable[FxRate]) -> set[int]:
    """Ids of entries corrected by a later entry for the same pair and effective date."""
    latest: dict[tuple[str, str, date], FxRate] = {}
    everything = list(rates)
    for rate in everything:
        key = (rate.from_currency, rate.to_currency, rate.effective)
        if key not in latest or _entry_order(rate) > _entry_order(latest[key]):
            latest[key] = rate
    kept = {r.id for r in latest.values()}
    return {r.id for r in everything if r.id not in kept}
