"""Issue 11: a fuzz run through a real worker (DESIGN.md §4.1, §4.2, §4.6).

About 11,000 generated payloads (valid events of several providers, odd but valid ones, duplicates,
every kind of broken input, byte-level mutations of valid JSON and Avro) go onto an isolated
``usage.raw`` in one shuffled stream with mixed keys. Then:

- the worker is alive, was started once, and its log shows no stage 1 restart and no failed batch;
  a separate, stricter test wants no traceback at all (a stage that bills nothing and fails on a
  valid record still skips alerting for everything in that batch);
- ``wait_for_sinks`` drains, and stage 2 then catches up on ``metering.rollups``;
- every payload is either billed exactly once (its ``event_id`` in the ledger once, ``total_cost``
  equal to ``genai_prices.calc_price`` at the event's timestamp, computed here, never by the project's
  pricing) or dead-lettered once on ``usage.dlq`` with a short, non-empty reason and its original
  bytes (or, over the size limit, a prefix of them);
- a control tenant's invoices (``tokenmeter invoice`` JSON) equal the genai-prices sum exactly.

Which payloads are valid is decided by ``schemas.events.decode_usage`` (valid if it returns, invalid
if it raises) plus the documented 64 KiB limit of the raw topic: mutations can stay valid, so the
generator's intent cannot be the oracle. What the generator built to break a rule of DESIGN.md §1
(``must_reject``) is checked against that oracle separately, without the stack.

The payloads depend only on ``TOKENMETER_FUZZ_SEED`` (default below), the run's unique tag and the
clock (timestamps are relative to now), so a failure reproduces with the same seed;
``python -m tests.streams.test_fuzz_worker`` prints the mix without the stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import genai_prices
import psycopg
import pytest
from confluent_kafka import KafkaError, Message, Producer

from deploy.isolation import WorkerProcess, env_for, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas import codec
from schemas.events import InvalidEvent, UsageEvent, decode_usage
from streams.lag import wait_for_sinks
from streams.pipeline import MAX_RAW_BYTES
from tests.helpers import read_all

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("TOKENMETER_FUZZ_SEED", "20250611"))
DRAIN_TIMEOUT_S = 120.0  # ~10 s of work for a healthy worker; a stuck batch never drains
STAGE_TWO_TIMEOUT_S = 60.0  # then stage 2 (Faust) must have read every rollup batch stage 1 wrote
MAX_REASON_CHARS = 4096  # "a few KB"

MODELS = [
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("anthropic", "claude-3-5-haiku"),
    ("google", "gemini-2.5-flash"),
]
UNKNOWN_MODELS = [
    ("acme-ai", "mystery-9"),
    ("openai", "gpt-99-ultra"),
    ("anthropic", "claude-🦄-opus"),
    ("google", "gemini-∞"),
    ("mistral-ish", "m-42"),
]
CONTROL_CHARS = ["\u0000", "\x1f", "\x7f", "\x85"]
NAME_FIELDS = ["tenant_id", "feature", "user_id", "model", "event_id", "provider"]
TOKEN_FIELDS = ["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"]
REQUIRED = ["event_id", "timestamp", "tenant_id", "provider", "model", "input_tokens", "output_tokens"]
OFFSETS = [
    timedelta(0),
    timedelta(hours=5, minutes=30),
    timedelta(hours=-8),
    timedelta(hours=14),
    timedelta(hours=-12),
    timedelta(hours=1),
]
UNICODE_BITS = ["🦄💸", "שלום", "مرحبا\u200f", "租户", "テナント", "👩\u200d💻", "Ünïcødé", "ĳ-ß-ﬃ", "𝔘𝔫𝔦"]
SCALE = Decimal("1e-12")  # the ledger keeps 12 decimal places (numeric(38, 12)), rounding half away from zero


# ---------------------------------------------------------------- payloads and the oracles
@dataclass
class Payload:
    kind: str  # the generator's class, e.g. "valid.json", "invalid.control-char.avro", "mutation.avro"
    value: bytes | None
    key: bytes | None = None
    must_reject: bool = False  # built to break a rule of DESIGN.md §1 (not a mutation, not random bytes)
    event: UsageEvent | None = None  # the oracle: decoded and valid
    reject_reason: str = ""  # the oracle: why not
    oracle_crash: str = ""  # decode_usage raised something other than InvalidEvent
    partition: int = -1
    offset: int = -1

    def describe(self) -> str:
        shown = repr(self.value[:160]) if self.value is not None else "None"
        size = -1 if self.value is None else len(self.value)
        return f"{self.kind} @{self.partition}/{self.offset} ({size} B): {shown}"


def classify(payload: Payload) -> None:
    """The classification oracle: decode_usage, plus the documented 64 KiB limit and null values."""
    value = payload.value
    if value is None:
        payload.reject_reason = "null value"
        return
    if len(value) > MAX_RAW_BYTES:
        payload.reject_reason = f"{len(value)} bytes is over the {MAX_RAW_BYTES} byte limit"
        return
    try:
        payload.event = decode_usage(value)
    except InvalidEvent as exc:
        payload.reject_reason = exc.reason or "(InvalidEvent without a reason)"
    except Exception as exc:  # the worker dead-letters these too; the contract test reports them
        payload.reject_reason = payload.oracle_crash = repr(exc)


def money(value: Decimal) -> Decimal:
    return value.quantize(SCALE, rounding=ROUND_HALF_UP)


@dataclass(frozen=True)
class Expected:
    status: str  # priced | unpriced
    total_cost: Decimal
    note: str = ""


_PRICE_CACHE: dict[tuple[Any, ...], Expected] = {}


def genai_cost(event: UsageEvent) -> Expected:
    """The cost of one event straight from genai-prices at its own timestamp (not streams.pricing)."""
    counts: dict[str, int] = {
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_tokens": event.cache_write_tokens,
    }
    for name in ("input_audio_tokens", "output_audio_tokens", "input_image_tokens"):
        if getattr(event, name):
            counts[name] = getattr(event, name)
    cache_key = (event.provider, event.model, event.timestamp, *sorted(counts.items()))
    if cache_key in _PRICE_CACHE:
        return _PRICE_CACHE[cache_key]
    try:
        price = genai_prices.calc_price(
            genai_prices.Usage(**counts),
            event.model,
            provider_id=event.provider,
            genai_request_timestamp=event.timestamp,
        )
        expected = Expected("priced", money(price.total_price))
    except LookupError as exc:  # an unknown provider or model: unpriced, $0, counted
        expected = Expected("unpriced", Decimal(0), f"unknown: {exc}")
    except Exception as exc:  # a usage the price table cannot bill: unpriced too (README, pricing)
        expected = Expected("unpriced", Decimal(0), f"genai-prices cannot price it: {exc!r}")
    _PRICE_CACHE[cache_key] = expected
    return expected


# ---------------------------------------------------------------- the generator
class Fuzz:
    def __init__(self, seed: int, tag: str, now: datetime) -> None:
        self.rng = random.Random(seed)
        self.tag = tag
        self.now = now
        self.serial = 0
        r = self.rng
        prefix = f"fz{tag}"
        self.tenants = [f"{prefix}-t{i}" for i in range(6)]
        self.tenants += [f"{prefix}-{bit}" for bit in UNICODE_BITS]
        self.tenants += [
            (f"{prefix}-" + "x" * 200)[:200],  # exactly 200 characters
            f"{prefix}-" + "😀" * (200 - len(prefix) - 1),  # 200 characters, 4 UTF-8 bytes each
            f"{prefix}-" + "ש" * (200 - len(prefix) - 1),
            f"{prefix}-" + "".join(r.choice("租户テナント") for _ in range(200 - len(prefix) - 1)),
        ]
        assert all(len(t) <= 200 for t in self.tenants)
        self.control_tenant = f"{prefix}-control"

    # ---- pieces
    def event_id(self) -> str:
        self.serial += 1
        base = f"fz{self.tag}-{self.serial}"
        roll = self.rng.random()
        if roll < 0.03:
            return (base + "-" + "🆔" * 200)[:200]
        if roll < 0.06:
            return f"{base}-{self.rng.choice(UNICODE_BITS)}"
        return base

    def label(self, stem: str) -> str:
        r = self.rng
        roll = r.random()
        if roll < 0.1:
            return f"{stem}-{r.choice(UNICODE_BITS)}"
        if roll < 0.13:
            return (f"{stem}-" + r.choice(["a", "é", "😀", "中"]) * 200)[:200]
        return f"{stem}-{r.randint(1, 12)}"

    def tokens(self) -> int:
        r = self.rng
        roll = r.random()
        if roll < 0.05:
            return 0
        if roll < 0.10:
            return 1
        if roll < 0.13:
            return 10**12
        if roll < 0.16:
            return r.randint(10**9, 10**12)
        if roll < 0.25:
            return r.randint(200_000, 2_000_000)  # across the 200k-token tiers
        if roll < 0.60:
            return r.randint(1_000, 200_000)
        return r.randint(2, 1_000)

    def when(self) -> datetime:
        r = self.rng
        roll = r.random()
        if roll < 0.01:
            return self.now + timedelta(hours=r.uniform(0, 20))  # a little ahead: within the 24 h slack
        if roll < 0.012:
            return r.choice([datetime(2015, 1, 1, tzinfo=UTC), datetime(2016, 2, 29, 12, tzinfo=UTC)])
        return self.now - timedelta(seconds=r.uniform(0, 120 * 86_400))

    def stamp(self, moment: datetime) -> str:
        r = self.rng
        local = moment.astimezone(timezone(r.choice(OFFSETS)))
        if r.random() < 0.3:
            local = local.replace(microsecond=0)
        text = local.isoformat()
        return text.replace("+00:00", "Z") if r.random() < 0.5 else text

    def tags(self) -> dict[str, str]:
        r = self.rng
        roll = r.random()
        if roll < 0.03:  # the most allowed: 32 tags of the longest keys and values
            return {f"k{i:02d}-" + "é" * 60: "v" * 256 for i in range(32)}
        if roll < 0.06:
            return {f"{r.choice(UNICODE_BITS)}{i}": r.choice(UNICODE_BITS) for i in range(r.randint(1, 32))}
        if roll < 0.3:
            return {f"tag{i}": f"value-{r.randint(0, 99)}" for i in range(r.randint(1, 4))}
        return {}

    def valid(self, tenant: str | None = None, moment: datetime | None = None, known: bool = False) -> dict[str, Any]:
        """A valid event as a JSON-ready dict (timestamp as text); ``known``: a priced model, no media tokens."""
        r = self.rng
        provider, model = r.choice(UNKNOWN_MODELS) if not known and r.random() < 0.05 else r.choice(MODELS)
        if not known and r.random() < 0.03:
            model = model.upper()  # genai-prices matches model names without case
        input_tokens = self.tokens()
        cache_read = r.randint(0, input_tokens) if r.random() < 0.3 else 0
        cache_write = r.randint(0, input_tokens - cache_read) if r.random() < 0.15 else 0
        output_tokens = self.tokens()
        event: dict[str, Any] = {
            "event_id": self.event_id(),
            "timestamp": self.stamp(moment or self.when()),
            "tenant_id": tenant or r.choice(self.tenants),
            "provider": provider,
            "model": model,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
        }
        if cache_read or r.random() < 0.1:
            event["cache_read_tokens"] = cache_read
        if cache_write or r.random() < 0.1:
            event["cache_write_tokens"] = cache_write
        optional: list[tuple[str, Callable[[], object]]] = [
            ("user_id", lambda: self.label("user")),
            ("feature", lambda: self.label("feature")),
            ("environment", lambda: r.choice(["prod", "staging", "dev", "prød"])),
            ("trace_id", lambda: f"trace-{r.randint(1, 500)}"),
            ("session_id", lambda: f"sess-{r.randint(1, 500)}"),
            ("team_id", lambda: self.label("team")),
            ("request_id", lambda: uuid.UUID(int=r.getrandbits(128)).hex),
            ("latency_ms", lambda: r.choice([0, r.randint(1, 60_000), 86_400_000])),
            ("status", lambda: r.choice(["ok", "error", "timeout"])),
            ("reasoning_tokens", lambda: r.randint(0, output_tokens)),
            ("estimated", lambda: r.random() < 0.5),
        ]
        for name, make in optional:
            if r.random() < 0.35:
                event[name] = make()
        if not known and r.random() < 0.02 and input_tokens - cache_read - cache_write > 0:
            event["input_audio_tokens"] = r.randint(1, input_tokens - cache_read - cache_write)
        tags = self.tags()
        if tags:
            event["tags"] = tags
        return event

    def key(self, tenant: object) -> bytes | None:
        r = self.rng
        roll = r.random()
        if roll < 0.4 and isinstance(tenant, str):
            return tenant.encode("utf-8", "surrogatepass")
        if roll < 0.7:
            return None
        if roll < 0.99:
            return r.randbytes(r.randint(0, 40))
        return r.randbytes(10_000)

    # ---- encodings
    def as_json(self, event: dict[str, Any]) -> bytes:
        r = self.rng
        items = list(event.items())
        r.shuffle(items)
        separators = r.choice([(",", ":"), (", ", ": ")])
        text = json.dumps(
            dict(items), ensure_ascii=r.random() < 0.5, separators=separators, indent=2 if r.random() < 0.05 else None
        )
        return text.encode("utf-8", "surrogatepass")

    @staticmethod
    def as_avro(event: dict[str, Any]) -> bytes:
        return UsageEvent.model_validate(event).to_avro()

    @staticmethod
    def avro_record(event: dict[str, Any]) -> dict[str, Any]:
        """A valid event as the record the Avro writer takes (to break afterwards)."""
        return UsageEvent.model_validate(event).model_dump()

    def mutate(self, data: bytes, header: int = 0) -> bytes:
        r = self.rng
        out = bytearray(data)
        for _ in range(r.randint(1, 3)):
            low = header if header and r.random() < 0.9 else 0
            pos = r.randrange(low, max(len(out), low + 1))
            op = r.random()
            if op < 0.45 and pos < len(out):
                out[pos] ^= 1 << r.randrange(8)
            elif op < 0.75:
                out.insert(pos, r.randrange(256))
            elif pos < len(out):
                del out[pos]
        return bytes(out)


def _json_breakages(fz: Fuzz) -> list[tuple[str, Callable[[dict[str, Any]], object]]]:
    """(class, breaker) pairs: each breaker breaks one rule of DESIGN.md §1 in a JSON-ready event dict."""
    r = fz.rng

    def setter(name: str, value_of: Callable[[], object]) -> Callable[[dict[str, Any]], object]:
        return lambda e: e.__setitem__(name, value_of())

    def control(e: dict[str, Any]) -> None:
        name = r.choice(NAME_FIELDS)
        text = str(e.get(name) or "x")[:199]
        at = r.randint(0, len(text))
        e[name] = (text[:at] + r.choice(CONTROL_CHARS) + text[at:])[:200]

    def negative(e: dict[str, Any]) -> None:
        e[r.choice([*TOKEN_FIELDS, "reasoning_tokens", "latency_ms"])] = r.choice([-1, -(10**12), -(2**63)])

    def too_many_tokens(e: dict[str, Any]) -> None:
        e[r.choice(TOKEN_FIELDS[:2])] = r.choice([10**12 + 1, 2**63 - 1, 10**30])

    def cache_over_input(e: dict[str, Any]) -> None:
        e["cache_read_tokens"] = e["input_tokens"] + 1 if r.random() < 0.5 else e["input_tokens"]
        e["cache_write_tokens"] = 0 if e["cache_read_tokens"] > e["input_tokens"] else 1

    def reasoning_over_output(e: dict[str, Any]) -> None:
        e["reasoning_tokens"] = e["output_tokens"] + r.randint(1, 1000)

    def too_long(e: dict[str, Any]) -> None:
        name = r.choice(NAME_FIELDS)
        e[name] = r.choice(["y", "é", "😀", "中"]) * r.choice([201, 202, 5000])

    def empty_name(e: dict[str, Any]) -> None:
        e[r.choice(["tenant_id", "event_id", "provider", "model", "user_id", "feature"])] = ""

    def too_many_tags(e: dict[str, Any]) -> None:
        choice = r.randrange(4)
        if choice == 0:
            e["tags"] = {f"t{i}": "v" for i in range(r.choice([33, 100]))}
        elif choice == 1:
            e["tags"] = {"k" * 65: "v"}
        elif choice == 2:
            e["tags"] = {"k": "v" * 257}
        else:
            e["tags"] = {"": "v"}

    def float_for_int(e: dict[str, Any]) -> None:
        e[r.choice([*TOKEN_FIELDS, "latency_ms"])] = r.choice([1.0, 1.5, 1e3, 0.0, float("nan"), float("inf")])

    def wrong_type(e: dict[str, Any]) -> None:
        name, value = r.choice(
            [
                ("input_tokens", "100"),
                ("output_tokens", True),
                ("input_tokens", None),
                ("tenant_id", 123),
                ("tenant_id", ["a"]),
                ("tenant_id", {"a": 1}),
                ("tenant_id", None),
                ("model", 4.0),
                ("tags", ["a", "b"]),
                ("tags", {"a": 1}),
                ("tags", "a=b"),
                ("estimated", "yes"),
                ("estimated", 1),
                ("timestamp", {"t": 1}),
                ("timestamp", None),
                ("cache_read_tokens", None),
                ("event_id", True),
                ("latency_ms", "fast"),
            ]
        )
        e[name] = value

    def bad_timestamp(e: dict[str, Any]) -> None:
        future = fz.now + timedelta(hours=r.choice([25, 48, 24 * 400]))
        e["timestamp"] = r.choice(
            [
                "2025-06-01T12:00:00",
                "2025-06-01",
                "yesterday",
                "",
                "2025-06-01T12:00:00+25:00",
                "9999-12-31T23:59:59Z",
                "2025-13-01T00:00:00Z",
                "2025-02-30T00:00:00Z",
                future.isoformat(),
                future.astimezone(timezone(timedelta(hours=-12))).isoformat(),
            ]
        )

    def missing(e: dict[str, Any]) -> None:
        del e[r.choice(REQUIRED)]

    def unknown_field(e: dict[str, Any]) -> None:
        e[r.choice(["colour", "cost", "Tenant_id", "input tokens"])] = "blue"

    return [
        ("control-char", control),
        ("negative-tokens", negative),
        ("too-many-tokens", too_many_tokens),
        ("cache-over-input", cache_over_input),
        ("reasoning-over-output", reasoning_over_output),
        ("over-200-chars", too_long),
        ("empty-name", empty_name),
        ("tags-out-of-bounds", too_many_tags),
        ("float-for-int", float_for_int),
        ("wrong-type", wrong_type),
        ("bad-timestamp", bad_timestamp),
        ("missing-field", missing),
        ("unknown-field", unknown_field),
        ("future-timestamp", setter("timestamp", lambda: (fz.now + timedelta(hours=r.uniform(25, 9000))).isoformat())),
    ]


# Classes whose breakage survives Avro encoding (the record still fits the writer's types).
AVRO_BREAKABLE = {
    "control-char",
    "negative-tokens",
    "cache-over-input",
    "reasoning-over-output",
    "over-200-chars",
    "empty-name",
    "tags-out-of-bounds",
    "future-timestamp",
}


def build_payloads(seed: int, tag: str, now: datetime) -> tuple[list[Payload], Fuzz]:
    fz = Fuzz(seed, tag, now)
    r = fz.rng
    out: list[Payload] = []

    def add(kind: str, value: bytes | None, tenant: object = None, must_reject: bool = False) -> Payload:
        payload = Payload(kind, value, fz.key(tenant), must_reject)
        out.append(payload)
        return payload

    # 1. valid events, JSON and Avro, several providers, unknown models, edge token counts and names
    valid_payloads: list[tuple[dict[str, Any], Payload]] = []
    for _ in range(5_800):
        event = fz.valid()
        avro = r.random() < 0.4
        p = add(
            "valid.avro" if avro else "valid.json", fz.as_avro(event) if avro else fz.as_json(event), event["tenant_id"]
        )
        valid_payloads.append((event, p))
    # odd but accepted: numeric timestamps, year 1, the v1 Avro schema (backward compatible)
    for _ in range(10):
        event = fz.valid()
        event["timestamp"] = int((fz.now - timedelta(days=r.uniform(0, 100))).timestamp())
        add("odd.unix-timestamp.json", fz.as_json(event), event["tenant_id"])
    for _ in range(3):
        event = fz.valid()
        event["timestamp"] = "0001-01-01T00:00:00Z"
        add("odd.year-1.json", fz.as_json(event), event["tenant_id"])
    for _ in range(20):
        event = fz.valid()
        for name in ("reasoning_tokens", "input_audio_tokens", "session_id", "team_id"):
            event.pop(name, None)
        add("valid.avro-v1", codec.encode("usage_event", fz.avro_record(event), version=1), event["tenant_id"])

    # 2. the control tenant: known models, a backfill ~90 days ago in conversations, two months of calls
    control: list[tuple[dict[str, Any], Payload]] = []
    backfill = fz.now - timedelta(days=90)
    for i in range(120):
        moment = backfill + timedelta(seconds=r.uniform(0, 3600))
        if i < 60:  # five conversations calling in a burst: a runaway loop, 90 days late
            moment = backfill.replace(second=0, microsecond=0) + timedelta(seconds=r.uniform(0, 59))
        event = fz.valid(fz.control_tenant, moment, known=True)
        event["session_id"] = f"ctl-session-{i % 5}"
        event["trace_id"] = f"ctl-trace-{i % 7}"
        encoded = fz.as_avro(event) if i % 2 else fz.as_json(event)
        control.append((event, add("control.backfill", encoded, event["tenant_id"])))
    for _ in range(230):
        moment = fz.now - timedelta(seconds=r.uniform(0, 60 * 86_400))
        event = fz.valid(fz.control_tenant, moment, known=True)
        encoded = fz.as_avro(event) if r.random() < 0.5 else fz.as_json(event)
        control.append((event, add("control", encoded, event["tenant_id"])))

    # 3. duplicates: ~5 % of the valid events again, the same bytes or the other encoding
    pool = valid_payloads + control
    for event, original in r.sample(pool, len(pool) // 20):
        assert original.value is not None
        if r.random() < 0.5:
            add(f"duplicate.same-bytes.{original.kind}", original.value, event["tenant_id"])
        elif original.value[:2] == codec.MAGIC:
            add("duplicate.as-json", fz.as_json(event), event["tenant_id"])
        else:
            add("duplicate.as-avro", fz.as_avro(event), event["tenant_id"])

    # 4. broken on purpose: each rule of DESIGN.md §1, in JSON and (where the types allow) in Avro
    breakages = _json_breakages(fz)
    for _ in range(2_300):
        name, breaker = r.choice(breakages)
        event = fz.valid()
        if name in AVRO_BREAKABLE and r.random() < 0.35:
            record = fz.avro_record(event)
            if name == "future-timestamp":
                record["timestamp"] = fz.now + timedelta(hours=r.uniform(25, 9000))
            else:
                as_text = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in record.items()}
                breaker(as_text)
                record.update({k: v for k, v in as_text.items() if k != "timestamp"})
            add(f"invalid.{name}.avro", codec.encode("usage_event", record), event["tenant_id"], must_reject=True)
        else:
            breaker(event)
            add(f"invalid.{name}.json", fz.as_json(event), event.get("tenant_id"), must_reject=True)

    # lone surrogates: as JSON escapes, and as their (invalid) UTF-8 bytes inside Avro strings
    for i in range(150):
        event = fz.valid()
        name = r.choice(["tenant_id", "feature", "user_id", "model", "event_id"])
        event[name] = "QZQ"
        if i % 3 == 2:
            raw = fz.as_avro(event)
            add(
                "invalid.lone-surrogate.avro",
                raw.replace(b"QZQ", "\ud800".encode("utf-8", "surrogatepass")),
                event["tenant_id"],
                must_reject=True,
            )
        else:
            escape = r.choice(["\\ud800", "\\udfff", "a\\ud83d", "\\ud83dx", "\\udc00\\ud800"])
            raw = json.dumps(event, separators=(",", ":")).encode().replace(b'"QZQ"', b'"' + escape.encode() + b'"')
            add("invalid.lone-surrogate.json", raw, event["tenant_id"], must_reject=True)
    # control characters in tags (DESIGN.md names ids and names; tags are not named): decided by the oracle
    for _ in range(30):
        event = fz.valid()
        char = r.choice(CONTROL_CHARS)
        event["tags"] = {"k": f"v{char}"} if r.random() < 0.5 else {f"k{char}": "v"}
        add("unclear.control-char-in-tag.json", fz.as_json(event), event["tenant_id"])

    # not a JSON object, broken JSON, hostile JSON
    for value in [
        b"[]",
        b"null",
        b"42",
        b"-1e999",
        b'"a string"',
        b"true",
        b"{}",
        b"[{}]",
        b"[" + fz.as_json(fz.valid()) + b"]",
        b"\xef\xbb\xbf" + fz.as_json(fz.valid()),
        fz.as_json(fz.valid()).decode().encode("utf-16"),
        b"{" * 10,
        b"}",
        b" ",
        b"\n\t",
    ]:
        for _ in range(4):
            add("invalid.not-an-object", value, None, must_reject=True)
    for _ in range(250):
        data = json.dumps(fz.valid(), separators=(",", ":")).encode()
        add("invalid.truncated-json", data[: r.randrange(1, len(data) - 1)], None, must_reject=True)
    for _ in range(20):
        data = json.dumps(fz.valid(), ensure_ascii=False).encode()
        at = data.index(b'"tenant_id": "') + len(b'"tenant_id": "')
        add("invalid.not-utf8.json", data[:at] + b"\xe9\xff" + data[at:], None, must_reject=True)
    add("invalid.deep-nesting-100k", b"[" * 100_000 + b"]" * 100_000, None, must_reject=True)
    add(
        "invalid.deep-nesting-100k-in-object",
        b'{"tags":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        None,
        must_reject=True,
    )
    add("invalid.deep-nesting-30k", b'{"tags":' + b"[" * 30_000 + b"]" * 30_000 + b"}", None, must_reject=True)
    add("invalid.deep-nesting-objects", b'{"a":' * 6_000 + b"1" + b"}" * 6_000, None, must_reject=True)
    for _ in range(3):
        add("invalid.empty", b"", None, must_reject=True)
        add("invalid.null-value", None, r.choice([None, b"k"]), must_reject=True)

    # size: exactly at the limit (valid), one byte over, ~900 KB, and just under what the broker takes
    # (1,048,588 bytes by default): whatever usage.raw accepted must still fit on usage.dlq
    for size, kind, reject in [
        (MAX_RAW_BYTES, "valid.json-at-size-limit", False),
        (MAX_RAW_BYTES + 1, "invalid.json-over-size-limit", True),
        (900 * 1024, "invalid.json-900k-whitespace", True),
        (1_040_000, "invalid.json-1m-near-broker-limit", True),
    ]:
        event = fz.valid()
        data = fz.as_json(event)
        add(kind, data[:1] + b" " * (size - len(data)) + data[1:], event["tenant_id"], must_reject=reject)
    huge = fz.valid()
    huge["tenant_id"] = "x" * (900 * 1024)
    add("invalid.json-900k-tenant", fz.as_json(huge), None, must_reject=True)

    # Avro framing: unknown fingerprint, another schema's fingerprint, truncated, trailing bytes, bare magic
    other = next(v.fingerprint for v in codec.SCHEMAS["dead_letter"])
    for _ in range(40):
        body = fz.as_avro(fz.valid())[codec.HEADER_LEN :]
        add("invalid.avro-unknown-fingerprint", codec.MAGIC + r.randbytes(8) + body, None, must_reject=True)
        add("invalid.avro-other-schema", codec.MAGIC + other + body, None, must_reject=True)
        add(
            "invalid.avro-truncated",
            (codec.MAGIC + codec.latest("usage_event").fingerprint + body)[
                : r.randrange(codec.HEADER_LEN, codec.HEADER_LEN + len(body))
            ],
            None,
            must_reject=True,
        )
        add(
            "invalid.avro-trailing-bytes",
            codec.MAGIC + codec.latest("usage_event").fingerprint + body + b"\x00",
            None,
            must_reject=True,
        )
    for value in [codec.MAGIC, codec.MAGIC + b"\x00" * 8, b"\xc3"]:
        add("invalid.avro-header-only", value, None, must_reject=True)

    # 5. random bytes and byte-level mutations of valid JSON and Avro: the oracle decides
    for _ in range(300):
        add("random-bytes", r.randbytes(r.randint(1, 2_000)), None)
    for _ in range(600):
        event = fz.valid()
        add("mutation.json", fz.mutate(fz.as_json(event)), event["tenant_id"])
    for _ in range(600):
        event = fz.valid()
        add("mutation.avro", fz.mutate(fz.as_avro(event), header=codec.HEADER_LEN), event["tenant_id"])

    r.shuffle(out)
    for payload in out:
        classify(payload)
    return out, fz


# ---------------------------------------------------------------- the run against the stack
@dataclass
class LedgerRow:
    event_id: str
    tenant_id: str
    provider: str
    model: str
    ts: datetime
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    price_status: str
    total_cost: Decimal


@dataclass
class FuzzRun:
    settings: Settings
    payloads: list[Payload]
    fuzz: Fuzz
    produce_seconds: float
    drained: bool
    drain_seconds: float
    stage_two_caught_up: bool
    alive: bool
    starts: int
    exit_code: int | None
    log_text: str
    ledger: list[LedgerRow]
    dead_letters: list[dict[str, Any]]
    dead_letter_bytes: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def payloads() -> tuple[list[Payload], Fuzz]:
    started = time.monotonic()
    built = build_payloads(SEED, uuid.uuid4().hex[:8], datetime.now(UTC))
    print(f"fuzz: {len(built[0])} payloads (seed {SEED}) built and classified in {time.monotonic() - started:.1f}s")
    return built


def produce_all(settings: Settings, items: list[Payload]) -> None:
    """Raw bytes onto the isolated usage.raw; records each payload's partition and offset."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "message.max.bytes": 4 * 1024 * 1024,
            "linger.ms": 20,
        }
    )
    errors: list[str] = []

    def delivered(payload: Payload) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                errors.append(f"{payload.kind}: {err}")
            else:
                partition, offset = msg.partition(), msg.offset()
                assert partition is not None and offset is not None
                payload.partition, payload.offset = partition, offset

        return on_delivery

    for payload in items:
        while True:
            try:
                producer.produce(
                    settings.topic_raw, value=payload.value, key=payload.key, on_delivery=delivered(payload)
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0, "undelivered payloads"
    assert not errors, errors[:5]
    assert all(p.offset >= 0 for p in items)


def read_ledger(settings: Settings, items: list[Payload], fz: Fuzz) -> list[LedgerRow]:
    def storable(text: str) -> bool:  # Postgres text cannot hold NUL; such a row cannot exist
        return "\x00" not in text

    ids = sorted({p.event.event_id for p in items if p.event is not None and storable(p.event.event_id)})
    tenants = sorted(
        {p.event.tenant_id for p in items if p.event is not None and storable(p.event.tenant_id)}
        | set(fz.tenants)
        | {fz.control_tenant}
    )
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id, tenant_id, provider, model, ts, input_tokens, output_tokens, cache_read_tokens,"
            " cache_write_tokens, price_status, total_cost FROM tokenmeter.ledger"
            " WHERE event_id = ANY(%s) OR tenant_id = ANY(%s) OR event_id LIKE %s",
            (ids, tenants, f"fz{fz.tag}-%"),
        ).fetchall()
    return [LedgerRow(*row) for row in rows]


