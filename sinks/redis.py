"""The Redis sink: current spend per scope and period, and how current it is, for quota checks.

The keys and values are the contract in ``schemas/redis_keys.py`` (its docstring has the layout);
this module only writes them. Spend values are the absolute totals the Postgres sink read back after
its transaction (``sinks.postgres.BatchResult.rollups``), so a replayed batch writes the same value
again; only windows open at the time of writing are written, each expiring a day after its period ends.
A write that arrives after a newer one (another writer of the scope was faster) leaves the newer value
(``schemas.redis_keys.spend_write_wins``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

import redis

from schemas.periods import PERIODS, period_end
from schemas.records import Rollup
from schemas.redis_keys import (
    FRESHNESS_TTL_MS,
    format_freshness,
    format_spend,
    freshness_heartbeat_ms,
    is_scope_dimension,
    spend_key,
)

GRACE = timedelta(days=1)


def spend_writes(rollups: Iterable[Rollup], now: datetime) -> dict[str, tuple[str, int]]:
    """Key → (value, TTL seconds) for the rollups a quota check reads: only windows open at ``now``
    (late events of an ended period, or events stamped in the future, would hide the current one)."""
    writes: dict[str, tuple[str, int]] = {}
    for r in rollups:
        if r.granularity not in PERIODS or not is_scope_dimension(r.dimension) or r.window_start > now:
            continue
        end = period_end(r.granularity, r.window_start, r.time_zone)
        if end <= now:
            continue
        key = spend_key(r.tenant_id, r.dimension, r.dimension_value, r.granularity)
        value = format_spend(r.cost, end, r.calls, r.time_zone)
        writes[key] = (value, int((end + GRACE - now).total_seconds()))
    return writes


# One command for a whole batch: redis-py spends ~60 µs of Python per pipelined SET, but little per
# argument of a single command. A key that holds a newer value keeps it: the rule of
# schemas.redis_keys.spend_write_wins (same zone and a later (period end, calls) is newer; a value
# without a version, written before versions existed, is replaced).
_SET_NEWER = """
local written = 0
for i, key in ipairs(KEYS) do
    local value, write = ARGV[2 * i - 1], true
    local stored = redis.call('GET', key)
    if stored then
        local stored_end, stored_calls, stored_zone = string.match(stored, '^%S+ (%d+) (%d+) (%S+)$')
        local new_end, new_calls, new_zone = string.match(value, '^%S+ (%d+) (%d+) (%S+)$')
        if stored_zone and new_zone == stored_zone then
            stored_end, new_end = tonumber(stored_end), tonumber(new_end)
            write = new_end > stored_end or (new_end == stored_end and tonumber(new_calls) >= tonumber(stored_calls))
        end
    end
    if write then
        redis.call('SET', key, value, 'EX', ARGV[2 * i])
        written = written + 1
    end
end
return written
"""
_CHUNK = 5000


def forget_keys(scopes: Iterable[tuple[str, str, str]]) -> list[str]:
    """The spend keys of (tenant, dimension, value) scopes that lost their live state (``streams/live.py``)."""
    return [spend_key(t, d, v, p) for t, d, v in scopes if is_scope_dimension(d) for p in PERIODS]


def delete_keys(client: redis.Redis | redis.RedisCluster, keys: Sequence[str]) -> None:
    for first in range(0, len(keys), _CHUNK):
        client.delete(*keys[first : first + _CHUNK])  # a cluster client splits a DEL by slot itself


def write_spend(
    client: redis.Redis | redis.RedisCluster,
    rollups: Iterable[Rollup],
    now: datetime | None = None,
    forget: Sequence[str] = (),
) -> int:
    """Mirror the rollups' absolute spend into Redis (SET with expiry unless a newer value is there, one
    script call per 5,000 keys; on a cluster, per 5,000 keys of one hash slot); delete the ``forget`` keys
    first. Returns how many keys were sent."""
    delete_keys(client, forget)
    now = now or datetime.now(UTC)
    writes = list(spend_writes(rollups, now).items())
    if isinstance(client, redis.RedisCluster):
        _write_by_slot(client, writes)
        return len(writes)
    set_newer = client.register_script(_SET_NEWER)
    for first in range(0, len(writes), _CHUNK):
        keys, args = _script_arguments(writes[first : first + _CHUNK])
        set_newer(keys=keys, args=args)
    return len(writes)


def _script_arguments(writes: Sequence[tuple[str, tuple[str, int]]]) -> tuple[list[str], list[str | int]]:
    args: list[str | int] = []
    for _key, (value, ttl) in writes:
        args += (value, ttl)
    return [key for key, _ in writes], args


def _write_by_slot(client: redis.RedisCluster, writes: Sequence[tuple[str, tuple[str, int]]]) -> None:
    """A script may only touch keys of one hash slot: one call per slot (a slot holds whole tenants, see
    the hash tag in ``schemas/redis_keys.py``), all sent in one pipeline (a round trip per node)."""
    by_slot: dict[int, list[tuple[str, tuple[str, int]]]] = {}
    for write in writes:
        by_slot.setdefault(client.keyslot(write[0]), []).append(write)
    pipe = client.pipeline()
    for slot_writes in by_slot.values():
        for first in range(0, len(slot_writes), _CHUNK):
            keys, args = _script_arguments(slot_writes[first : first + _CHUNK])
            # EVAL as a raw command: a cluster pipeline has no .eval() and refuses EVALSHA (it could not
            # load a missing script); Redis caches the script by its hash either way.
            pipe.execute_command("EVAL", _SET_NEWER, len(keys), *keys, *args)
    pipe.execute()


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
