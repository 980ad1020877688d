"""QuotaClient: "may this tenant / feature / user make another model call?" in one Redis round trip.

``check`` reads; ``reserve`` / ``commit`` / ``release`` hold a call's estimated cost against hard
budgets and count it against rate limits (calls and tokens per minute, calls per day) atomically.

The pipeline keeps Redis current (keys and values: ``schemas/redis_keys.py``): the spend of each scope
for its open day, week and month (in the tenant's time zone; each value carries its period's end, so no
zone is needed here), and the budgets and rate limits that apply. ``check`` reads all of them with one
``MGET`` and decides here, so a raised limit or a new period unblocks a scope without anybody having to
clear a flag.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from deploy.settings import Settings, get_settings, redis_client
from schemas.periods import PERIODS
from schemas.records import scope_label
from schemas.redis_keys import (
    LIVE_WITHIN_MS,
    NANO,
    RATE_COUNTER_TTL_S,
    RATE_COUNTERS,
    RATE_LIMITS,
    SCOPE_KEYS,
    STALE_CALLS_TTL_MS,
    budget_key,
    caught_up_ms,
    format_held,
    freshness_key,
    rate_counter_keys,
    rate_limit_key,
    scope_keys,
    spend_key,
    spend_period_end_ms,
    spend_value,
    stale_calls_field,
    stale_calls_key,
    to_nano,
)


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    spent: Decimal  # in the scope and period of the deciding budget (or the narrowest scope's month)
    limit: Decimal | None
    remaining: Decimal | None
    reason: str
    scope: str
    period: str
    stale: bool = False  # the spend data is older than the client's bound (the pipeline is behind)
    data_age_s: float | None = None  # how old it is; None: no worker has reported yet

    def as_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "spent": str(self.spent),
            "limit": None if self.limit is None else str(self.limit),
            "remaining": None if self.remaining is None else str(self.remaining),
            "reason": self.reason,
            "scope": self.scope,
            "period": self.period,
            "stale": self.stale,
            "data_age_s": None if self.data_age_s is None else round(self.data_age_s, 3),
        }


# ---------------------------------------------------------------- reservations (hard budgets under concurrency)
# Check-then-call lets N concurrent calls all see the same remaining budget and all go ahead. A
# reservation holds the estimated cost atomically (one Lua script over every scope's budget, spend
# and held amounts), so concurrent callers can overrun a hard budget by at most what they reserved.
# Amounts are integer nano-USD inside the script (exact below ~$9M); Decimal outside.
# KEYS: each scope's keys in the order of SCOPE_KEYS (``scope_keys``), all in the tenant's hash slot; on a
# single node, the freshness hash last (ARGV[10] "hash"). A cluster script may touch one slot only, so
# there the client reads the freshness hash first and passes how current the spend is (ARGV[10]: Unix
# ms, or "" if no worker has reported). The script's @name@ placeholders (positions within a scope,
# counter TTLs) are filled in from that contract.
_RESERVE_TEMPLATE = """
local now, amount, entry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local id, ttl, tokens = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local stale_after, live_within = tonumber(ARGV[7]), tonumber(ARGV[8])
local column = @spend_columns@
local scopes = math.floor(#KEYS / @per_scope@)
-- how current the spend is (schemas.redis_keys.caught_up_ms): the least current live stage 1, else the newest
local caught_up, newest = nil, nil
if ARGV[10] == 'hash' then
  local beats = redis.call('HGETALL', KEYS[#KEYS])
  for i = 1, #beats, 2 do
    local c, b = string.match(beats[i + 1], '^(%d+) (%d+)$')
    if c then
      c, b = tonumber(c), tonumber(b)
      if newest == nil or c > newest then newest = c end
      if now - b <= live_within and (caught_up == nil or c < caught_up) then caught_up = c end
    end
  end
else
  caught_up = tonumber(ARGV[10])
end
caught_up = caught_up or newest
local stale = caught_up == nil or now - caught_up > stale_after
-- held amounts: a reservation until it expires; a committed cost until the spend has counted it
local function held(key)
  local total, fields = 0, redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local amount_text, expires, counted_after = string.match(fields[i + 1], '^(%d+):(%d+):?(%d*)$')
    local counted = counted_after ~= nil and counted_after ~= '' and caught_up ~= nil
      and caught_up >= tonumber(counted_after)
    if amount_text == nil or tonumber(expires) < now or counted then
      redis.call('HDEL', key, fields[i])
    else
      total = total + tonumber(amount_text)
    end
  end
  return total
end
local function count(key) return tonumber(redis.call('GET', key) or '0') end
local cleaned = {}
for s = 0, scopes - 1 do
  local k = s * @per_scope@
  local raw = redis.call('GET', KEYS[k + 1])
  if raw then
    local budget = cjson.decode(raw)
    if budget['hard'] and stale and budget['on_stale'] == 'block' then
      return {0, s, 'stale', caught_up and (now - caught_up) or -1, 0}
    end
    if budget['hard'] then
      local spent = 0
      local raw_spend = redis.call('GET', KEYS[k + column[budget['period']]])
      if raw_spend then
        local amount_text, ends = string.match(raw_spend, '^(%S+) (%d+)')  -- then calls and zone, if versioned
        if ends and tonumber(ends) > now then spent = math.floor(tonumber(amount_text) * 1e9 + 0.5) end
      end
      local holding = held(KEYS[k + @held@])
      cleaned[s] = true
      if spent + holding + amount > math.floor(tonumber(budget['limit']) * 1e9 + 0.5) then
        return {0, s, 'budget', spent, holding}
      end
    end
  end
  local limits = redis.call('GET', KEYS[k + @rate_limit@])
  if limits then
    local limit = cjson.decode(limits)
    for name, v in pairs(limit) do if v == cjson.null then limit[name] = nil end end
    if limit['calls_per_minute'] and count(KEYS[k + @calls_minute@]) + 1 > limit['calls_per_minute'] then
      return {0, s, 'calls_per_minute', count(KEYS[k + @calls_minute@]), limit['calls_per_minute']}
    end
    if limit['tokens_per_minute'] and count(KEYS[k + @tokens_minute@]) + tokens > limit['tokens_per_minute'] then
      return {0, s, 'tokens_per_minute', count(KEYS[k + @tokens_minute@]), limit['tokens_per_minute']}
    end
    if limit['calls_per_day'] and count(KEYS[k + @calls_day@]) + 1 > limit['calls_per_day'] then
      return {0, s, 'calls_per_day', count(KEYS[k + @calls_day@]), limit['calls_per_day']}
    end
  end
end
for s = 0, scopes - 1 do
  local k = s * @per_scope@
  if not cleaned[s] then held(KEYS[k + @held@]) end  -- scopes without a hard budget are kept small too
  redis.call('HSET', KEYS[k + @held@], id, entry)
  redis.call('PEXPIRE', KEYS[k + @held@], math.max(ttl * 2, tonumber(ARGV[9])))
  redis.call('INCR', KEYS[k + @calls_minute@]); redis.call('EXPIRE', KEYS[k + @calls_minute@], @calls_minute_ttl@)
  redis.call('INCRBY', KEYS[k + @tokens_minute@], tokens)
  redis.call('EXPIRE', KEYS[k + @tokens_minute@], @tokens_minute_ttl@)
  redis.call('INCR', KEYS[k + @calls_day@]); redis.call('EXPIRE', KEYS[k + @calls_day@], @calls_day_ttl@)
end
return {1, stale and 1 or 0}
"""


def _lua(template: str) -> str:
    """The script with each key's position within a scope, the scope size and the counters' TTLs filled in."""
    at = {kind: i + 1 for i, kind in enumerate(SCOPE_KEYS)}  # Lua counts from 1
    values: dict[str, object] = {
        **at,
        "per_scope": len(SCOPE_KEYS),
        "spend_columns": "{" + ", ".join(f"{period} = {at[f'spend_{period}']}" for period in PERIODS) + "}",
        **{f"{counter}_ttl": ttl for counter, ttl in zip(RATE_COUNTERS, RATE_COUNTER_TTL_S, strict=True)},
    }
    for name, value in values.items():
        template = template.replace(f"@{name}@", str(value))
    if "@" in template:
        raise AssertionError(f"unfilled placeholder in the reserve script: {template[template.index('@') :][:40]}")
    return template


_RESERVE = _lua(_RESERVE_TEMPLATE)
_HELD = SCOPE_KEYS.index("held")


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    allowed: bool
    amount: Decimal
    reason: str
    keys: tuple[str, ...]


def _scopes(feature: str | None, user_id: str | None, environment: str | None = None) -> list[tuple[str, str]]:
    scopes = [("tenant", "")]
    for dimension, value in (("feature", feature), ("user", user_id), ("environment", environment)):
        if value:
            scopes.append((dimension, value))
    return scopes


class QuotaClient:
    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = client or redis_client(self.settings, socket_timeout=1.0)
        self._cluster = isinstance(self.redis, redis.RedisCluster)

    def check(
        self,
        tenant_id: str,
        feature: str | None = None,
        user_id: str | None = None,
        *,
        environment: str | None = None,
        now: datetime | None = None,
    ) -> QuotaDecision:
        """Allowed unless an exhausted hard budget or a reached rate limit of the tenant, feature, user or
        environment says no; reports the tightest budget. One MGET."""
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id, environment)
        keys = [budget_key(tenant_id, d, v) for d, v in scopes]
        keys += [spend_key(tenant_id, d, v, p) for d, v in scopes for p in PERIODS]
        keys += [rate_limit_key(tenant_id, d, v) for d, v in scopes]
        keys += [key for d, v in scopes for key in rate_counter_keys(tenant_id, d, v, now)]
        pipe = self.redis.pipeline(transaction=False)  # one round trip: MGET + the freshness hash
        # A cluster pipeline refuses .mget() (keys may span slots); these share the tenant's slot.
        pipe.execute_command("MGET", *keys)
        pipe.hgetall(freshness_key(self.settings.worker_id))
        values, beats = pipe.execute()
        now_ms = int(now.timestamp() * 1000)
        caught_up = caught_up_ms(beats, now_ms)
        age = None if caught_up is None else max(0.0, (now_ms - caught_up) / 1000)
        stale = age is None or age > self.settings.quota_stale_after_s
        n = len(scopes)
        budgets = values[:n]
        spend_scopes = [(d, v, p) for d, v in scopes for p in PERIODS]
        spend_raw = values[n : n + len(spend_scopes)]
        spend = {scope: spend_value(raw, now) for scope, raw in zip(spend_scopes, spend_raw, strict=True)}
        decision = decide(tenant_id, scopes, budgets, spend, stale=stale, data_age_s=age)
        if stale and decision.allowed:
            self._count_stale_calls(tenant_id, scopes, budgets, dict(zip(spend_scopes, spend_raw, strict=True)))
        limits = values[n + len(spend_scopes) : 2 * n + len(spend_scopes)]
        counters = values[2 * n + len(spend_scopes) :]
        for i, raw in enumerate(limits):
            reached = rate_limit_reached(raw, counters[3 * i : 3 * i + 3])
            if reached and decision.allowed:
                scope = scope_label(tenant_id, *scopes[i])
                return QuotaDecision(
                    False,
                    decision.spent,
                    decision.limit,
                    decision.remaining,
                    f"rate limit of {scope}: {reached}",
                    decision.scope,
                    decision.period,
                    stale,
                    age,
                )
        return decision

    def reserve(
        self,
        tenant_id: str,
        estimated_cost: Decimal,
        feature: str | None = None,
        user_id: str | None = None,
        *,
        environment: str | None = None,
        tokens: int = 0,
        ttl_s: float = 300.0,
        now: datetime | None = None,
    ) -> Reservation:
        """Before a model call: hold ``estimated_cost`` against every hard budget of the tenant, feature
        and user and count the call (and its ``tokens``) against their rate limits — or refuse, if any
        of them would be exceeded. Atomic across any number of service replicas."""
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id, environment)
        keys = [key for d, v in scopes for key in scope_keys(tenant_id, d, v, now)]
        amount = to_nano(estimated_cost)
        now_ms, ttl_ms = int(now.timestamp() * 1000), int(ttl_s * 1000)
        if self._cluster:  # the freshness hash is in another slot: read it first (see _RESERVE_TEMPLATE)
            caught_up = caught_up_ms(self.redis.hgetall(freshness_key(self.settings.worker_id)), now_ms)  # type: ignore[arg-type]
            freshness = "" if caught_up is None else str(caught_up)
        else:
            keys.append(freshness_key(self.settings.worker_id))
            freshness = "hash"
        reservation_id = uuid.uuid4().hex
        outcome = self.redis.eval(
            _RESERVE,
            len(keys),
            *keys,
            now_ms,
            amount,
            format_held(amount, now_ms + ttl_ms),
            reservation_id,
            ttl_ms,
            tokens,
            int(self.settings.quota_stale_after_s * 1000),
            LIVE_WITHIN_MS,
            int(self.settings.quota_hold_max_s * 1000),
            freshness,
        )
        held_keys = tuple(keys[_HELD :: len(SCOPE_KEYS)])
        if outcome[0] == 1:
            if len(outcome) > 1 and outcome[1] == 1:  # allowed on stale data: remember it for the overrun alert
                budgets = self.redis.mget([budget_key(tenant_id, d, v) for d, v in scopes])
                spend_scopes = [(d, v, p) for d, v in scopes for p in PERIODS]
                spend_raw = self.redis.mget([spend_key(tenant_id, d, v, p) for d, v, p in spend_scopes])
                self._count_stale_calls(tenant_id, scopes, budgets, dict(zip(spend_scopes, spend_raw, strict=True)))
            return Reservation(reservation_id, True, estimated_cost, "reserved", held_keys)
        dimension, value = scopes[int(outcome[1])]
        scope = scope_label(tenant_id, dimension, value)
        what = outcome[2].decode() if isinstance(outcome[2], bytes) else str(outcome[2])
        if what == "stale":
            age_text = "no worker has reported" if int(outcome[3]) < 0 else f"it is {int(outcome[3]) / 1000:.0f}s old"
            reason = (
                f"hard budget of {scope} blocks while its spend data is stale ({age_text}, bound "
                f"{self.settings.quota_stale_after_s:g}s): the pipeline is behind"
            )
        elif what == "budget":
            spent, holding = Decimal(outcome[3]) / NANO, Decimal(outcome[4]) / NANO
            reason = (
                f"hard budget of {scope} cannot take ${estimated_cost}: "
                f"${spent.normalize():f} spent and ${holding.normalize():f} held by calls in flight"
            )
        else:
            reason = f"rate limit of {scope}: {what.replace('_', ' ')} is {outcome[4]} ({outcome[3]} used)"
        return Reservation(reservation_id, False, estimated_cost, reason, held_keys)

    def _count_stale_calls(
        self,
        tenant_id: str,
        scopes: list[tuple[str, str]],
        budgets: list[Any],
        spend_raw: dict[tuple[str, str, str], Any],
    ) -> None:
        """Count a call allowed while the spend data was stale, per hard budget with ``on_stale=allow``
        (only during an outage, so the extra round trip costs nothing in normal operation)."""
        pipe = self.redis.pipeline(transaction=False)
        for (dimension, value), raw in zip(scopes, budgets, strict=True):
            budget = json.loads(raw) if raw else {}
            if not budget.get("hard") or budget.get("on_stale", "allow") != "allow":
                continue
            spent = spend_raw.get((dimension, value, budget["period"]))
            if not spent:
                continue  # nothing spent in this period yet, so nothing to overrun
            end_ms = spend_period_end_ms(spent)
            key = stale_calls_key(tenant_id, dimension, value)
            pipe.hincrby(key, stale_calls_field(budget["period"], end_ms), 1)
            pipe.pexpire(key, STALE_CALLS_TTL_MS)
        with contextlib.suppress(redis.RedisError):  # best effort: the decision stands either way
            pipe.execute()

    def commit(self, reservation: Reservation, actual_cost: Decimal, *, settle_s: float = 2.0) -> None:
        """After the call: hold its actual cost until the pipeline has counted it — until the spend data
        is caught up past this moment plus ``settle_s`` (the time within which the call's usage event is
        recorded), at most ``quota_hold_max_s`` — so no gap opens between the reservation and the spend,
        however far behind the pipeline falls (a Postgres outage, say)."""
        self._settle(reservation, actual_cost, settle_s)

    def release(self, reservation: Reservation) -> None:
        """The call was not made: free what it held."""
        self._settle(reservation, None, 0.0)

    def _settle(self, reservation: Reservation, actual_cost: Decimal | None, settle_s: float) -> None:
        if not reservation.allowed:
            return
        pipe = self.redis.pipeline(transaction=False)
        now_ms = int(time.time() * 1000)
        hold_ms = int(self.settings.quota_hold_max_s * 1000)
        for key in reservation.keys:
            if actual_cost is None:
                pipe.hdel(key, reservation.reservation_id)
            else:
                counted_after = now_ms + int(settle_s * 1000)
                entry = format_held(to_nano(actual_cost), now_ms + hold_ms, counted_after)
                pipe.hset(key, reservation.reservation_id, entry)
                pipe.pexpire(key, hold_ms)
        pipe.execute()


def rate_limit_reached(raw_limits: Any, raw_counts: list[Any]) -> str | None:
    """The first rate limit the counts have reached (calls/min, tokens/min, calls/day), if any."""
    if not raw_limits:
        return None
    limits = json.loads(raw_limits)
    counts = [int(c) if c else 0 for c in raw_counts]
    for name, used in zip(RATE_LIMITS, counts, strict=True):
        if limits.get(name) is not None and used >= limits[name]:
            return f"{name.replace('_', ' ')} is {limits[name]} ({used} used)"
    return None


def decide(
    tenant_id: str,
    scopes: list[tuple[str, str]],
    budgets: list[Any],
    spend: dict[tuple[str, str, str], Decimal],
    *,
    stale: bool = False,
    data_age_s: float | None = None,
) -> QuotaDecision:
    """The pure decision: blocked by any exhausted hard budget, or by a hard budget whose ``on_stale``
    policy (``block``, or ``allow_reserved`` for a call that did not reserve) applies while the spend
    data is ``stale``; otherwise report the tightest budget."""
    tightest: QuotaDecision | None = None
    for (dimension, value), raw in zip(scopes, budgets, strict=True):
        if not raw:
            continue
        budget = json.loads(raw)
        period = budget["period"]
        limit = Decimal(budget["limit"])
        spent = spend[(dimension, value, period)]
        remaining = limit - spent
        scope = scope_label(tenant_id, dimension, value)
        if budget.get("hard") and remaining <= 0:
            reason = f"hard {period} budget of ${limit} for {scope} is spent (${spent})"
            return QuotaDecision(False, spent, limit, remaining, reason, scope, period, stale, data_age_s)
        policy = budget.get("on_stale", "allow")
        if budget.get("hard") and stale and policy != "allow":
            age = "no worker has reported" if data_age_s is None else f"it is {data_age_s:.0f}s old"
            only = "blocks" if policy == "block" else "lets only reserved calls through"
            reason = f"hard {period} budget of ${limit} for {scope} {only} while its spend data is stale ({age})"
            return QuotaDecision(False, spent, limit, remaining, reason, scope, period, stale, data_age_s)
        if tightest is None or remaining < (tightest.remaining or Decimal(0)):
            kind = "hard" if budget.get("hard") else "soft"
            reason = f"within the {kind} {period} budget of ${limit} for {scope}"
            if remaining <= 0:
                reason = f"soft {period} budget of ${limit} for {scope} is exceeded; calls are still allowed"
            tightest = QuotaDecision(True, spent, limit, remaining, reason, scope, period, stale, data_age_s)
    if tightest is not None:
        return tightest
    dimension, value = scopes[-1]
    spent = spend[(dimension, value, "month")]
    scope = scope_label(tenant_id, dimension, value)
    return QuotaDecision(True, spent, None, None, "no budget applies", scope, "month", stale, data_age_s)
