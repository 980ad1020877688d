"""Avro encoding of every topic's records, with the writer schema named in each record.

Records use Avro single-object encoding: the two marker bytes ``C3 01``, the 8-byte little-endian
CRC-64-AVRO fingerprint of the writer schema's canonical form, then the Avro binary body. A reader
looks the fingerprint up among every version shipped in ``schemas/`` and resolves it against the
newest version of that record, so records written by older schemas keep decoding (backward
compatibility). Schemas live in ``schemas/<name>.v<N>.avsc``.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Context, Decimal
from importlib import resources
from typing import Any

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

MAGIC = b"\xc3\x01"
HEADER_LEN = 10


class SchemaDecodeError(ValueError):
    """Bytes that are not a record of a known schema."""


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    parsed: Any
    fingerprint: bytes  # 8 bytes, little-endian, as written in the header


def _load() -> dict[str, list[SchemaVersion]]:
    found: dict[str, list[SchemaVersion]] = {}
    for entry in resources.files("schemas").iterdir():
        if not entry.name.endswith(".avsc"):
            continue
        name, version_text, _ = entry.name.rsplit(".", 2)
        raw = json.loads(entry.read_text())
        parsed = parse_schema(raw, _force=True)
        canonical = to_parsing_canonical_form(parsed)
        fp = int(fingerprint(canonical, "CRC-64-AVRO"), 16).to_bytes(8, "big")[::-1]
        found.setdefault(name, []).append(SchemaVersion(name, int(version_text.lstrip("v")), parsed, fp))
    for versions in found.values():
        versions.sort(key=lambda v: v.version)
    return found


SCHEMAS = _load()
_BY_FINGERPRINT = {v.fingerprint: v for versions in SCHEMAS.values() for v in versions}

# ---------------------------------------------------------------- the compiled reader of flat records
# fastavro interprets the schema for every record it reads (~12 µs a usage event, half of stage 1's
# decoding). ``schemas/_flat_avro.c`` reads records whose fields are all of a few kinds from a program
# made once per schema (~2 µs), and is used for the newest version of such records (no resolution
# needed); others, and every record where the extension could not be compiled, stay with fastavro.
try:
    from schemas import _flat_avro
except ImportError:  # pragma: no cover - setup.py builds it as optional
    _flat_avro = None  # type: ignore[assignment]

_FIELD_KINDS: dict[str, int] = {
    '"string"': 1,
    '"long"': 2,
    '{"logicalType": "timestamp-micros", "type": "long"}': 3,
    '["null", "string"]': 4,
    '["null", "long"]': 5,
    '"boolean"': 6,
    '{"type": "map", "values": "string"}': 7,
    '{"type": "map", "values": "long"}': 8,
}


def _flat_program(schema: Any) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
    """Field names and kinds for ``_flat_avro.read``, or None when a field is of another kind."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    names, kinds = [], []
    for field in schema["fields"]:
        kind = _FIELD_KINDS.get(json.dumps(field["type"], sort_keys=True))
        if kind is None:
            return None
        names.append(field["name"])
        kinds.append(kind)
    return tuple(names), tuple(kinds)


_FLAT_PROGRAMS: dict[bytes, tuple[tuple[str, ...], tuple[int, ...]]] = {}
if _flat_avro is not None:
    for _versions in SCHEMAS.values():
        _program = _flat_program(_versions[-1].parsed)
        if _program is not None:
            _FLAT_PROGRAMS[_versions[-1].fingerprint] = _program


def compiled_reader_for(name: str) -> bool:
    """Whether the newest version of ``name`` is read by the compiled reader here."""
    return latest(name).fingerprint in _FLAT_PROGRAMS


def latest(name: str) -> SchemaVersion:
    return SCHEMAS[name][-1]


def encode(name: str, record: dict[str, Any], version: int | None = None) -> bytes:
    """Encode ``record`` with the newest (or the given) version of schema ``name``."""
    schema = latest(name) if version is None else next(v for v in SCHEMAS[name] if v.version == version)
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(schema.fingerprint)
    schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def writer_of(data: bytes) -> SchemaVersion:
    if len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise SchemaDecodeError("not Avro single-object encoding (missing C3 01 marker)")
    schema = _BY_FINGERPRINT.get(data[2:HEADER_LEN])
    if schema is None:
        (fp,) = struct.unpack("<Q", data[2:HEADER_LEN])
        raise SchemaDecodeError(f"unknown writer schema fingerprint {fp:016x}")
    return schema


