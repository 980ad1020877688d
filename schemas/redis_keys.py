"""The Redis contract: every key and value the pipeline writes and quota clients read.

Writers: ``sinks/redis.py`` (spend, freshness), the worker (``streams/``: budgets and rate limits
mirrored from ``config.budgets``, stale-call counts read back by stage 2). Readers: ``producers/quota.py``
(``check`` in one ``MGET``, ``reserve`` in one Lua script) and the dashboard. Both sides build keys and
values with the functions here, so neither can drift from the other.

A scope is (tenant, dimension, value): ``dimension`` is one of :data:`SCOPE_DIMENSIONS` and ``value``
is empty for ``tenant``. Colons and percent signs inside names are percent-escaped (:func:`escape_part`),
so no two scopes share a key. Amounts are decimal strings, never floats.

    key                                value                                                      expires
    tm:spend:<scope>:<period>          "<spend> <period end, Unix ms>"                            period end + 1 day
    tm:budget:<scope>                  JSON {"limit": "10", "period": "month", "hard": true,      never
                                             "on_stale": "allow"}
    tm:ratelimit:<scope>               JSON with any of RATE_LIMITS (whole numbers)               never
    tm:rate:<scope>:calls:m<minute>    counter: calls reserved in that Unix minute                120 s
    tm:rate:<scope>:tokens:m<minute>   counter: tokens reserved in that Unix minute               120 s
    tm:rate:<scope>:calls:d<YYYYMMDD>  counter: calls reserved that UTC day                       2 days
    tm:held:<scope>                    hash: reservation id →                                     longest hold
                                             "<nano-USD>:<expires ms>[:<counted after ms>]"
    tm:freshness:<worker id>           hash: stage-1 process → "<caught up to ms> <heartbeat ms>" 1 day
    tm:stale_calls:<scope>             hash: "<period>:<period end ms>" → calls                   40 days

``<scope>`` is ``<tenant>:<dimension>:<value>``; budgets and rate limits are deleted with their config
record.

- Spend: ``period`` is ``day``, ``week`` (ISO, Monday) or ``month`` in the tenant's time zone
  (``schemas/periods.py``), e.g. ``tm:spend:acme:feature:search:month → "12.5 1767225600000"``. The value
  carries the end of the period it counts, so a reader needs no time zone: spend whose period has ended
  is zero. Values are absolute totals (a replayed batch writes the same value again); only windows open
  at the time of writing are written, one key per scope and period kind.
- Budgets and rate limits: the JSON the worker mirrors from ``config.budgets`` (``Budget.redis_json``,
  ``RateLimit.redis_json`` in ``streams/budgets.py``).
- Rate counters and held amounts are written by ``QuotaClient.reserve`` / ``commit`` / ``release``
  themselves. A held entry without "counted after" is a reservation, held until it expires; with it,
  a committed cost, held until the spend data is caught up past that instant (or it expires). Amounts
  are integer nano-USD (:data:`NANO`).
- Freshness: "caught up to T" means every usage event produced before T is in the spend values. One
  field per stage-1 process, one hash per worker group (``TOKENMETER_WORKER_ID``: the quota clients of a
  deployment share it with its workers). The data is as old as the least current live process (heartbeat
  within :data:`LIVE_WITHIN_MS`); if none is live, the newest of them says how old it is.
- Stale calls: calls a quota client let through under a hard budget whose spend data was stale
  (``on_stale=allow``), per budget window; stage 2 reads them when such a budget turns out overrun.

``reserve`` passes one scope's keys to its Lua script in the order of :data:`SCOPE_KEYS`
(:func:`scope_keys`), then the freshness key last.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

from schemas.periods import PERIODS

SCOPE_DIMENSIONS = ("tenant", "feature", "user", "environment")

# The rate limits of a tm:ratelimit value, and the counters they are checked against (same order).
RATE_LIMITS = ("calls_per_minute", "tokens_per_minute", "calls_per_day")
RATE_COUNTERS = ("calls_minute", "tokens_minute", "calls_day")
RATE_COUNTER_TTL_S = (120, 120, 172_800)

# The keys of one scope that a reservation reads and writes, in the order scope_keys() returns them.
SCOPE_KEYS = ("budget", *(f"spend_{period}" for period in PERIODS), "held", "rate_limit", *RATE_COUNTERS)

NANO = Decimal("1e9")  # held amounts are integer nano-USD (exact below ~$9M in Lua's doubles)
LIVE_WITHIN_MS = 30_000  # a stage-1 process whose heartbeat is older no longer counts as live
FRESHNESS_TTL_MS = 86_400_000
STALE_CALLS_TTL_MS = 40 * 86_400_000


def escape_part(part: str) -> str:
    """A name as it appears inside a key: ``%`` → ``%25``, ``:`` → ``%3A``."""
    return part.replace("%", "%25").replace(":", "%3A")


def _scope(tenant_id: str, dimension: str, value: str) -> str:
    return f"{escape_part(tenant_id)}:{dimension}:{escape_part(value)}"


# ---------------------------------------------------------------- spend
def spend_key(tenant_id: str, dimension: str, value: str, period: str) -> str:
    return f"tm:spend:{_scope(tenant_id, dimension, value)}:{period}"


def format_spend(spend: Decimal, period_end: datetime) -> str:
    """A ``tm:spend:`` value: the period's absolute spend and when the period ends."""
    return f"{spend} {int(period_end.timestamp() * 1000)}"


