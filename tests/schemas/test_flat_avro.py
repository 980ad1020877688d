"""The compiled reader of flat records (schemas/_flat_avro.c) against fastavro, the reference: equal
records for any valid record, and for any bytes either both refuse or both read the same record."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastavro import schemaless_reader
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import codec

USAGE = codec.latest("usage_event")
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=40)  # any code point but surrogates: control characters, astral planes


def reference(data: bytes) -> dict[str, Any] | None:
    """fastavro's reading of a usage_event body (None: it refuses), with the codec's trailing-bytes rule."""
    body = io.BytesIO(data[codec.HEADER_LEN :])
    try:
        record = schemaless_reader(body, USAGE.parsed, USAGE.parsed)
    except Exception:
        return None
    return record if body.tell() == len(data) - codec.HEADER_LEN else None


def compiled(data: bytes) -> dict[str, Any] | None:
    try:
        return codec.decode("usage_event", data)
    except codec.SchemaDecodeError:
        return None


@st.composite
def usage_records(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for field in USAGE.parsed["fields"]:
        kind = codec._FIELD_KINDS[codec.json.dumps(field["type"], sort_keys=True)]
        strategy: st.SearchStrategy[Any] = {
            1: TEXT,
            2: INT64,
            3: st.integers(-62_135_596_800_000_000, 253_402_300_799_999_999).map(
                lambda us: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
            ),
            4: st.none() | TEXT,
            5: st.none() | INT64,
            6: st.booleans(),
            7: st.dictionaries(TEXT, TEXT, max_size=4),
            8: st.dictionaries(TEXT, INT64, max_size=4),
        }[kind]
        record[field["name"]] = draw(strategy)
    return record


def test_the_compiled_reader_is_built_and_reads_usage_events() -> None:
    assert codec.compiled_reader_for("usage_event"), "schemas/_flat_avro.c was not compiled (see setup.py)"


@settings(max_examples=400, deadline=None)
@given(usage_records())
def test_any_valid_record_reads_as_fastavro_reads_it(record: dict[str, Any]) -> None:
    data = codec.encode("usage_event", record)
    assert compiled(data) == reference(data) == record


@settings(max_examples=400, deadline=None)
@given(usage_records(), st.data())
def test_damaged_records_are_refused_or_read_exactly_as_fastavro_does(
    record: dict[str, Any], data: st.DataObject
) -> None:
    encoded = bytearray(codec.encode("usage_event", record))
    damage = data.draw(st.sampled_from(["truncate", "flip", "insert", "append"]))
    at = data.draw(st.integers(codec.HEADER_LEN, len(encoded)))
    if damage == "truncate":
        del encoded[at:]
    elif damage == "flip" and at < len(encoded):
        encoded[at] = data.draw(st.integers(0, 255))
    elif damage == "insert":
        encoded[at:at] = data.draw(st.binary(min_size=1, max_size=12))
    else:
        encoded += data.draw(st.binary(min_size=1, max_size=4))
    assert compiled(bytes(encoded)) == reference(bytes(encoded))


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_after_the_header_are_refused_or_read_as_fastavro_does(body: bytes) -> None:
    data = codec.MAGIC + USAGE.fingerprint + body
    assert compiled(data) == reference(data)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\xff" * 10 + b"\x01", -(2**63)),  # varint bits past 64 dropped, as fastavro does
        (b"\x01", -1),
        (b"\x02", 1),
    ],
)
def test_longs_at_the_edges(body: bytes, expected: int) -> None:
    record = codec.decode("usage_event", codec.encode("usage_event", _minimal()))
    prefix = codec.encode("usage_event", {**record, "input_tokens": 0})
    # input_tokens is the sixth field; rebuild the record around the varint under test
    head = prefix[: prefix.index(b"gpt-4o") + len(b"gpt-4o")]
    tail = prefix[len(head) + 1 :]
    data = head + body + tail
    assert compiled(data) == reference(data)
    assert compiled(data)["input_tokens"] == expected  # type: ignore[index]


def _minimal() -> dict[str, Any]:
    fields = {f["name"]: None for f in USAGE.parsed["fields"]}
    fields.update(
        event_id="e1",
        timestamp=datetime(2026, 11, 26, tzinfo=UTC),
        tenant_id="acme",
        provider="openai",
        model="gpt-4o",
        input_tokens=0,
        output_tokens=0,
        cache_read_tokens=0,
        cache_write_tokens=0,
        estimated=False,
        tags={},
        usage_details={},
    )
    return fields


def test_a_map_block_count_of_the_most_negative_long_is_refused_like_fastavro_does() -> None:
    """-count of INT64_MIN overflows in C; both readers must refuse the record (it cannot hold 2^63 entries)."""
    whole = codec.encode("usage_event", _minimal())
    tags_at = (
        len(whole) - 6
    )  # one byte each: tags, service_tier, processing, cache_write_1h_tokens, usage_details, api_key_id
    assert whole[tags_at] == 0  # the empty tags map's end-of-blocks count
    data = whole[:tags_at] + b"\xff" * 9 + b"\x01" + b"\x02" + whole[tags_at + 1 :]  # count -2^63, block size 1
    assert compiled(data) is None and reference(data) is None