def decode(name: str, data: bytes) -> dict[str, Any]:
    """Decode a record of schema ``name`` written by any shipped version, read as the newest version."""
    writer = writer_of(data)
    if writer.name != name:
        raise SchemaDecodeError(f"record was written with schema {writer.name!r}, expected {name!r}")
    program = _FLAT_PROGRAMS.get(writer.fingerprint)
    if program is not None:
        try:
            flat, end = _flat_avro.read(data, HEADER_LEN, *program)
        except Exception as exc:  # truncated or corrupt body
            raise SchemaDecodeError(f"corrupt {name} v{writer.version} record: {type(exc).__name__}: {exc}") from None
        if end != len(data):
            raise SchemaDecodeError(f"trailing bytes after a {name} v{writer.version} record")
        return flat
    body = io.BytesIO(data[HEADER_LEN:])
    try:
        record = schemaless_reader(body, writer.parsed, latest(name).parsed)
    except Exception as exc:  # truncated or corrupt body
        # No repr: it can hold object addresses, and the same bytes must always give the same reason.
        detail = re.sub(r" at 0x[0-9a-f]+", "", f"{type(exc).__name__}: {exc}")
        raise SchemaDecodeError(f"corrupt {name} v{writer.version} record: {detail}") from None
    if body.tell() != len(data) - HEADER_LEN:
        raise SchemaDecodeError(f"trailing bytes after a {name} v{writer.version} record")
    if not isinstance(record, dict):
        raise SchemaDecodeError(f"{name} record decoded to {type(record).__name__}")
    return record


# ---------------------------------------------------------------- a faster writer for the hot topics
# fastavro interprets the schema for every record it writes (~14 µs for a usage event, ~25 µs for a
# priced event). The hot records use a handful of types, so we build a writer once per schema out of
# small closures: about half the time, the same bytes (property-tested). Reading stays with fastavro:
# a pure-Python reader was no faster.
Writer = Callable[[bytearray, Any], None]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _zigzag(out: bytearray, n: int) -> None:
    if 0 <= n < 64:  # most counts, lengths and flags: one byte
        out.append(n << 1)
        return
    n = (n << 1) ^ (n >> 63)
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _write_string(out: bytearray, value: str) -> None:
    data = value.encode()
    _zigzag(out, len(data))
    out += data


def _write_bytes(out: bytearray, value: bytes) -> None:
    _zigzag(out, len(value))
    out += value


def _write_timestamp_micros(out: bytearray, value: Any) -> None:
    if isinstance(value, datetime):
        value = (value - _EPOCH) // _MICROSECOND
    _zigzag(out, value)


def _write_boolean(out: bytearray, value: bool) -> None:
    out.append(1 if value else 0)


def _write_string_map(out: bytearray, value: dict[str, str]) -> None:
    if value:
        _zigzag(out, len(value))
        for key, item in value.items():
            _write_string(out, key)
            _write_string(out, item)
    out.append(0)


def _write_long_map(out: bytearray, value: dict[str, int]) -> None:
    if value:
        _zigzag(out, len(value))
        for key, item in value.items():
            _write_string(out, key)
            _zigzag(out, item)
    out.append(0)


_EXACT = Context(prec=100, Emax=MAX_EMAX, Emin=MIN_EMIN)  # wide enough that scaling never rounds


