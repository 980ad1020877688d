"""Invoices billed in another currency than USD: USD usage × the month's effective rate, exactly, with the
rate's source on the invoice; frozen with the invoice at finalization (issue #16 part 4)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import genai_prices
import psycopg
import pytest

from deploy.cli_fx import amount_header, money
from deploy.output import usd
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.currencies import FxRate
from schemas.records import PricedEvent
from sinks.invoices import Invoice, InvoiceError, InvoiceItem, InvoiceLine, RateCard, finalize, in_currency, invoice
from sinks.postgres import write_batch
from tests.sinks.test_invoices import calls


# ---------------------------------------------------------------- pure
def test_lines_convert_exactly_and_keep_their_usd_amounts() -> None:
    fx = FxRate("USD", "EUR", Decimal("0.9213"), date(2026, 11, 1), "ECB")
    items = [InvoiceItem("input", 1000, None, Decimal("0.002500000000")), InvoiceItem("output", 10, None, Decimal("1"))]
    line = InvoiceLine(
        "openai/gpt-4o", 1, 1000, 10, 0, 0, Decimal("0.0025"), Decimal("1.002500000000"), items, "2026-11"
    )
    (converted,) = in_currency([line], fx)
    assert converted.amount == Decimal("0.92360325") and converted.amount_usd == line.amount  # 1.0025 × 0.9213
    assert [(i.amount, i.amount_usd) for i in converted.items] == [
        (Decimal("0.0023032500"), Decimal("0.002500000000")),
        (Decimal("0.9213"), Decimal("1")),
    ]
    (same,) = in_currency([line], None)  # a USD invoice: nothing converted
    assert (same.amount, same.amount_usd) == (line.amount, line.amount)

    bill = Invoice(
        "t", "2026-11", "EUR", [converted, converted], [], RateCard("t", currency="EUR"), "UTC", "open", fx=fx
    )
    assert bill.total == fx.convert(bill.total_usd) == 2 * Decimal("0.92360325")
    document = bill.as_json()
    assert (document["currency"], Decimal(document["total"]), document["total_rounded"]) == ("EUR", bill.total, "1.85")
    assert Decimal(document["total_usd"]) == Decimal("2.005") and document["fx"]["source"] == "ECB"
    assert document["lines"][0]["amount_usd"] == "1.002500000000" and document["rate_card"]["currency"] == "EUR"


def test_invoice_amounts_show_in_their_currency_rounded_to_its_minor_units() -> None:
    assert money(Decimal("1234.565"), "EUR") == "1,234.57" and amount_header("EUR") == "amount EUR"
    assert money(Decimal("1234.5"), "JPY") == "1,235" and money(Decimal("-7.005"), "EUR") == "-7.01"
    assert money(Decimal("0.0004"), "EUR") == "<0.01" and money(Decimal("-0.0004"), "EUR") == "-<0.01"
    assert money(Decimal("0.0004"), "KWD") == "<0.001" and money(Decimal(0), "EUR") == "0.00"
    assert money(Decimal("1234.565"), "USD") == "$1,234.57"  # dollars as every other table shows them


def test_a_rate_card_currency_is_validated() -> None:
    assert RateCard("t", currency="EUR").as_json()["currency"] == "EUR"
    assert RateCard.from_json("t", {"mode": "pass_through", "markup_percent": "0"}).currency == "USD"  # older cards
    for bad in ("eur", "EUT", "EURO"):
        with pytest.raises(ValueError):
            RateCard("t", currency=bad)


# ---------------------------------------------------------------- against the real Postgres
@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    wide = {**os.environ, "COLUMNS": "200"}  # tables as on a wide terminal: headers and amounts unwrapped
    done = subprocess.run([sys.executable, "-m", "deploy", *args], capture_output=True, text=True, timeout=60, env=wide)
    assert (done.returncode == 0) == ok, (done.stdout, done.stderr)
    return done


def usd_cost(items: list[PricedEvent]) -> Fraction:
    """What the calls cost in USD, from genai-prices directly (not the pipeline's price book)."""
    total = Fraction(0)
    for item in items:
        e = item.event
        usage = genai_prices.Usage(
            input_tokens=e.input_tokens, output_tokens=e.output_tokens, cache_read_tokens=e.cache_read_tokens
        )
        price = genai_prices.calc_price(usage, e.model, provider_id=e.provider, genai_request_timestamp=e.timestamp)
        total += Fraction(price.total_price)
    return total


MARKUP = Fraction(6, 5)  # the card is cost plus 20 %


def test_an_eur_invoice_is_usd_usage_times_the_months_rate_with_its_source(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"fx-{unique}"
    assert "billed in EUR" in cli("ratecard", "set", "--tenant", tenant, "--markup", "20", "--currency", "eur").stdout
    august = calls(tenant, "aug", datetime(2026, 8, 20, tzinfo=UTC), 2)
    september = calls(tenant, "sep", datetime(2026, 9, 12, tzinfo=UTC), 3)
    october = calls(tenant, "oct", datetime(2026, 10, 5, tzinfo=UTC), 2) + calls(
        tenant, "oct-mini", datetime(2026, 10, 31, 23, 59, tzinfo=UTC), 3, model="gpt-4o-mini"
    )
    write_batch(conn, august + september + october)

    # No USD→EUR rate is effective on or before 2026-08-01: an error that says how to fix it, never 1.0.
    with pytest.raises(InvoiceError, match="no USD to EUR rate is effective on or before 2026-08-01"):
        invoice(conn, tenant, "2026-08")
    refused = cli("invoice", "--tenant", tenant, "--period", "2026-08", ok=False)
    assert "tokenmeter fx set --from USD --to EUR --rate RATE --effective 2026-08-01" in refused.stderr

    for rate, effective, source in (
        ("0.9", "2026-09-01", "ECB"),
        ("0.9213", "2026-10-01", "ECB"),
        ("0.9215", "2026-10-01", "ECB (corrected)"),  # a later entry for the same date corrects it
        ("0.95", "2026-10-02", "ECB"),  # from the 2nd: not October's rate (the month's first day decides)
    ):
        entered = cli("fx", "set", "--to", "EUR", "--rate", rate, "--effective", effective, "--source", source)
        assert f"1 USD = {rate} EUR ({source}, effective {effective}) recorded" in entered.stdout
    listed = json.loads(cli("fx", "list", "--from", "usd", "--to", "EUR", "--format", "json").stdout)
    october_entries = [r for r in listed if r["effective"] == "2026-10-01"]
    assert (october_entries[0]["rate"], october_entries[0]["superseded"]) == ("0.9215", False)
    assert all(r["superseded"] for r in october_entries[1:]) and len(october_entries) >= 2

    for period, items, rate, source in (
        ("2026-09", september, "0.9", "ECB"),
        ("2026-10", october, "0.9215", "ECB (corrected)"),
    ):
        bill = invoice(conn, tenant, period)
        assert bill.currency == "EUR" and bill.fx is not None and bill.fx.source == source
        assert Fraction(bill.total_usd) == usd_cost(items) * MARKUP
        assert Fraction(bill.total) == usd_cost(items) * MARKUP * Fraction(Decimal(rate))  # exact, no rounding
        document = json.loads(cli("invoice", "--tenant", tenant, "--period", period, "--format", "json").stdout)
        assert (document["currency"], document["fx"]["rate"], document["fx"]["source"]) == ("EUR", rate, source)
        assert Fraction(Decimal(document["total"])) == usd_cost(items) * MARKUP * Fraction(Decimal(rate))
        # The documented rounding: half up to the currency's minor units (quantize's default is half even).
        assert Decimal(document["total_rounded"]) == Decimal(document["total"]).quantize(Decimal("0.01"), ROUND_HALF_UP)
        for line in document["lines"]:
            assert Decimal(line["amount"]) == Decimal(line["amount_usd"]) * Decimal(rate)

    table = cli("invoice", "--tenant", tenant, "--period", "2026-10").stdout
    assert "1 USD = 0.9215 EUR (ECB (corrected), effective 2026-10-01)" in table
    assert "amount EUR" in table and "amount USD" in table
    total_row = next(row for row in table.splitlines() if "TOTAL" in row)
    shown = invoice(conn, tenant, "2026-10")
    assert [cell.strip() for cell in total_row.split("│")][-3:-1] == [money(shown.total, "EUR"), usd(shown.total_usd)]
    rows = list(
        csv.DictReader(io.StringIO(cli("invoice", "--tenant", tenant, "--period", "2026-10", "--format", "csv").stdout))
    )
    assert {(r["currency"], r["fx_rate"], r["fx_source"], r["fx_effective"]) for r in rows} == {
        ("EUR", "0.9215", "ECB (corrected)", "2026-10-01")
    }
    assert Fraction(Decimal(rows[-1]["amount"])) == usd_cost(october) * MARKUP * Fraction(Decimal("0.9215"))


def test_a_finalized_invoice_keeps_its_rate_and_late_usage_takes_the_next_invoices(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"fx-late-{unique}"
    cli("ratecard", "set", "--tenant", tenant, "--pass-through")
    assert "billed in GBP" in cli("ratecard", "set", "--tenant", tenant, "--currency", "GBP").stdout  # only currency
    cli("fx", "set", "--to", "GBP", "--rate", "0.79", "--effective", "2026-06-01", "--source", "BoE")
    cli("fx", "set", "--to", "GBP", "--rate", "0.8", "--effective", "2026-07-01", "--source", "BoE")
    june = calls(tenant, "june", datetime(2026, 6, 15, tzinfo=UTC), 2)
    write_batch(conn, june)
    frozen = finalize(conn, tenant, "2026-06", now=datetime(2026, 7, 2, tzinfo=UTC))
    assert frozen.fx is not None and frozen.fx.rate == Decimal("0.79")
    assert Fraction(frozen.total) == usd_cost(june) * Fraction(79, 100)

    # A correction of June's rate after finalization changes nothing on June's invoice.
    cli("fx", "set", "--to", "GBP", "--rate", "0.5", "--effective", "2026-06-01", "--source", "typo")
    assert invoice(conn, tenant, "2026-06").as_json() == frozen.as_json()

    late = calls(tenant, "late", datetime(2026, 6, 30, tzinfo=UTC), 2, model="gpt-4o-mini")
    july = calls(tenant, "july", datetime(2026, 7, 9, tzinfo=UTC), 1)
    write_batch(conn, late + july)
    open_july = invoice(conn, tenant, "2026-07")
    assert [(a.usage_period, a.calls) for a in open_july.adjustments] == [("2026-06", 2)]
    assert Fraction(open_july.adjustments[0].amount) == usd_cost(late) * Fraction(4, 5)  # July's rate
    assert Fraction(open_july.total) == (usd_cost(late) + usd_cost(july)) * Fraction(4, 5)
    finalized = json.loads(
        cli("invoice", "--tenant", tenant, "--period", "2026-07", "--finalize", "--format", "json").stdout
    )
    assert (finalized["status"], finalized["currency"], finalized["fx"]["rate"]) == ("finalized", "GBP", "0.8")
    assert Fraction(Decimal(finalized["total"])) == (usd_cost(late) + usd_cost(july)) * Fraction(4, 5)

    for args, reason in (
        (("--to", "GBP", "--rate", "0", "--effective", "2026-07-01", "--source", "x"), "positive"),
        (("--to", "GBX", "--rate", "1", "--effective", "2026-07-01", "--source", "x"), "unknown currency"),
        (("--to", "GBP", "--rate", "1", "--effective", "2026-07-32", "--source", "x"), "no such date"),
        (("--to", "GBP", "--rate", "1", "--effective", "2026-07-01", "--source", "a\x07"), "control character"),
        (("--from", "GBP", "--to", "GBP", "--rate", "1", "--effective", "2026-07-01", "--source", "x"), "itself"),
    ):
        assert reason in cli("fx", "set", *args, ok=False).stderr
    assert "unknown currency" in cli("ratecard", "set", "--tenant", tenant, "--currency", "EURO", ok=False).stderr
    # The wrong way round is recorded (append-only) but said to be of no use to any invoice.
    inverse = cli(
        "fx", "set", "--from", "GBP", "--to", "USD", "--rate", "1.25", "--effective", "2026-07-01", "--source", "x"
    )
    assert "no invoice uses this rate" in inverse.stderr and "--from USD --to GBP" in inverse.stderr

    # Written by hand: the table refuses what `fx set` refuses; a well-formed non-ISO code is skipped on read.
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO tokenmeter.fx_rates (from_currency, to_currency, rate, effective, source)"
            " VALUES ('USD', 'GBP', -1, '2026-07-01', 'x')"
        )
    conn.execute(
        "INSERT INTO tokenmeter.fx_rates (from_currency, to_currency, rate, effective, source)"
        " VALUES ('USD', 'ABC', 2, '2026-07-01', 'by hand')"
    )
    listed = json.loads(cli("fx", "list", "--format", "json").stdout)
    assert listed and "ABC" not in {r["to"] for r in listed} and "by hand" not in cli("fx", "list").stdout


def test_a_currency_written_by_hand_that_is_not_iso_4217_is_a_clear_error(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"fx-bad-{unique}"
    cli("ratecard", "set", "--tenant", tenant, "--markup", "10", "--currency", "EUR")
    write_batch(conn, calls(tenant, "x", datetime(2026, 7, 3, tzinfo=UTC), 1))
    # Passes the table's three-capital-letters check, but is no ISO 4217 currency.
    conn.execute("UPDATE tokenmeter.rate_cards SET currency = 'ABC' WHERE tenant_id = %s", (tenant,))
    with pytest.raises(InvoiceError, match=f"the rate card of {tenant} is invalid .*unknown currency 'ABC'"):
        invoice(conn, tenant, "2026-07")
    refused = cli("invoice", "--tenant", tenant, "--period", "2026-07", ok=False)
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "unknown currency 'ABC'" in refused.stderr and "ratecard set --tenant" in refused.stderr
    # Changing only the currency keeps the broken card's other terms, so it is refused with the same error;
    # the repair the message names replaces the whole card.
    assert "unknown currency 'ABC'" in cli("ratecard", "set", "--tenant", tenant, "--currency", "EUR", ok=False).stderr
    cli("ratecard", "set", "--tenant", tenant, "--pass-through", "--currency", "USD")
    repaired = json.loads(cli("invoice", "--tenant", tenant, "--period", "2026-07", "--format", "json").stdout)
    assert (repaired["currency"], repaired["calls"]) == ("USD", 1)
