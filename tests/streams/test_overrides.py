"""Price override records: every bad value is a ValueError with a reason, never another exception
(an ArithmeticError from ``Decimal("3,5")`` used to restart stage 1 forever)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from schemas.records import TokenRates
from streams.config_topic import config_amount
from streams.overrides import MAX_RATE, override_message, parse_override
from streams.pricing import PriceOverride


def record(**changes: Any) -> bytes:
    body: dict[str, Any] = {
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "effective_from": "2025-08-01T00:00:00+00:00",
        "input_mtok": "1.25",
        "output_mtok": "10",
        "cache_read_mtok": None,
        "cache_write_mtok": None,
    }
    body.update(changes)
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def test_an_override_round_trips() -> None:
    override = PriceOverride(
        "acme",
        "openai",
        "gpt-4o",
        datetime(2025, 8, 1, tzinfo=UTC),
        TokenRates(Decimal("1.25"), Decimal(10), Decimal("0.125"), None),
        "ovr-1",
    )
    key, value = override_message(override)
    assert parse_override(key.decode(), value) == override


def test_rates_are_exact_and_trailing_zeros_beyond_12_places_are_dropped() -> None:
    parsed = parse_override("ovr-1", record(input_mtok="0.000000000001", output_mtok="2.50000000000000000"))
    assert parsed.rates.input_mtok == Decimal("1E-12")
    assert parsed.rates.output_mtok == Decimal("2.5") and parsed.rates.output_mtok.as_tuple().exponent == -12
    assert parse_override("ovr-1", record(input_mtok=0, output_mtok=3.5)).rates.output_mtok == Decimal("3.5")
    assert str(parse_override("ovr-1", record(output_mtok="1E+2")).rates.output_mtok) == "100"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"input_mtok": "3,5"}, "input_mtok: '3,5' is not a decimal number"),
        ({"input_mtok": "NaN"}, "input_mtok must be a finite amount"),
        ({"output_mtok": "sNaN"}, "output_mtok must be a finite amount"),
        ({"output_mtok": "Infinity"}, "output_mtok must be a finite amount"),
        ({"output_mtok": "-Infinity"}, "output_mtok must be a finite amount"),
        ({"input_mtok": "-1"}, "input_mtok must be zero or more"),
        ({"input_mtok": "1e-13"}, "input_mtok has more than 12 decimal places"),
        ({"cache_read_mtok": "0.0000000000001"}, "cache_read_mtok has more than 12 decimal places"),
        ({"input_mtok": "1e30"}, "input_mtok must be below"),
        ({"output_mtok": "9" * 5000}, "output_mtok must be below"),
        ({"input_mtok": ...}, "input_mtok and output_mtok are required"),
        ({"output_mtok": None}, "input_mtok and output_mtok are required"),
        ({"input_mtok": True}, "input_mtok must be a decimal string, got bool"),
        ({"input_mtok": [1]}, "input_mtok must be a decimal string, got list"),
        ({"input_mtok": {"usd": 1}}, "input_mtok must be a decimal string, got dict"),
        ({"tenant_id": ...}, "tenant_id must be a string, got nothing"),
        ({"tenant_id": 42}, "tenant_id must be a string, got int"),
        ({"tenant_id": ""}, "tenant_id must be 1-200 characters"),
        ({"model": "m" * 201}, "model must be 1-200 characters"),
        ({"provider": "open\x00ai"}, "provider: control character U+0000 at position 4"),
        ({"model": "gpt\ud800"}, "model: lone surrogate U+D800 at position 3"),
        ({"effective_from": ...}, "effective_from must be an ISO 8601 string"),
        ({"effective_from": 1754006400}, "effective_from must be an ISO 8601 string"),
        ({"effective_from": "next tuesday"}, "effective_from: 'next tuesday' is not an ISO 8601 timestamp"),
        ({"effective_from": "2025-08-01T00:00:00"}, "effective_from needs a time zone"),
    ],
)
def test_bad_values_are_value_errors_that_name_the_field(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_override("ovr-1", record(**changes))
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xfe not json", "not JSON"),
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[1, 2]", "JSON object, got list"),
        (b'"acme"', "JSON object, got str"),
        (b"null", "JSON object, got NoneType"),
        (record()[:-1] + b', "input_mtok": NaN}', "input_mtok must be a finite amount"),
    ],  # Python's json reads NaN
)
def test_bytes_that_are_not_an_override_object_are_value_errors(value: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_override("ovr-1", value)


@pytest.mark.parametrize("key", ["", "ovr\x00", "ovr\x9f"])
def test_the_override_id_is_printable_text(key: str) -> None:
    with pytest.raises(ValueError, match="override id"):
        parse_override(key, record())


def test_amounts_keep_the_rules_for_every_caller() -> None:
    assert config_amount(Decimal("0.10"), "x", positive=True, below=MAX_RATE) == Decimal("0.10")
    assert str(config_amount("-0", "x", positive=False, below=MAX_RATE)) == "0"
    with pytest.raises(ValueError, match="x must be more than zero"):
        config_amount("0", "x", positive=True, below=MAX_RATE)
    with pytest.raises(ValueError, match="x must be below 1,000,000"):
        config_amount(MAX_RATE, "x", positive=True, below=MAX_RATE)
    with pytest.raises(ValueError, match=r"x: '123456789012345678901234567890123456\.\.\. is not"):
        config_amount("1234567890" * 10 + "x", "x", positive=True, below=MAX_RATE)  # a long value is cut short