def _decimal_writer(scale: int) -> Writer:
    def write(out: bytearray, value: Decimal) -> None:
        # An integer after scaling (compared exactly), not by its exponent: as_tuple() took twice the time.
        scaled = value.scaleb(scale, _EXACT) if value.is_finite() else None
        if scaled is None or scaled != (unscaled := int(scaled)):
            raise ValueError(f"{value} has more than {scale} decimal places")
        data = unscaled.to_bytes((unscaled.bit_length() + 8) // 8 or 1, "big", signed=True)
        _write_bytes(out, data)

    return write


write_string = _write_string  # for writers of one schema's fixed layout (``streams.meter.priced_message``)


_ROUNDING_38 = Context(prec=38, Emax=MAX_EMAX, Emin=MIN_EMIN)  # Avro decimal(38, s) and Postgres numeric(38, 12)


def write_rounded_decimal(out: bytearray, value: Decimal, scale: int) -> None:
    """Append ``value`` rounded half away from zero to ``scale`` places (as ``schemas.records.money`` and
    Postgres' numeric do) in Avro's decimal encoding of that scale, precision 38: one rounding, then an
    exact scaling, where ``money`` and the decimal writer took two steps (stage 1 writes three per event).
    More than 38 digits after rounding raises (``decimal.InvalidOperation``), as the ledger would refuse it."""
    rounded = value.quantize(_STEPS[scale], ROUND_HALF_UP, _ROUNDING_38)
    unscaled = int(rounded.scaleb(scale, _EXACT))
    _write_bytes(out, unscaled.to_bytes((unscaled.bit_length() + 8) // 8 or 1, "big", signed=True))


_STEPS = {scale: Decimal(1).scaleb(-scale) for scale in range(39)}


def _array_writer(item_writer: Writer) -> Writer:
    def write(out: bytearray, values: list[Any]) -> None:
        if values:
            _zigzag(out, len(values))
            for value in values:
                item_writer(out, value)
        out.append(0)

    return write


def _enum_writer(symbols: list[str]) -> Writer:
    index = {symbol: i for i, symbol in enumerate(symbols)}
    return lambda out, value: _zigzag(out, index[value])


def _record_writer_of(fields: list[dict[str, Any]], where: str) -> Writer:
    plan: list[tuple[str, Any, bool, Writer]] = []
    for field in fields:
        field_type = field["type"]
        nullable = isinstance(field_type, list)
        if nullable:
            if len(field_type) != 2 or field_type[0] != "null":
                raise NotImplementedError(f"no fast writer for union {field_type!r}")
            field_type = field_type[1]
        plan.append((field["name"], field.get("default", _REQUIRED), nullable, _writer_for(field_type, where)))

    def write(out: bytearray, record: dict[str, Any]) -> None:
        get = record.get
        for field_name, default, nullable, writer in plan:
            value = get(field_name, default)
            if nullable:
                if value is None:
                    out.append(0)
                    continue
                out.append(2)  # zigzag(1): the second branch of ["null", X]
            elif value is _REQUIRED:
                raise ValueError(f"{where}: field {field_name!r} is required")
            writer(out, value)

    return write


def _writer_for(field_type: Any, where: str) -> Writer:
    simple: dict[str, Writer] = {
        "string": _write_string,
        "long": _zigzag,
        "int": _zigzag,
        "boolean": _write_boolean,
        "bytes": _write_bytes,
    }
    if isinstance(field_type, str) and field_type in simple:
        return simple[field_type]
    if isinstance(field_type, dict):
        logical, kind = field_type.get("logicalType"), field_type.get("type")
        if logical == "timestamp-micros":
            return _write_timestamp_micros
        if logical == "decimal" and kind == "bytes":
            return _decimal_writer(field_type.get("scale", 0))
        if kind == "map" and field_type.get("values") == "string":
            return _write_string_map
        if kind == "map" and field_type.get("values") == "long":
            return _write_long_map
        if kind == "enum":
            return _enum_writer(field_type["symbols"])
        if kind == "record":
            return _record_writer_of(field_type["fields"], where)
        if kind == "array":
            return _array_writer(_writer_for(field_type["items"], where))
    raise NotImplementedError(f"no fast writer for {field_type!r}")


def record_writer(name: str) -> Callable[[dict[str, Any]], bytes]:
    """A writer for the newest version of schema ``name``; same bytes as ``encode(name, record)``.

    Covers string, long, int, boolean, bytes, timestamp-micros, decimal, enums, string and long maps, arrays,
    nested records and ``["null", X]`` unions. Fields missing from the record take their schema default.
    """
    schema = latest(name)
    write_record = _record_writer_of(schema.parsed["fields"], name)
    header = MAGIC + schema.fingerprint

    def write(record: dict[str, Any]) -> bytes:
        out = bytearray(header)
        write_record(out, record)
        return bytes(out)

    return write


def record_writer_after_first(name: str) -> Callable[[bytes, dict[str, Any]], bytes]:
    """A writer for the newest version of schema ``name`` given its first field already encoded: Avro
    writes a record as its fields' encodings one after another, so ``write(first, rest)`` is
    ``encode(name, {first field: value, **rest})`` when ``first`` is that value's encoding."""
    schema = latest(name)
    write_rest = _record_writer_of(schema.parsed["fields"][1:], name)
    header = MAGIC + schema.fingerprint

    def write(first: bytes, rest: dict[str, Any]) -> bytes:
        out = bytearray(header)
        out += first
        write_rest(out, rest)
        return bytes(out)

    return write


_REQUIRED = object()
