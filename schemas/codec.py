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
import struct
from dataclasses import dataclass
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
    body = io.BytesIO(data[HEADER_LEN:])
    try:
        record = schemaless_reader(body, writer.parsed, latest(name).parsed)
    except Exception as exc:  # truncated or corrupt body
        raise SchemaDecodeError(f"corrupt {name} v{writer.version} record: {exc!r}") from None
    if body.tell() != len(data) - HEADER_LEN:
        raise SchemaDecodeError(f"trailing bytes after a {name} v{writer.version} record")
    if not isinstance(record, dict):
        raise SchemaDecodeError(f"{name} record decoded to {type(record).__name__}")
    return record
