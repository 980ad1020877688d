"""Every declared schema round-trips (property-based), and older writers still decode."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec

_TEXT = st.text(max_size=40)
_TIMESTAMPS = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))


def strategy_for(schema: Any) -> st.SearchStrategy[Any]:
    """A hypothesis strategy producing values valid for an Avro schema (as parsed by fastavro)."""
    if isinstance(schema, list):
        return st.one_of(*(strategy_for(branch) for branch in schema))
    if isinstance(schema, str):
        return {
            "null": st.none(),
            "string": _TEXT,
            "long": st.integers(-(2**63), 2**63 - 1),
            "int": st.integers(-(2**31), 2**31 - 1),
            "boolean": st.booleans(),
            "bytes": st.binary(max_size=40),
        }[schema]
    logical = schema.get("logicalType")
    if logical == "timestamp-micros":
        return _TIMESTAMPS
    if logical == "decimal":
        scale = schema["scale"]
        return st.decimals(
            min_value=Decimal(-(10**20)), max_value=Decimal(10**20), places=scale, allow_nan=False, allow_infinity=False
        )
    kind = schema["type"]
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: strategy_for(f["type"]) for f in schema["fields"]})
    if kind == "map":
        return st.dictionaries(_TEXT, strategy_for(schema["values"]), max_size=4)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "array":
        return st.lists(strategy_for(schema["items"]), max_size=4)
    return strategy_for(kind)


ALL_VERSIONS = [v for versions in codec.SCHEMAS.values() for v in versions]


@pytest.mark.parametrize("version", ALL_VERSIONS, ids=lambda v: f"{v.name}.v{v.version}")
def test_round_trip(version: codec.SchemaVersion) -> None:
    @settings(max_examples=60, deadline=None)
    @given(strategy_for(version.parsed))
    def check(record: dict[str, Any]) -> None:
        data = codec.encode(version.name, record, version=version.version)
        assert data[:2] == codec.MAGIC
        assert codec.writer_of(data) == version
        decoded = codec.decode(version.name, data)
        assert _holds(decoded, record)

    check()


def _holds(decoded: Any, written: Any) -> bool:
    """``decoded`` has everything ``written`` had: a newer reader adds defaulted fields, nested records too."""
    if isinstance(written, dict) and isinstance(decoded, dict):  # a record (or a map: the same keys come back)
        return all(key in decoded and _holds(decoded[key], value) for key, value in written.items())
    return bool(decoded == written)


def test_every_topic_has_a_schema() -> None:
    assert {"usage_event", "priced_event", "dead_letter", "alert", "rollup"} <= set(codec.SCHEMAS)


def test_v1_usage_record_decodes_with_v2_defaults() -> None:
    old = {
        "event_id": "e-1",
        "timestamp": datetime(2025, 5, 1, tzinfo=UTC),
        "tenant_id": "acme",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 10,
        "output_tokens": 2,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "user_id": None,
        "feature": "search",
        "environment": None,
        "trace_id": None,
        "request_id": None,
        "latency_ms": None,
        "status": None,
    }
    data = codec.encode("usage_event", old, version=1)
    assert codec.writer_of(data).version == 1
    decoded = codec.decode("usage_event", data)
    assert decoded["feature"] == "search"
    assert decoded["tags"] == {} and decoded["estimated"] is False and decoded["session_id"] is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{}", "missing C3 01"),
        (b"\xc3\x01" + b"\x00" * 8 + b"x", "unknown writer schema"),
    ],
)
def test_undecodable_bytes_raise_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(codec.SchemaDecodeError, match=reason):
        codec.decode("usage_event", data)


def rollup_record(cost: Decimal = Decimal("1.5")) -> dict[str, Any]:
    return {
        "tenant_id": "t",
        "dimension": "tenant",
        "dimension_value": "t",
        "granularity": "day",
        "window_start": datetime(2025, 1, 1, tzinfo=UTC),
        "calls": 1,
        "unpriced_calls": 0,
        "input_tokens": 1,
        "output_tokens": 1,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "cost": cost,
    }


def test_truncated_and_padded_records_are_rejected() -> None:
    record = rollup_record()
    data = codec.encode("rollup", record)
    with pytest.raises(codec.SchemaDecodeError, match="corrupt"):
        codec.decode("rollup", data[:-3])
    with pytest.raises(codec.SchemaDecodeError, match="trailing"):
        codec.decode("rollup", data + b"\x00")
    with pytest.raises(codec.SchemaDecodeError, match="expected 'usage_event'"):
        codec.decode("usage_event", data)


@pytest.mark.parametrize("name", sorted(codec.SCHEMAS))
def test_fast_writer_writes_the_same_bytes_as_fastavro(name: str) -> None:
    write = codec.record_writer(name)

    @settings(max_examples=80, deadline=None)
    @given(strategy_for(codec.latest(name).parsed))
    def check(record: dict[str, Any]) -> None:
        assert write(record) == codec.encode(name, record)

    check()


def test_fast_writer_fills_defaults_and_refuses_missing_fields() -> None:
    write = codec.record_writer("usage_event")
    minimal = {
        "event_id": "e",
        "timestamp": 1_700_000_000_000_000,
        "tenant_id": "t",
        "provider": "p",
        "model": "m",
        "input_tokens": 3,
        "output_tokens": 1,
    }
    assert write(minimal) == codec.encode("usage_event", minimal)
    with pytest.raises(ValueError, match="'event_id' is required"):
        write({})


@pytest.mark.parametrize("cost", ["1E+5", "-0.000000000001", "-0", "123456789012345678.123456789012", "1.500"])
def test_fast_writer_writes_exact_decimals_of_any_form_as_fastavro_does(cost: str) -> None:
    record = rollup_record(Decimal(cost))
    assert codec.record_writer("rollup")(record) == codec.encode("rollup", record)
    # A zero written with more places than the scale is still exactly zero (fastavro refuses that form).
    zero = codec.record_writer("rollup")({**record, "cost": Decimal("0E-20")})
    assert codec.decode("rollup", zero)["cost"] == 0


@pytest.mark.parametrize("cost", ["0.0000000000001", "1.0000000000005", "NaN", "Infinity", "-Infinity", "sNaN"])
def test_fast_writer_refuses_decimals_its_scale_cannot_hold_exactly(cost: str) -> None:
    with pytest.raises(ValueError, match="decimal places"):
        codec.record_writer("rollup")(rollup_record(Decimal(cost)))
