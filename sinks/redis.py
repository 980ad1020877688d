"""The Redis sink: current spend per scope and period, and how current it is, for quota checks.

The keys and values are the contract in ``schemas/redis_keys.py`` (its docstring has the layout);
this module only writes them. Spend values are the absolute totals the Postgres sink read back after
its transaction (``sinks.postgres.BatchResult.rollups``), so a replayed batch writes the same value
again; only windows open at the time of writing are written, each expiring a day after its period ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import redis

from schemas.periods import PERIODS, period_end
from schemas.records import Rollup
from schemas.redis_keys import (
    FRESHNESS_TTL_MS,
    SCOPE_DIMENSIONS,
    format_freshness,
    format_spend,
    freshness_heartbeat_ms,
    spend_key,
)

GRACE = timedelta(days=1)


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
        writes[key] = (format_spend(r.cost, end), int((end + GRACE - now).total_seconds()))
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


def forget_keys(scopes: Iterable[tuple[str, str, str]]) -> list[str]:
    """The spend keys of (tenant, dimension, value) scopes that lost their live state (``streams/live.py``)."""
    return [spend_key(t, d, v, p) for t, d, v in scopes if d in SCOPE_DIMENSIONS for p in PERIODS]


def write_spend(
    client: redis.Redis, rollups: Iterable[Rollup], now: datetime | None = None, forget: Sequence[str] = ()
) -> int:
    """Mirror the rollups' absolute spend into Redis (SET with expiry, one script call per 5,000 keys);
    delete the ``forget`` keys first."""
    for first in range(0, len(forget), _CHUNK):
        client.delete(*forget[first : first + _CHUNK])
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


# ---------------------------------------------------------------- freshness of the spend data
# Each stage-1 process records how current the spend it wrote is, in its field of the worker group's
# ``freshness_key`` hash (read by ``schemas.redis_keys.caught_up_ms``).
def write_freshness(client: redis.Redis, key: str, member: str, caught_up_ms: int, now_ms: int) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, member, format_freshness(caught_up_ms, now_ms))
    pipe.pexpire(key, FRESHNESS_TTL_MS)
    pipe.execute()


def prune_freshness(client: redis.Redis, key: str, now_ms: int, older_than_ms: int = 3_600_000) -> None:
    """Forget processes that stopped reporting an hour ago (each restart adds a field)."""
    stale = []
    for field, raw in client.hgetall(key).items():
        beat = freshness_heartbeat_ms(raw)
        if beat is None or now_ms - beat > older_than_ms:
            stale.append(field)
    if stale:
        client.hdel(key, *stale)