@pytest.fixture(scope="module")
def fuzz_run(
    stack: LocalStack,
    settings: Settings,
    payloads: tuple[list[Payload], Fuzz],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FuzzRun]:
    items, fz = payloads
    own = isolated(settings, fz.tag)
    worker = WorkerProcess(own, tmp_path_factory.mktemp("fuzz-worker"))
    worker.start()
    try:
        started = time.monotonic()
        produce_all(own, items)
        produced = time.monotonic() - started
        started = time.monotonic()
        drained = wait_for_sinks(own, timeout=DRAIN_TIMEOUT_S)
        drain_seconds = time.monotonic() - started
        # Stage 2 reads what stage 1 wrote to metering.rollups: wait for it too, or its failures on
        # this input (tables, alert rules) would never reach the log before the worker is stopped.
        stage_two = wait_for_sinks(
            own, timeout=STAGE_TWO_TIMEOUT_S if drained else 10.0, topic=own.topic_rollups, group=own.worker_id
        )
        alive = worker.alive()
        exit_code = None if worker.process is None else worker.process.poll()
        letters_raw = read_all(own, own.topic_dlq, timeout=60)
        letters = [codec.decode("dead_letter", value) for value in letters_raw]
        ledger = read_ledger(own, items, fz)
    finally:
        worker.stop()
    log_text = "\n".join(path.read_text(errors="replace") for path in worker.logs)
    print(
        f"fuzz: produced {len(items)} in {produced:.1f}s, drained={drained} after {drain_seconds:.1f}s, stage 2 "
        f"caught up={stage_two}; {len(ledger)} ledger rows, {len(letters)} dead letters"
    )
    yield FuzzRun(
        own,
        items,
        fz,
        produced,
        drained,
        drain_seconds,
        stage_two,
        alive,
        worker.starts,
        exit_code,
        log_text,
        ledger,
        letters,
        [len(v) for v in letters_raw],
    )


