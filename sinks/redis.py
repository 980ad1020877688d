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

from collections.abc import Iterable, Sequence
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
# Each stage-1 process records how current the spend it wrote is: "<caught up to, Unix ms> <heartbeat,
# Unix ms>" in one hash field per process, in one hash per worker group (``TOKENMETER_WORKER_ID``: the
# quota clients of a deployment share it with its workers). "Caught up to T" means every usage event
# produced before T is in these spend values. The data is as old as the least current live process; a
# process whose heartbeat stopped no longer counts, unless none is live (then the newest of them says
# how old it is).
LIVE_WITHIN_MS = 30_000


def freshness_key(worker_id: str) -> str:
    return f"tm:freshness:{_escape(worker_id)}"


def write_freshness(client: redis.Redis, key: str, member: str, caught_up_ms: int, now_ms: int) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, member, f"{caught_up_ms} {now_ms}")
    pipe.pexpire(key, 86_400_000)
    pipe.execute()


def caught_up_ms(entries: dict[bytes, bytes] | dict[str, str], now_ms: int) -> int | None:
    """Up to when the spend data is complete, from the freshness hash; None if no process ever wrote it."""
    live: list[int] = []
    every: list[int] = []
    for raw in entries.values():
        text = raw.decode() if isinstance(raw, bytes) else raw
        caught_text, _, beat_text = text.partition(" ")
        try:
            caught, beat = int(caught_text), int(beat_text)
        except ValueError:
            continue
        every.append(caught)
        if now_ms - beat <= LIVE_WITHIN_MS:
            live.append(caught)
    if live:
        return min(live)
    return max(every) if every else None


def prune_freshness(client: redis.Redis, key: str, now_ms: int, older_than_ms: int = 3_600_000) -> None:
    """Forget processes that stopped reporting an hour ago (each restart adds a field)."""
    stale = []
    for field, raw in client.hgetall(key).items():
        beat = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")[2]
        if not beat.isdigit() or now_ms - int(beat) > older_than_ms:
            stale.append(field)
    if stale:
        client.hdel(key, *stale)


# Calls a quota client let through under a hard budget whose spend data was stale (on_stale=allow):
# tm:stale_calls:<tenant>:<dimension>:<value> → hash "<period>:<period end ms>" → count. Stage 2 reads it
# when such a budget turns out overrun, to say the outage let the calls through.
STALE_CALLS_TTL_MS = 40 * 86_400_000


def stale_calls_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:stale_calls:{_escape(tenant_id)}:{dimension}:{_escape(value)}"


def stale_calls_field(period: str, end_ms: int) -> str:
    return f"{period}:{end_ms}"
