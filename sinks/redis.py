"""The Redis sink: current spend per scope and period, for quota checks in one round trip.

Layout (all values are decimal strings, never floats):

    tm:spend:<tenant>:<dimension>:<value>:<period>:<start>   e.g. tm:spend:acme:feature:search:month:2025-07-01

``dimension`` is ``tenant`` (value empty), ``feature``, ``user`` or ``environment``; ``period`` is
``day``, ``week`` (ISO, Monday) or ``month``, in UTC. Values are the absolute totals the Postgres
sink read back after its transaction (``sinks.postgres.BatchResult.rollups``), written with ``SET``
so a replayed batch writes the same value again. Each key expires a day after its period ends, so
the key count is bounded by (scopes × open periods). Colons and percent signs inside names are
percent-escaped, so no two scopes share a key.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import redis

from sinks.postgres import Rollup

PERIODS = ("day", "week", "month")
SCOPE_DIMENSIONS = ("tenant", "feature", "user", "environment")
GRACE = timedelta(days=1)


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


def period_start(period: str, at: datetime) -> datetime:
    at = at.astimezone(UTC)
    day = datetime(at.year, at.month, at.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def period_end(period: str, start: datetime) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    if period == "month":
        return (start + timedelta(days=32)).replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def spend_key(tenant_id: str, dimension: str, value: str, period: str, start: datetime) -> str:
    return f"tm:spend:{_escape(tenant_id)}:{dimension}:{_escape(value)}:{period}:{start.date().isoformat()}"


def spend_writes(rollups: Iterable[Rollup], now: datetime) -> dict[str, tuple[str, int]]:
    """Key → (value, TTL seconds) for the rollups a quota check reads; closed periods are skipped."""
    writes: dict[str, tuple[str, int]] = {}
    for r in rollups:
        if r.granularity not in PERIODS or r.dimension not in SCOPE_DIMENSIONS:
            continue
        ttl = int((period_end(r.granularity, r.window_start) + GRACE - now).total_seconds())
        if ttl <= 0:
            continue
        key = spend_key(r.tenant_id, r.dimension, r.dimension_value, r.granularity, r.window_start)
        writes[key] = (str(r.cost), ttl)
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
    writes = list(spend_writes(rollups, now or datetime.now(UTC)).items())
    set_all = client.register_script(_SET_ALL)
    for first in range(0, len(writes), _CHUNK):
        chunk = writes[first : first + _CHUNK]
        args: list[str | int] = []
        for _key, (value, ttl) in chunk:
            args += (value, ttl)
        set_all(keys=[key for key, _ in chunk], args=args)
    return len(writes)