# ---------------------------------------------------------------- reporting helpers
def by_kind(items: list[Payload], limit: int = 3) -> str:
    """Counts per payload class, with a few examples: what an assertion message needs to be acted on."""
    counts = Counter(p.kind for p in items)
    lines = [f"{n} × {kind}" for kind, n in counts.most_common()]
    lines += ["  e.g. " + p.describe() for p in items[:limit]]
    return "\n".join(lines)


def log_excerpt(text: str) -> str:
    """Each distinct traceback of the worker's log once (by its last line), with how often it occurred,
    and the count of every restart line."""
    lines = text.splitlines()
    found: dict[str, list[Any]] = {}  # last line → [count, the lines of its first occurrence]
    i = 0
    while i < len(lines):
        if not lines[i].startswith("Traceback"):
            i += 1
            continue
        end = i + 1
        while end < len(lines) and (
            lines[end].startswith((" ", "During handling", "The above", "Traceback")) or not lines[end].strip()
        ):
            end += 1
        last = lines[end] if end < len(lines) else "(end of log)"
        entry = found.setdefault(last[:300], [0, [lines[i - 1] if i else "", *lines[i : end + 1]]])
        entry[0] += 1
        i = end + 1
    out = []
    for last, (count, block) in found.items():
        out.append(f"--- {count} × {last}")
        out += [line[:300] for line in [*block[:8], "  …", *block[-14:]]] if len(block) > 22 else block
    restarts = Counter(
        line.split("]", 2)[-1].strip()[:160] for line in lines if "stage 1 exited" in line or "Restarting dead" in line
    )
    out += [f"--- {n} × {line}" for line, n in restarts.items()]
    return "\n".join(out)