def spend_value(raw: bytes | str | None, now: datetime) -> Decimal:
    """The spend a ``tm:spend:`` value counts for the period open at ``now`` (zero once it ended)."""
    if not raw:
        return Decimal(0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    amount, _, end_ms = text.partition(" ")
    return Decimal(amount) if int(end_ms) > now.timestamp() * 1000 else Decimal(0)


def spend_period_end_ms(raw: bytes | str) -> int:
    """The end of the period a ``tm:spend:`` value counts, Unix ms."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(text.partition(" ")[2])


# ---------------------------------------------------------------- budgets, rate limits, reservations
def budget_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:budget:{_scope(tenant_id, dimension, value)}"


def rate_limit_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:ratelimit:{_scope(tenant_id, dimension, value)}"


def rate_counter_keys(tenant_id: str, dimension: str, value: str, now: datetime) -> list[str]:
    """Calls this minute, tokens this minute, calls today (UTC) — counted by ``reserve`` (:data:`RATE_COUNTERS`)."""
    scope = _scope(tenant_id, dimension, value)
    minute = int(now.timestamp()) // 60
    return [
        f"tm:rate:{scope}:calls:m{minute}",
        f"tm:rate:{scope}:tokens:m{minute}",
        f"tm:rate:{scope}:calls:d{now:%Y%m%d}",
    ]


def held_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:held:{_scope(tenant_id, dimension, value)}"


def to_nano(amount: Decimal) -> int:
    return int((amount * NANO).to_integral_value())


def format_held(amount_nano: int, expires_ms: int, counted_after_ms: int | None = None) -> str:
    """A ``tm:held:`` entry: a reservation (no ``counted_after_ms``) or a committed cost."""
    if counted_after_ms is None:
        return f"{amount_nano}:{expires_ms}"
    return f"{amount_nano}:{expires_ms}:{counted_after_ms}"


def scope_keys(tenant_id: str, dimension: str, value: str, now: datetime) -> list[str]:
    """One scope's keys for ``reserve``, in the order of :data:`SCOPE_KEYS`."""
    return [
        budget_key(tenant_id, dimension, value),
        *(spend_key(tenant_id, dimension, value, period) for period in PERIODS),
        held_key(tenant_id, dimension, value),
        rate_limit_key(tenant_id, dimension, value),
        *rate_counter_keys(tenant_id, dimension, value, now),
    ]


# ---------------------------------------------------------------- freshness of the spend data
def freshness_key(worker_id: str) -> str:
    return f"tm:freshness:{escape_part(worker_id)}"


def format_freshness(caught_up_ms: int, heartbeat_ms: int) -> str:
    return f"{caught_up_ms} {heartbeat_ms}"


def freshness_heartbeat_ms(raw: bytes | str) -> int | None:
    """When the process behind a freshness field last reported (None if the value is malformed)."""
    beat = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(" ")[2]
    return int(beat) if beat.isdigit() else None


def caught_up_ms(entries: Mapping[bytes, bytes] | Mapping[str, str], now_ms: int) -> int | None:
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


# ---------------------------------------------------------------- calls allowed on stale data
def stale_calls_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:stale_calls:{_scope(tenant_id, dimension, value)}"


def stale_calls_field(period: str, end_ms: int) -> str:
    return f"{period}:{end_ms}"
