"""The Redis contract: every key and value the pipeline writes and quota clients read.

Writers: ``sinks/redis.py`` (spend, freshness), the worker (``streams/``: budgets and rate limits
mirrored from ``config.budgets``, stale-call counts read back by stage 2). Readers: ``producers/quota.py``
(``check`` in one ``MGET``, ``reserve`` in one Lua script) and the dashboard. Both sides build keys and
values with the functions here, so neither can drift from the other.

A scope is (tenant, dimension, value): ``dimension`` is one of :data:`SCOPE_DIMENSIONS` or a tag
dimension ``tag:<tag name>`` (:func:`tag_dimension`), and ``value`` is empty for ``tenant``; a model's
value is ``<provider>/<model>``. Percent signs, colons and braces inside names are percent-escaped
(:func:`escape_part`), so no two scopes share a key and no name can end the hash tag. Amounts are
decimal strings, never floats.

    key                                    value                                                  expires
    tm:{<tenant>}:spend:<scope>:<period>   "<spend> <period end, Unix ms> <calls> <time zone>"    period end + 1 day
    tm:{<tenant>}:budget:<scope>           JSON {"limit": "10", "period": "month", "hard": true,  never
                                                 "on_stale": "allow"}
    tm:{<tenant>}:ratelimit:<scope>        JSON with any of RATE_LIMITS (whole numbers)           never
    tm:{<tenant>}:rate:<scope>:calls:m<minute>    counter: calls reserved in that Unix minute     120 s
    tm:{<tenant>}:rate:<scope>:tokens:m<minute>   counter: tokens reserved in that Unix minute    120 s
    tm:{<tenant>}:rate:<scope>:calls:d<YYYYMMDD>  counter: calls reserved that UTC day            2 days
    tm:{<tenant>}:held:<scope>             hash: reservation id →                                 longest hold
                                                 "<nano-USD>:<expires ms>[:<counted after ms>]"
    tm:{<tenant>}:stale_calls:<scope>      hash: "<period>:<period end ms>" → calls               40 days
    tm:{<tenant>}:credits:tenant:          "<prepaid balance, nano-USD> <counted up to, Unix ms>"  never
    tm:freshness:<worker id>               hash: stage-1 process → "<caught up to ms> <heartbeat ms>"  1 day

``<scope>`` is ``<dimension>:<value>``; budgets and rate limits are deleted with their config record.

- Redis Cluster: ``{<tenant>}`` is the hash tag, so every key of a tenant lives in one hash slot and one
  quota call (``check``'s ``MGET``, ``reserve``'s script) touches one node. The freshness hash is per
  worker group, not per tenant: it is read beside the tenant's keys, never inside a script with them.
  The tag comes right after ``tm:``, where no key of the earlier untagged layout (``tm:spend:<tenant>:…``)
  had a brace, so no old key can be read as a new one. Upgrading, the old keys are simply ignored: spend
  is rewritten by each scope's next batch (a budgeted scope's by stage 1 at start), budgets and rate
  limits by the config follower at worker start. Old counters, holds and spend expire; old budget and
  rate-limit keys stay until deleted by hand (``tm:budget:*``, ``tm:ratelimit:*``).
- Spend: ``period`` is ``day``, ``week`` (ISO, Monday) or ``month`` in the tenant's time zone
  (``schemas/periods.py``), e.g. ``tm:{acme}:spend:feature:search:month → "12.5 1767225600000 42 UTC"``.
  The value carries the end of the period it counts, so a reader needs no time zone: spend whose period
  has ended is zero. Values are absolute totals (a replayed batch writes the same value again); only
  windows open at the time of writing are written, one key per scope and period kind. A write never
  replaces a newer value (:func:`spend_write_wins`): two writers of one scope (keyless input spread over
  partitions, a worker finishing a batch after losing its partitions) may land in either order.
  Values of the earlier format ``"<spend> <period end>"`` are still read, and any write replaces them.
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
- Credits: only for a tenant on prepaid terms (``schemas/credits.py``), written by the worker
  (``streams/credits.py``, :func:`credit_write_wins`), deleted when its last grant is voided. The
  balance is what its open grants have left after every call produced before "counted up to" (a
  caught-up time of the freshness hash, read before the balance was derived from Postgres). ``reserve``
  keeps a committed cost of such a tenant held until both the spend and this balance have counted it.
- Stale calls: calls a quota client let through under a hard budget whose spend data was stale
  (``on_stale=allow``), per budget window; stage 2 reads them when such a budget turns out overrun.

``reserve`` passes one scope's keys to its Lua script in the order of :data:`SCOPE_KEYS`
(:func:`scope_keys`); on a single node the freshness hash follows as the last key, on a cluster the
client reads it first and passes how current the spend is as an argument.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from typing import NamedTuple

from schemas.periods import PERIODS

SCOPE_DIMENSIONS = ("tenant", "feature", "user", "environment", "team", "api_key", "model")
# A tag scope's dimension is "tag:<tag name>" and its value the tag's value: ``tag:project`` / ``apollo``.
# The name is the event's tag key as is (any printable text up to 64 characters, ':' and '=' included);
# inside a key the whole dimension is escaped like a name (:func:`escape_part`), so ``tag%3Aproject``.
TAG_DIMENSION_PREFIX = "tag:"


def tag_dimension(tag_name: str) -> str:
    """The dimension of a tag scope: ``tag_dimension("project") == "tag:project"``."""
    return TAG_DIMENSION_PREFIX + tag_name


def is_scope_dimension(dimension: str) -> bool:
    """One of :data:`SCOPE_DIMENSIONS`, or a tag dimension with a non-empty name (its other rules are the
    tag keys' of ``schemas/events.py``, checked where a budget is validated)."""
    return dimension in SCOPE_DIMENSIONS or (
        dimension.startswith(TAG_DIMENSION_PREFIX) and len(dimension) > len(TAG_DIMENSION_PREFIX)
    )


# The rate limits of a rate-limit value, and the counters they are checked against (same order).
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
    """A name as it appears inside a key: ``%`` → ``%25``, ``:`` → ``%3A``, ``{`` → ``%7B``, ``}`` → ``%7D``
    (a brace in a tenant id would otherwise end or move the hash tag)."""
    return part.replace("%", "%25").replace(":", "%3A").replace("{", "%7B").replace("}", "%7D")


_UNESCAPED = {"25": "%", "3A": ":", "7B": "{", "7D": "}"}


def unescape_part(part: str) -> str:
    """The inverse of :func:`escape_part`, in one pass."""
    return re.sub(r"%(25|3A|7B|7D)", lambda m: _UNESCAPED[m.group(1)], part)


def _tenant_key(kind: str, tenant_id: str, dimension: str, value: str) -> str:
    if dimension not in SCOPE_DIMENSIONS:  # a tag dimension holds a ':' and the tag name's own text
        dimension = escape_part(dimension)
    return f"tm:{{{escape_part(tenant_id)}}}:{kind}:{dimension}:{escape_part(value)}"


class ScopeKey(NamedTuple):
    """A per-tenant key taken apart (:func:`parse_scope_key`)."""

    kind: str  # spend, budget, ratelimit, rate, held, stale_calls, credits
    tenant_id: str
    dimension: str
    value: str
    rest: str  # after the scope: the period of a spend key, "calls:m<minute>" of a counter; else ""


# Escaped names hold no colon or brace, so each part is unambiguous.
_SCOPE_KEY = re.compile(r"tm:\{([^{}:]*)\}:([a-z_]+):([^{}:]+):([^{}:]*)(?::(.*))?")


def parse_scope_key(key: str) -> ScopeKey | None:
    """The kind and scope of a per-tenant key; None for any other key (the freshness hash, or a key of the
    untagged layout before Redis Cluster support, which nothing reads any more)."""
    match = _SCOPE_KEY.fullmatch(key)
    if match is None:
        return None
    tenant, kind, dimension, value, rest = match.groups()
    return ScopeKey(kind, unescape_part(tenant), unescape_part(dimension), unescape_part(value), rest or "")


def _glob_literal(text: str) -> str:
    """``text`` matched literally by a SCAN pattern (Redis glob: ``* ? [ ] \\`` are special)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def spend_pattern(dimension: str, value: str, period: str) -> str:
    """A SCAN pattern for the spend keys of one scope and period in every tenant, e.g. each tenant's own
    month: ``spend_pattern("tenant", "", "month")``."""
    scope = f"{_glob_literal(escape_part(dimension))}:{_glob_literal(escape_part(value))}:{_glob_literal(period)}"
    return f"tm:{{*}}:spend:{scope}"


def budget_pattern() -> str:
    """A SCAN pattern for every budget key (of every tenant and scope)."""
    return "tm:{*}:budget:*"


# ---------------------------------------------------------------- spend
def spend_key(tenant_id: str, dimension: str, value: str, period: str) -> str:
    return f"{_tenant_key('spend', tenant_id, dimension, value)}:{period}"


def format_spend(spend: Decimal, period_end: datetime, calls: int, time_zone: str) -> str:
    """A spend value: the period's absolute spend and when the period ends, then what orders two writes of
    it (:func:`spend_write_wins`): the window's call count and the time zone its windows are cut in."""
    return f"{spend} {int(period_end.timestamp() * 1000)} {calls} {time_zone}"


def spend_value(raw: bytes | str | None, now: datetime) -> Decimal:
    """The spend a spend value counts for the period open at ``now`` (zero once it ended)."""
    if not raw:
        return Decimal(0)
    text = raw.decode() if isinstance(raw, bytes) else raw
    amount, end_ms = text.split(" ", 2)[:2]
    return Decimal(amount) if int(end_ms) > now.timestamp() * 1000 else Decimal(0)


def spend_period_end_ms(raw: bytes | str) -> int:
    """The end of the period a spend value counts, Unix ms."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(text.split(" ", 2)[1])


# '^%S+ (%d+) (%d+) (%S+)$' in the write script of sinks/redis.py
_VERSIONED_SPEND = re.compile(r"\S+ (\d+) (\d+) (\S+)", re.ASCII)


def spend_version(raw: bytes | str | None) -> tuple[str, int, int] | None:
    """(time zone, period end ms, calls) of a spend value; None for one without a version (the two-field
    format written before versioned writes, or anything else)."""
    if not raw:
        return None
    match = _VERSIONED_SPEND.fullmatch(raw.decode() if isinstance(raw, bytes) else raw)
    if match is None:
        return None
    end_ms, calls, time_zone = match.groups()
    return time_zone, int(end_ms), int(calls)


def spend_write_wins(value: str, stored: bytes | str | None) -> bool:
    """Whether a spend write of ``value`` replaces the ``stored`` one (the write script in ``sinks/redis.py``
    applies this rule in Lua): yes unless both are cut in the same time zone and the stored one has a later
    (period end, calls).

    Within a zone, windows of one period kind follow each other, so a later end is a later window; within a
    window, every batch that advances it adds calls (only new ledger rows advance a rollup, each a call),
    and the row lock orders those batches, so more calls is a later total and equal calls the same total
    (an idempotent rewrite). ``tenant set --timezone`` rebuilds the tenant's windows in another zone, where
    neither compares: the last write wins there, as before versions, and the tenant's next batch (in the
    new zone) settles it."""
    old = spend_version(stored)
    new = spend_version(value)
    if old is None or new is None or new[0] != old[0]:
        return True
    return new[1:] >= old[1:]


# ---------------------------------------------------------------- budgets, rate limits, reservations
def budget_key(tenant_id: str, dimension: str, value: str) -> str:
    return _tenant_key("budget", tenant_id, dimension, value)


def rate_limit_key(tenant_id: str, dimension: str, value: str) -> str:
    return _tenant_key("ratelimit", tenant_id, dimension, value)


def rate_counter_keys(tenant_id: str, dimension: str, value: str, now: datetime) -> list[str]:
    """Calls this minute, tokens this minute, calls today (UTC) — counted by ``reserve`` (:data:`RATE_COUNTERS`)."""
    scope = _tenant_key("rate", tenant_id, dimension, value)
    minute = int(now.timestamp()) // 60
    return [f"{scope}:calls:m{minute}", f"{scope}:tokens:m{minute}", f"{scope}:calls:d{now:%Y%m%d}"]


def held_key(tenant_id: str, dimension: str, value: str) -> str:
    return _tenant_key("held", tenant_id, dimension, value)


def to_nano(amount: Decimal) -> int:
    return int((amount * NANO).to_integral_value())


def format_held(amount_nano: int, expires_ms: int, counted_after_ms: int | None = None) -> str:
    """A held entry: a reservation (no ``counted_after_ms``) or a committed cost."""
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
    """Per worker group, not per tenant: in a cluster it lives in a slot of its own (no tenant keys beside it)."""
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
    return _tenant_key("stale_calls", tenant_id, dimension, value)


def stale_calls_field(period: str, end_ms: int) -> str:
    return f"{period}:{end_ms}"


# ---------------------------------------------------------------- prepaid credits
# The largest balance mirrored: integer nano-USD stay exact in the quota script's doubles below 2**53.
MAX_MIRRORED_NANO = 9 * 10**15


def credits_key(tenant_id: str) -> str:
    """The tenant's prepaid balance (a tenant-scope key: it lives in the tenant's hash slot)."""
    return _tenant_key("credits", tenant_id, "tenant", "")


def format_credit_balance(balance: Decimal, counted_up_to_ms: int) -> str:
    """The mirrored balance, in whole nano-USD rounded down (never more than the grants hold), capped."""
    nano = min(int((balance * NANO).to_integral_value(rounding=ROUND_FLOOR)), MAX_MIRRORED_NANO)
    return f"{nano} {counted_up_to_ms}"


def credit_balance(raw: bytes | str | None) -> tuple[Decimal, int] | None:
    """(balance USD, counted up to ms) of a mirrored value; None if absent or unreadable."""
    if not raw:
        return None
    match = re.fullmatch(r"(-?\d+) (\d+)", raw.decode() if isinstance(raw, bytes) else raw, re.ASCII)
    if match is None:
        return None
    return Decimal(int(match.group(1))) / NANO, int(match.group(2))


def credit_write_wins(value: str, stored: bytes | str | None) -> bool:
    """A balance write replaces the stored one unless that one counts up to a later instant (two workers
    may write in either order; the quota script must never see "counted up to" go back)."""
    old, new = credit_balance(stored), credit_balance(value)
    return old is None or new is None or new[1] >= old[1]