# ---------------------------------------------------------------- the tests
def test_payloads_built_to_break_a_rule_are_rejected_by_the_rules(payloads: tuple[list[Payload], Fuzz]) -> None:
    """No stack: what the generator broke on purpose must be invalid by the schema's own rules, and
    decode_usage must never raise anything but InvalidEvent (the oracle the other tests rely on)."""
    items, _ = payloads
    assert len(items) >= 10_000
    accepted = [p for p in items if p.must_reject and p.event is not None]
    crashed = [p for p in items if p.oracle_crash]
    problems = []
    if accepted:
        problems.append("accepted although they break a rule of DESIGN.md §1:\n" + by_kind(accepted, 6))
    if crashed:
        problems.append(
            "decode_usage raised something other than InvalidEvent:\n"
            + "\n".join(f"{p.oracle_crash} ← {p.describe()}" for p in crashed[:6])
        )
    assert not problems, "\n\n".join(problems)


def run_summary(run: FuzzRun) -> str:
    counts = {
        marker: run.log_text.count(marker)
        for marker in ("stage 1 exited", "batch failed", "splitting it to", "stopping the worker", "Traceback")
    }
    return (
        f"alive={run.alive} (exit code {run.exit_code}), starts={run.starts}, drained={run.drained} in "
        f"{run.drain_seconds:.0f}s, stage 2 caught up={run.stage_two_caught_up}; in the log: {counts}\n"
        + (log_excerpt(run.log_text) or run.log_text[-3000:])
    )


