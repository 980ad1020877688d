"""Invoice tables whose rows add up to their total (issue #16 follow-up): the table rounds the exact total
half up (the JSON's ``total_rounded``) and gives each line its exact amount rounded down or up so the
shown lines sum to it (largest remainder). Property-tested for USD, EUR (2 decimals), JPY (0) and KWD (3)
against an independent computation with fractions; then end to end through ``tokenmeter invoice`` on the
test stack, where JSON and CSV must stay exact."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.output import allocate_rounded, invoice_rounding_note, summing_column
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent
from sinks.invoices import RateCard, set_rate_card
from sinks.postgres import write_batch
from streams.pricing import PriceBook

DECIMALS = {"USD": 2, "EUR": 2, "JPY": 0, "KWD": 3}  # ISO 4217 minor units, written out here on purpose


def shown_value(text: str) -> Fraction:
    """A table cell back to a number: ``$1,234.57``, ``-$0.26``, ``1,028`` (JPY), ``3.083`` (KWD)."""
    negative = text.startswith("-")
    digits = text.removeprefix("-").removeprefix("$").replace(",", "")
    assert digits.replace(".", "", 1).isdigit(), text  # a plain number: no "<0.01", no exponent
    return -Fraction(digits) if negative else Fraction(digits)


def rounded_half_up(value: Fraction, places: int) -> Fraction:
    """Independent of the code under test: scale, add or take a half, truncate toward zero."""
    scaled = value * 10**places
    return Fraction(int(scaled + (Fraction(1, 2) if scaled >= 0 else Fraction(-1, 2))), 10**places)


# Amounts as the ledger and FX conversion make them: up to 30 decimals (12 × an 18-decimal rate), any size
# an invoice line can reach, a few negative (the allocation must not depend on the sign).
amounts = st.builds(
    lambda units, places: Decimal(f"{units}E-{places}"),
    st.integers(min_value=-(10**14), max_value=10**16),
    st.integers(min_value=0, max_value=30),
)


@pytest.mark.parametrize("currency", sorted(DECIMALS))
@settings(max_examples=300, deadline=None)
@given(exact=st.lists(amounts, max_size=40))
def test_shown_lines_add_up_to_the_shown_total_and_stay_within_a_minor_unit(
    currency: str, exact: list[Decimal]
) -> None:
    places = DECIMALS[currency]
    unit = Fraction(1, 10**places)
    column = summing_column(exact, currency)
    shown = [shown_value(text) for text in column.lines]
    total = shown_value(column.total)

    assert len(shown) == len(exact)
    assert sum(shown, Fraction(0)) == total  # the trap: rows that do not add up
    assert total == rounded_half_up(sum((Fraction(a) for a in exact), Fraction(0)), places)  # = total_rounded
    for value, amount in zip(shown, exact, strict=True):
        assert abs(value - Fraction(amount)) < unit  # its exact amount rounded down or up
        assert value * 10**places == int(value * 10**places)  # whole minor units
    # Largest remainder: every line raised above its rounded-down amount had at least the remainder of
    # every line left rounded down.
    remainders = [Fraction(a) / unit % 1 for a in exact]
    raised = [r for r, v, a in zip(remainders, shown, exact, strict=True) if v > Fraction(a)]
    kept = [r for r, v, a in zip(remainders, shown, exact, strict=True) if v <= Fraction(a)]
    assert not raised or not kept or min(raised) >= max(kept)
    if currency == "USD":
        assert all(text.lstrip("-").startswith("$") for text in [*column.lines, column.total])


def test_the_reported_trap_now_adds_up() -> None:
    exact = [Decimal("4.976"), Decimal("3.975"), Decimal("1.3254")]  # each alone: 4.98 + 3.98 + 1.33 = 10.29
    column = summing_column(exact, "USD")
    # The total is 10.2764 → $10.28; the two cents beyond 4.97 + 3.97 + 1.32 go to the largest remainders.
    assert (column.lines, column.total) == (["$4.98", "$3.97", "$1.33"], "$10.28")
    assert summing_column([Decimal("1234.565")], "EUR").lines == ["1,234.57"]  # thousands separated, half up
    assert summing_column([Decimal("497.6"), Decimal("397.5")], "JPY").lines == ["498", "397"]  # 895.1 → 895
    assert summing_column([Decimal("1.1925")], "KWD").total == "1.193"


def test_lines_under_a_minor_unit_show_whole_units_that_sum() -> None:
    # Three lines of $0.004: $0.012 rounds to $0.01, so one line shows it and the others $0.00.
    assert allocate_rounded([Decimal("0.004")] * 3, 2) == (
        [Decimal("0.01"), Decimal("0.00"), Decimal("0.00")],
        Decimal("0.01"),
    )
    assert allocate_rounded([], 2) == ([], Decimal("0.00"))
    assert allocate_rounded([Decimal("-0.005")], 2) == ([Decimal("-0.01")], Decimal("-0.01"))  # halves away from 0
    assert allocate_rounded([Decimal("2.5")], 0) == ([Decimal("3")], Decimal("3"))
    assert "one cent" in invoice_rounding_note("EUR") and "one minor unit" in invoice_rounding_note("JPY")


# ---------------------------------------------------------------- end to end, on the test stack
PERIOD = "2026-02"
# Custom USD rates per million input tokens: 1,000 tokens each bill 4.976, 3.975 and 1.3254 USD.
RATES = {"openai/gpt-4o": "4976", "openai/gpt-4o-mini": "3975", "openai/gpt-4.1": "1325.4"}
FX = {"USD": None, "JPY": "100", "KWD": "0.3"}
# What each currency's table must show per model, worked out by hand from the amounts above:
# USD 4.976 / 3.975 / 1.3254, total 10.2764 → 10.28; JPY 497.6 / 397.5 / 132.54, total 1027.64 → 1028;
# KWD 1.4928 / 1.1925 / 0.39762, total 3.08292 → 3.083 (each alone would show 1.493 + 1.193 + 0.398).
EXPECTED = {
    "USD": ({"openai/gpt-4o": "$4.98", "openai/gpt-4o-mini": "$3.97", "openai/gpt-4.1": "$1.33"}, "$10.28"),
    "JPY": ({"openai/gpt-4o": "498", "openai/gpt-4o-mini": "397", "openai/gpt-4.1": "133"}, "1,028"),
    "KWD": ({"openai/gpt-4o": "1.493", "openai/gpt-4o-mini": "1.192", "openai/gpt-4.1": "0.398"}, "3.083"),
}


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def cli(*args: str) -> str:
    wide = {**os.environ, "COLUMNS": "220"}  # one table row per line
    done = subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=60, env=wide)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout


def seed(conn: psycopg.Connection, tenant: str, currency: str) -> None:
    book = PriceBook()
    events = []
    for model in RATES:
        event = validate_event(
            {
                "event_id": f"{tenant}-{model}",
                "timestamp": datetime(2026, 2, 10, tzinfo=UTC),
                "tenant_id": tenant,
                "provider": "openai",
                "model": model.removeprefix("openai/"),
                "input_tokens": 1000,
                "output_tokens": 0,
            }
        )
        events.append(PricedEvent(event, book.price(event)))
    write_batch(conn, events)
    rates = {m: {"input_mtok": Decimal(r), "output_mtok": Decimal(0)} for m, r in RATES.items()}
    set_rate_card(conn, RateCard(tenant, "custom", rates=rates, currency=currency))


@pytest.mark.parametrize("currency", sorted(FX))
def test_invoice_table_rows_add_up_and_json_and_csv_stay_exact(
    conn: psycopg.Connection, unique: str, currency: str
) -> None:
    tenant = f"round-{currency.lower()}-{unique}"
    seed(conn, tenant, currency)
    rate = FX[currency]
    if rate is not None:  # the same rate every run: entering it again corrects it to itself
        cli("fx", "set", "--to", currency, "--rate", rate, "--effective", f"{PERIOD}-01", "--source", "test")

    table = cli("invoice", "--tenant", tenant, "--period", PERIOD)
    lines, total = EXPECTED[currency]
    for model, shown in lines.items():
        row = next(r for r in table.splitlines() if f" {model} " in r)
        assert [c.strip() for c in row.split("│")][-3 if rate else -2] == shown, row
    total_row = [c.strip() for c in next(r for r in table.splitlines() if "TOTAL" in r).split("│")]
    assert total_row[-3 if rate else -2] == total
    assert " ".join(invoice_rounding_note(currency).split()[:4]) in table
    if rate:  # the USD column of a converted invoice adds up too
        usd_lines, usd_total = EXPECTED["USD"]
        assert total_row[-2] == usd_total
        for model, shown in usd_lines.items():
            assert [c.strip() for c in next(r for r in table.splitlines() if f" {model} " in r).split("│")][-2] == shown

    multiplier = Fraction(Decimal(rate)) if rate else Fraction(1)
    exact = {m: Fraction(1000) * Fraction(Decimal(r)) / 10**6 * multiplier for m, r in RATES.items()}
    document = json.loads(cli("invoice", "--tenant", tenant, "--period", PERIOD, "--format", "json"))
    assert {line["provider_model"]: Fraction(Decimal(line["amount"])) for line in document["lines"]} == exact
    assert Fraction(Decimal(document["total"])) == sum(exact.values())
    assert shown_value(total) == Fraction(Decimal(document["total_rounded"]))  # the table's total is what is charged
    *rows, total_csv = csv.DictReader(
        io.StringIO(cli("invoice", "--tenant", tenant, "--period", PERIOD, "--format", "csv"))
    )
    assert {r["provider_model"]: Fraction(Decimal(r["amount"])) for r in rows} == exact
    assert Fraction(Decimal(total_csv["amount"])) == sum(exact.values())
