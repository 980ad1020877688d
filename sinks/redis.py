"""The Redis sink: current spend per scope and period, for quota checks in one round trip.

Layout (values are decimal strings, never floats):

    tm:spend:<tenant>:<dimension>:<value>:<period>  →  "<spend> <period end, Unix ms>"
    e.g. tm:spend:acme:feature:search:month  →  "12.5 1767225600000"

``dimension`` is ``tenant`` (value empty), ``feature``, ``user`` or ``environment``; ``period`` is
``day``, ``week`` (ISO, Monday) or ``month`` in the tenant's time zone (``streams/periods.py``).
The value carries the end of the period it counts, so a reader needs no time zone: spend whose
period has ended is zero. Values are the absolute totals the Postgres sink read back after its
transaction (``sinks.postgres.BatchResult.rollups``), so a replayed batch writes the same value
again. Only windows open at the time of writing are written. One key per scope
and period kind, expiring a day after its period ends. Colons and percent signs inside names are
percent-escaped, so no two scopes share a key.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import redis

from sinks.postgres import Rollup
from streams.periods import PERIODS, period_end

SCOPE_DIMENSIONS = ("tenant", "feature", "user", "environment")
GRACE = timedelta(days=1)


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def spend_key(tenant_id: str, dimension: str, value: str, period: str) -> str:
    return f"tm:spend:{_escape(tenant_id)}:{dimension}:{_escape(value)}:{period}"


def spend_value(raw: bytes | str | None, now: datetime) -> Decimal:
    """The spend a ``tm:spend:`` value counts for the period open at ``now`` (zero once it ended)."""
    if not raw:
        return Decimal(0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    amount, _, end_ms = text.partition(" ")
    return Decimal(amount) if int(end_ms) > now.timestamp() * 1000 else Decimal(0)


def spend_writes(rollups: Iterable[Rollup], now: datetime) -> dict[str, tuple[str, int]]:
    """Key → (value, TTL seconds) for the rollups a quota check reads: only windows open at ``now``
    (late events of an ended period, or events stamped in the future, would hide the current one)."""
    writes: dict[str, tuple[str, int]] = {}
    for r in rollups:
        if r.granularity not in PERIODS or r.dimension not in SCOPE_DIMENSIONS or r.window_start > now:
            continue
        end = period_end(r.granularity, r.window_start, r.time_zone)
        if end <= now:
            continue
        key = spend_key(r.tenant_id, r.dimension, r.dimension_value, r.granularity)
        writes[key] = (f"{r.cost} {int(end.timestamp() * 1000)}", int((end + GRACE - now).total_seconds()))
    return writes


# One command for a whole batch: redis-py spends ~60 µs of Python per pipelined SET, but little per
# argument of a single command.
_SET_ALL = """
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[2 * i - 1], 'EX', ARGV[2 * i])
end
return #KEYS
"""
_CHUNK = 5000


def write_spend(client: redis.Redis, rollups: Iterable[Rollup], now: datetime | None = None) -> int:
    """Mirror the rollups' absolute spend into Redis (SET with expiry, one script call per 5,000 keys)."""
    now = now or datetime.now(UTC)
    writes = list(spend_writes(rollups, now).items())
    set_all = client.register_script(_SET_ALL)
    for first in range(0, len(writes), _CHUNK):
        chunk = writes[first : first + _CHUNK]
        args: list[str | int] = []
        for _key, (value, ttl) in chunk:
            args += (value, ttl)
        set_all(keys=[key for key, _ in chunk], args=args)
    return len(writes)