def test_worker_survives_the_fuzz_and_drains(fuzz_run: FuzzRun) -> None:
    """Alive, never restarted (neither the worker nor its stage 1), no batch that failed and was
    retried, everything in the sinks, and stage 2 caught up."""
    run = fuzz_run
    assert run.alive and run.starts == 1, run_summary(run)
    assert run.log_text.count("stage 1 exited") == 0 and run.log_text.count("batch failed") == 0, run_summary(run)
    assert run.drained, run_summary(run)
    assert run.stage_two_caught_up, run_summary(run)


def test_worker_logs_no_traceback_on_the_fuzz(fuzz_run: FuzzRun) -> None:
    """Stricter: no stage raised on this input at all, not even one that bills nothing and only skips
    (alert rules, stage 2's batch): those skip alerting for every tenant in the batch, not one record."""
    assert "Traceback" not in fuzz_run.log_text, run_summary(fuzz_run)


def test_each_payload_is_billed_once_or_dead_lettered_once(fuzz_run: FuzzRun) -> None:
    run = fuzz_run
    valid = [p for p in run.payloads if p.event is not None]
    invalid = [p for p in run.payloads if p.event is None]
    problems: list[str] = []

    # --- billed exactly once, at genai-prices' price
    candidates: dict[str, list[UsageEvent]] = defaultdict(list)
    sources: dict[str, list[Payload]] = defaultdict(list)
    for p in valid:
        assert p.event is not None
        if p.event not in candidates[p.event.event_id]:
            candidates[p.event.event_id].append(p.event)
        sources[p.event.event_id].append(p)
    rows: dict[str, list[LedgerRow]] = defaultdict(list)
    for row in run.ledger:
        rows[row.event_id].append(row)
    missing = [sources[i][0] for i in candidates if i not in rows]
    if missing:
        problems.append(
            f"{len(missing)} of {len(candidates)} distinct valid events are not in the ledger:\n" + by_kind(missing)
        )
    extra = [row for i, group in rows.items() if i not in candidates for row in group]
    if extra:
        problems.append(
            f"{len(extra)} ledger rows of the fuzz tenants match no valid payload: "
            + "; ".join(f"{x.event_id!r}/{x.tenant_id!r}" for x in extra[:5])
        )
    repeated = {i: len(group) for i, group in rows.items() if len(group) > 1}
    if repeated:
        problems.append(f"event ids in the ledger more than once: {list(repeated.items())[:5]}")
    wrong: list[str] = []
    wrong_kinds: Counter[str] = Counter()
    for event_id, group in rows.items():
        if event_id not in candidates:
            continue
        row = group[0]
        matching = [
            e
            for e in candidates[event_id]
            if (
                e.tenant_id,
                e.provider,
                e.model,
                e.timestamp,
                e.input_tokens,
                e.output_tokens,
                e.cache_read_tokens,
                e.cache_write_tokens,
            )
            == (
                row.tenant_id,
                row.provider,
                row.model,
                row.ts,
                row.input_tokens,
                row.output_tokens,
                row.cache_read_tokens,
                row.cache_write_tokens,
            )
        ]
        if not matching:
            wrong_kinds[sources[event_id][0].kind] += 1
            wrong.append(f"{event_id!r}: the ledger row {row} matches none of the events sent with this id")
            continue
        expected = {genai_cost(e) for e in matching}
        if not any((x.status, x.total_cost) == (row.price_status, row.total_cost) for x in expected):
            wrong_kinds[sources[event_id][0].kind] += 1
            e = matching[0]
            wrong.append(
                f"{event_id!r} {e.provider}/{e.model} at {e.timestamp.isoformat()} in={e.input_tokens} "
                f"out={e.output_tokens} cache_read={e.cache_read_tokens} cache_write={e.cache_write_tokens}"
                f" audio={e.input_audio_tokens}: ledger {row.price_status} {row.total_cost}, genai-prices "
                + " or ".join(f"{x.status} {x.total_cost} {x.note}" for x in expected)
            )
    if wrong:
        problems.append(
            f"{len(wrong)} ledger rows differ from genai-prices ({dict(wrong_kinds)}):\n" + "\n".join(wrong[:8])
        )
    unpriced_expected = sum(1 for i, es in candidates.items() if genai_cost(es[0]).status == "unpriced")
    assert unpriced_expected > 0  # the mix must exercise unknown models

    # --- dead-lettered exactly once, with a reason and the original bytes
    by_position = {(p.partition, p.offset): p for p in run.payloads}
    letters: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for letter in run.dead_letters:
        letters[(letter["source_partition"], letter["source_offset"])].append(letter)
    wrong_topic = [x for x in run.dead_letters if x["source_topic"] != run.settings.topic_raw]
    if wrong_topic:
        problems.append(f"{len(wrong_topic)} dead letters name another source topic: {wrong_topic[0]['source_topic']}")
    unknown = [pos for pos in letters if pos not in by_position]
    if unknown:
        problems.append(f"dead letters at positions nothing was sent to: {unknown[:5]}")
    lettered_valid = [by_position[pos] for pos in letters if pos in by_position and by_position[pos].event is not None]
    if lettered_valid:
        problems.append(
            f"{len(lettered_valid)} valid payloads were dead-lettered:\n"
            + by_kind(lettered_valid)
            + "\n  reasons: "
            + "; ".join(letters[(p.partition, p.offset)][0]["reason"][:200] for p in lettered_valid[:5])
        )
    not_lettered = [p for p in invalid if (p.partition, p.offset) not in letters]
    if not_lettered:
        problems.append(
            f"{len(not_lettered)} of {len(invalid)} invalid payloads have no dead letter:\n" + by_kind(not_lettered)
        )
    twice = {pos: len(same) for pos, same in letters.items() if len(same) > 1}
    if twice or len(run.dead_letters) != len(invalid):
        problems.append(
            f"{len(run.dead_letters)} dead letters for {len(invalid)} invalid payloads; "
            f"positions dead-lettered more than once: {list(twice.items())[:5]}"
        )
    bad_letters: list[str] = []
    for pos, same in letters.items():
        payload = by_position.get(pos)
        if payload is None:
            continue
        for letter in same:
            reason, original, key = letter["reason"], letter["original_value"], letter["original_key"]
            if not reason.strip() or len(reason) > MAX_REASON_CHARS:
                bad_letters.append(f"reason of {len(reason)} chars for {payload.describe()}")
            if not letter["stage"]:
                bad_letters.append(f"no stage for {payload.describe()}")
            value = payload.value
            if value is None or len(value) <= MAX_RAW_BYTES:
                if original != value:
                    bad_letters.append(
                        f"original_value differs ({None if original is None else len(original)} B)"
                        f" for {payload.describe()}"
                    )
            else:  # over the size limit: the bytes, or a prefix that says what it cut
                if original is None or not value.startswith(original):
                    bad_letters.append(f"original_value of a {len(value)} B payload is not a prefix of it")
                elif len(original) < len(value):
                    if letter.get("truncated") is not True:
                        bad_letters.append(
                            f"a truncated original_value ({len(original)} of {len(value)} B) is not marked truncated"
                        )
                    if letter.get("original_size") not in (None, len(value)):
                        bad_letters.append(f"original_size {letter.get('original_size')} != {len(value)}")
                    digest = letter.get("original_sha256")
                    if digest not in (None, hashlib.sha256(value).hexdigest()):
                        bad_letters.append("original_sha256 does not match the payload")
            if key != payload.key and (key is None or payload.key is None or not payload.key.startswith(key)):
                bad_letters.append(f"original_key differs for {payload.describe()}")
    if bad_letters:
        problems.append(f"{len(bad_letters)} dead letter defects:\n" + "\n".join(bad_letters[:8]))
    biggest = max(run.dead_letter_bytes, default=0)
    print(
        f"fuzz: {len(candidates)} distinct valid ids ({unpriced_expected} unpriced), {len(invalid)} invalid, "
        f"{len(run.dead_letters)} dead letters, largest dead letter {biggest} B"
    )
    assert not problems, "\n\n".join(problems)


