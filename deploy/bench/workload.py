"""The one synthetic workload: usage events for ``tokenmeter bench``, the demo and the tests.

Seeded and deterministic: the same arguments (a ``start`` among them) give the same events, ids
included. Each event is a dict of DESIGN.md §1 fields, valid as it is for ``UsageProducer.record``,
``validate_event`` and the Avro codec (``timestamp`` is an aware UTC ``datetime``); ``to_json`` makes the JSON line that
``tokenmeter produce`` and kcat send.

What a call looks like (fixed, so every user of the workload sees the same traffic): the tenant by its
share of the traffic, a model from the tenant's mix (else the workload's), a feature, a user of the
tenant with a few heavy users (Pareto), one of the user's sessions, 85 % ``prod`` and the rest
``staging``; input tokens log-normal around 1,300 (a long tail to tens of thousands), half the calls
reading up to half of them from the prompt cache, output tokens log-normal around 200 and at most
``max_output_tokens``, a latency around 0.9 s.

- ``usage_events(count, …)``: a batch with ids, timestamps and producer retries — a benchmark's
  workload, a backfill, a test's input.
- ``Workload``: the traffic's make-up; ``.events(count, …)`` is the batch above, ``.calls(seed)`` an
  endless stream of calls without id or timestamp (a live service: ``UsageProducer`` fills them in),
  ``.call(rng)`` one such call.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

FEATURES = ("search", "chat", "summarize", "classify")


@dataclass(frozen=True)
class Model:
    """A model and its weight in a mix (relative: weights 3 and 1 mean 75 % and 25 % of the calls)."""

    provider: str
    model: str
    weight: float = 1.0


MODELS = (
    Model("openai", "gpt-4o", 30),
    Model("openai", "gpt-4o-mini", 30),
    Model("anthropic", "claude-sonnet-4-5", 15),
    Model("google", "gemini-2.5-flash", 15),
    Model("openai", "o3", 5),
    Model("anthropic", "claude-haiku-4-5", 5),
)
UNPRICED = Model("acme-ai", "mystery-1")  # genai-prices does not know it: its calls are counted, not priced


@dataclass(frozen=True)
class Tenant:
    """A tenant, its share of the traffic (relative) and its own model mix (empty: the workload's)."""

    name: str
    share: float = 1.0
    models: tuple[Model, ...] = ()


def as_tenants(spec: int | Iterable[str | Tenant]) -> tuple[Tenant, ...]:
    """``n``: ``tenant-1`` … ``tenant-n``, a few big ones (``tenant-1`` has over half the traffic, shares
    of a Pareto law with α 1.2, the tail in ``tenant-n``); names: equal shares."""
    if isinstance(spec, int):
        shares = [k**-1.2 - (k + 1) ** -1.2 for k in range(1, spec)] + [spec**-1.2]
        return tuple(Tenant(f"tenant-{k}", share) for k, share in enumerate(shares, 1))
    return tuple(t if isinstance(t, Tenant) else Tenant(t) for t in spec)


@dataclass(frozen=True)
class Workload:
    """The make-up of the traffic: who calls which model for what. No ids and no times (see ``events``)."""

    tenants: tuple[Tenant, ...] = as_tenants(20)
    users_per_tenant: int = 300
    features: tuple[str, ...] = FEATURES
    models: tuple[Model, ...] = MODELS
    max_output_tokens: int = 1024

    def call(self, rng: random.Random, tenant: str | None = None) -> dict[str, Any]:
        """One model call as a service records it (of ``tenant``, else of one drawn by its share)."""
        if tenant is None:
            chosen = rng.choices(self.tenants, [t.share for t in self.tenants])[0]
        else:
            chosen = next((t for t in self.tenants if t.name == tenant), Tenant(tenant))
        models = chosen.models or self.models
        model = rng.choices(models, [m.weight for m in models])[0]
        input_tokens = int(rng.lognormvariate(7.2, 0.9)) + 20
        user = f"{chosen.name}-user-{(int(rng.paretovariate(1.1)) - 1) % self.users_per_tenant + 1}"
        return {
            "tenant_id": chosen.name,
            "provider": model.provider,
            "model": model.model,
            "feature": rng.choice(self.features),
            "user_id": user,
            "session_id": f"{user}-s{rng.randint(1, 8)}",
            "environment": "prod" if rng.random() < 0.85 else "staging",
            "input_tokens": input_tokens,
            "cache_read_tokens": rng.randint(0, input_tokens // 2) if rng.random() < 0.5 else 0,
            "output_tokens": min(int(rng.lognormvariate(5.3, 0.7)) + 5, self.max_output_tokens),
            "latency_ms": int(rng.lognormvariate(6.8, 0.5)),
        }

    def calls(self, seed: int | str = 1) -> Iterator[dict[str, Any]]:
        """Endless live traffic: calls without ``event_id`` and ``timestamp``, as ``UsageProducer.record``
        takes them (it fills both in)."""
        rng = random.Random(seed)
        while True:
            yield self.call(rng)

    def events(
        self,
        count: int,
        *,
        seed: int | str = 1,
        start: datetime | None = None,
        span: timedelta | None = None,
        daily_shape: Sequence[float] | None = None,
        duplicates: float = 0.0,
        prefix: str | None = None,
    ) -> list[dict[str, Any]]:
        """``count`` distinct events in time order, each followed by a copy of itself (a producer's retry:
        same id, same fields) with probability ``duplicates``.

        Times: evenly spread over ``span`` (default: one millisecond apart) from ``start`` (default: now).
        With ``daily_shape`` (24 weights, for the hours after ``start``'s time of day, so a UTC midnight
        ``start`` makes them UTC hours) they are drawn instead: a random whole day of the span, an hour by
        its weight, a second in it; office traffic for a backfill. Ids: ``<prefix>-<n>`` (n = 0 …
        count - 1, in time order) with a prefix, else 128 random bits (hex) from the seed.
        """
        rng = random.Random(seed)
        start = start or datetime.now(UTC)
        span = timedelta(milliseconds=count) if span is None else span
        if daily_shape is None:
            times = [start + span * i / count for i in range(count)]
        else:
            days = max(1, span // timedelta(days=1))
            hours = rng.choices(range(24), daily_shape, k=count)
            offsets = (timedelta(days=rng.randrange(days), hours=h, seconds=rng.uniform(0, 3599.999)) for h in hours)
            times = sorted(start + offset for offset in offsets)
        out = []
        for n, at in enumerate(times):
            event = self.call(rng)
            event["event_id"] = f"{prefix}-{n}" if prefix is not None else f"{rng.getrandbits(128):032x}"
            event["timestamp"] = at
            out.append(event)
            if duplicates and rng.random() < duplicates:
                out.append(dict(event))
        return out


def usage_events(
    count: int,
    *,
    seed: int | str = 1,
    tenants: int | Iterable[str | Tenant] = 20,
    users_per_tenant: int = 300,
    features: Sequence[str] = FEATURES,
    models: Sequence[Model] = MODELS,
    start: datetime | None = None,
    span: timedelta | None = None,
    duplicates: float = 0.0,
    prefix: str | None = None,
) -> list[dict[str, Any]]:
    """``count`` distinct usage events (plus ``duplicates`` × count retries, about): see ``Workload`` for
    the make-up and ``Workload.events`` for times, ids and retries. ``tenants``: as in ``as_tenants``."""
    make_up = Workload(as_tenants(tenants), users_per_tenant, tuple(features), tuple(models))
    return make_up.events(count, seed=seed, start=start, span=span, duplicates=duplicates, prefix=prefix)


def to_json(event: dict[str, Any]) -> str:
    """The event as one JSON line's text (``tokenmeter produce``, kcat): the timestamp in ISO 8601."""
    return json.dumps(event, default=lambda value: value.isoformat())


def _zigzag_varint(n: int) -> bytes:
    """Avro's encoding of a long."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


class EncodedCalls:
    """Live traffic already in the wire format, for a load generator that must not compete with what it
    loads: calls of ``Workload.calls`` encoded once (Avro, ``usage_event``), each message then given a
    fresh 32-hex-digit id and the current time by splicing bytes (the two are the record's first fields),
    about a microsecond per message instead of the library's validate-and-encode. The bytes equal
    ``codec.encode`` of the same event (tested)."""

    ID_DIGITS = 32

    def __init__(self, workload: Workload | None = None, distinct: int = 5_000, seed: int | str = 3) -> None:
        from schemas import codec  # the workload module itself stays free of the codec

        self._rng = random.Random(seed)
        self._templates: list[tuple[bytes, bytes]] = []
        calls = (workload or Workload()).calls(seed)
        for _ in range(distinct):
            call = next(calls)
            body = codec.encode("usage_event", {**call, "event_id": "0" * self.ID_DIGITS, "timestamp": _EPOCH})
            self._header = body[: codec.HEADER_LEN]
            rest = body[codec.HEADER_LEN + len(self._id_length) + self.ID_DIGITS + len(_zigzag_varint(0)) :]
            self._templates.append((call["tenant_id"].encode(), rest))

    _id_length = _zigzag_varint(ID_DIGITS)

    def message(self, n: int, now: datetime) -> tuple[bytes, bytes]:
        """The n-th message (key, value): a call of the mix with a new id, timestamped ``now``."""
        key, rest = self._templates[n % len(self._templates)]
        event_id = f"{self._rng.getrandbits(128):032x}".encode()
        micros = (now - _EPOCH) // timedelta(microseconds=1)
        return key, b"".join((self._header, self._id_length, event_id, _zigzag_varint(micros), rest))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
