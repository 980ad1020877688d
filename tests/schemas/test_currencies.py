"""Currencies and FX rates (pure): validation, exact conversion, which rate is in effect for a month."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.currencies import (
    MAX_RATE,
    CurrencyError,
    FxRate,
    currency_code,
    exact_product,
    exact_sum,
    first_day_of,
    parse_effective,
    parse_rate,
    parse_source,
    rate_in_effect,
    round_to_minor_units,
    superseded,
)


def test_currency_codes_are_iso_4217_and_upper_cased() -> None:
    assert [currency_code(c) for c in ("EUR", "usd", "JPY", "Kwd")] == ["EUR", "USD", "JPY", "KWD"]
    for bad in ("EUT", "EURO", "EU", "", "E\x1bR", " EUR", "XAU", "€"):
        with pytest.raises(CurrencyError, match="unknown currency"):
            currency_code(bad)
    with pytest.raises(CurrencyError, match="got int"):
        currency_code(978)


def test_rates_are_positive_bounded_exact_decimals() -> None:
    assert parse_rate("0.9213") == Decimal("0.9213")
    assert str(parse_rate("1E+1")) == "10" and str(parse_rate(" 161.230 ")) == "161.23"  # plain notation
    assert parse_rate(MAX_RATE) == MAX_RATE and parse_rate("0." + "0" * 17 + "1") == Decimal("1e-18")
    cases = {
        "0": "positive",
        "-0.9": "positive",
        "NaN": "positive",
        "Infinity": "positive",
        "sNaN": "positive",
        "100000000.1": "at most",
        "1e9": "at most",
        "0." + "0" * 18 + "1": "at most 18 decimals",
        "0.9213" + "0" * 24 + "1": "at most 18 decimals",  # 31 digits: not rounded to 0.9213 first
        "0,92": "decimal number",
        "": "decimal number",
    }
    for text, reason in cases.items():
        with pytest.raises(CurrencyError, match=reason):
            parse_rate(text)
    for wrong_type in (0.9213, True, None, [1]):
        with pytest.raises(CurrencyError, match="written as text"):
            parse_rate(wrong_type)


def test_effective_dates_and_sources_are_validated() -> None:
    assert parse_effective("2026-11-01") == date(2026, 11, 1) == parse_effective(date(2026, 11, 1))
    for bad, reason in (
        ("2026-02-30", "no such date"),
        ("2026-1-1", "YYYY-MM-DD"),
        ("20266-01-01", "YYYY-MM-DD"),
        ("1999-12-31", "between"),
        ("2101-01-01", "between"),
    ):
        with pytest.raises(CurrencyError, match=reason):
            parse_effective(bad)
    with pytest.raises(CurrencyError, match="got datetime"):
        parse_effective(datetime(2026, 11, 1, tzinfo=UTC))
    assert parse_source("  ECB  ") == "ECB" and parse_source("Bloomberg 16:00 fix") == "Bloomberg 16:00 fix"
    for bad, reason in (
        ("", "1 to 200"),
        ("   ", "1 to 200"),
        ("x" * 201, "1 to 200"),
        ("EC\x1b[31mB", "control character U.001B"),
    ):
        with pytest.raises(CurrencyError, match=reason):
            parse_source(bad)


def test_a_rate_converts_between_two_distinct_stored_forms() -> None:
    rate = FxRate("USD", "EUR", Decimal("0.9213"), date(2026, 11, 1), "ECB")
    assert rate.label == "1 USD = 0.9213 EUR (ECB, effective 2026-11-01)"
    assert rate.as_json() == {
        "from": "USD",
        "to": "EUR",
        "rate": "0.9213",
        "effective": "2026-11-01",
        "source": "ECB",
        "entered_at": None,
    }
    for args, reason in (
        (("USD", "USD", Decimal(1), date(2026, 11, 1), "ECB"), "to itself"),
        (("usd", "EUR", Decimal(1), date(2026, 11, 1), "ECB"), "upper case"),
        (("USD", "EUR", Decimal(0), date(2026, 11, 1), "ECB"), "positive"),
        (("USD", "EUR", Decimal(1), date(2026, 11, 1), " ECB"), "spaces"),
    ):
        with pytest.raises(CurrencyError, match=reason):
            FxRate(*args)


def test_conversion_keeps_every_digit_where_the_default_context_would_round() -> None:
    amount, rate = Decimal("987654321.123456789012"), Decimal("0.123456789012345678")
    product = exact_product(amount, rate)
    assert Fraction(product) == Fraction(amount) * Fraction(rate)  # independent: rational arithmetic
    assert getcontext().prec == 28 and amount * rate != product  # what a plain multiplication would give
    assert exact_product(Decimal("0.000000000000"), rate) == 0 and str(exact_product(Decimal(0), rate)) == "0"
    # Plain and shortest: trailing zeros of the 12-decimal ledger amounts do not pile up, no exponents.
    assert str(exact_product(Decimal("0.972729000000000000"), Decimal("0.9213"))) == "0.8961752277"
    assert str(exact_product(Decimal("1E+30"), Decimal("3"))) == "3" + "0" * 30
    many = [product] * 7 + [Decimal("1e-30")]
    assert Fraction(exact_sum(many)) == sum((Fraction(x) for x in many), Fraction(0))


@given(
    st.decimals(min_value=Decimal("-1e9"), max_value=Decimal("1e9"), places=12, allow_nan=False),
    st.decimals(min_value=Decimal("1e-18"), max_value=MAX_RATE, places=18, allow_nan=False),
)
def test_conversion_is_exact_for_any_ledger_amount_and_rate(amount: Decimal, rate: Decimal) -> None:
    assert Fraction(exact_product(amount, rate)) == Fraction(amount) * Fraction(rate)


def test_rounding_to_minor_units_is_half_up_per_currency() -> None:
    assert round_to_minor_units(Decimal("1.005"), "EUR") == Decimal("1.01")
    assert round_to_minor_units(Decimal("-1.005"), "EUR") == Decimal("-1.01")
    assert round_to_minor_units(Decimal("1234.5"), "JPY") == Decimal("1235")
    assert round_to_minor_units(Decimal("1.0005"), "KWD") == Decimal("1.001")


def _rate(effective: date, rate: str, entered_second: int, to: str = "EUR", source: str = "ECB") -> FxRate:
    return FxRate("USD", to, Decimal(rate), effective, source, datetime(2026, 1, 1, 0, 0, entered_second, tzinfo=UTC))


def test_the_rate_in_effect_for_a_month_is_the_latest_on_or_before_its_first_day() -> None:
    rates = [
        _rate(date(2026, 10, 1), "0.90", 1),
        _rate(date(2026, 11, 1), "0.9213", 2),
        _rate(date(2026, 11, 2), "0.95", 3),  # from the 2nd: December's invoice, not November's
        _rate(date(2026, 11, 1), "0.99", 1, to="GBP"),  # another pair
    ]
    november = first_day_of("2026-11")
    assert november == date(2026, 11, 1)
    assert rate_in_effect(rates, "USD", "EUR", november) == rates[1]  # effective on the first day itself
    assert rate_in_effect(rates, "USD", "EUR", first_day_of("2026-10")) == rates[0]
    assert rate_in_effect(rates, "USD", "EUR", first_day_of("2026-12")) == rates[2]
    assert rate_in_effect(rates, "USD", "EUR", first_day_of("2026-09")) is None  # before any: none, never 1
    assert rate_in_effect(rates, "USD", "CHF", november) is None
    assert rate_in_effect(rates, "EUR", "USD", november) is None  # no inverse: 1/0.9213 is not exact


def test_a_later_entry_for_the_same_date_corrects_the_earlier_one() -> None:
    first = _rate(date(2026, 11, 1), "0.9213", 5)
    correction = FxRate("USD", "EUR", Decimal("0.9215"), date(2026, 11, 1), "ECB (corrected)", first.entered_at, 9)
    earlier_date = _rate(date(2026, 10, 1), "0.90", 59)
    assert rate_in_effect([correction, first, earlier_date], "USD", "EUR", date(2026, 11, 30)) == correction
    assert superseded([FxRate(**{**first.__dict__, "id": 3}), correction, earlier_date]) == {3}


def test_a_period_is_a_month() -> None:
    for bad in ("2026-13", "2026-1", "2026-11-01", "x"):
        with pytest.raises(CurrencyError, match="YYYY-MM"):
            first_day_of(bad)