def test_control_tenant_invoices_equal_genai_prices(fuzz_run: FuzzRun) -> None:
    run = fuzz_run
    tenant = run.fuzz.control_tenant
    distinct: dict[str, UsageEvent] = {}
    for p in run.payloads:
        if p.event is not None and p.event.tenant_id == tenant:
            distinct.setdefault(p.event.event_id, p.event)
    assert len(distinct) >= 300 and any(p.kind == "control.backfill" for p in run.payloads)
    expected: dict[str, tuple[Decimal, int]] = {}
    for event in distinct.values():
        cost = genai_cost(event)
        assert cost.status == "priced", cost
        total, calls = expected.get(event.timestamp.strftime("%Y-%m"), (Decimal(0), 0))
        expected[event.timestamp.strftime("%Y-%m")] = (total + cost.total_cost, calls + 1)
    assert len(expected) >= 3  # the backfill month and the last two
    got: dict[str, tuple[Decimal, int, int]] = {}
    for period in sorted(expected):
        shown = subprocess.run(
            [sys.executable, "-m", "deploy", "invoice", "--tenant", tenant, "--period", period, "--format", "json"],
            env=env_for(run.settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        bill = json.loads(shown.stdout)
        got[period] = (Decimal(str(bill["total"])), bill["calls"], bill["unpriced_calls"])
    want = {period: (total, calls, 0) for period, (total, calls) in expected.items()}
    assert got == want, f"invoices (total, calls, unpriced) by month: got {got}, genai-prices says {want}"


if __name__ == "__main__":  # a quick look at the mix without the stack: python -m tests.streams.test_fuzz_worker
    built, _ = build_payloads(SEED, "local", datetime.now(UTC))
    valid_count = sum(1 for p in built if p.event is not None)
    print(f"{len(built)} payloads, {valid_count} valid by the oracle")
    for (kind, is_valid), count in sorted(Counter((p.kind, p.event is not None) for p in built).items()):
        print(f"{count:6d} {'valid' if is_valid else 'invalid':8s} {kind}")
