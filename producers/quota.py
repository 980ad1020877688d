"""QuotaClient: "may this tenant / feature / user make another model call?" in one Redis round trip.

``check`` reads; ``reserve`` / ``commit`` / ``release`` hold a call's estimated cost against hard
budgets and count it against rate limits (calls and tokens per minute, calls per day) atomically.

The pipeline keeps Redis current (keys and values: ``schemas/redis_keys.py``): the spend of each scope
for its open day, week and month (in the tenant's time zone; each value carries its period's end, so no
zone is needed here), and the budgets and rate limits that apply. ``check`` reads all of them with one
``MGET`` and decides here, so a raised limit or a new period unblocks a scope without anybody having to
clear a flag. A tenant on prepaid terms also has its credit balance there (``credits_key``): ``check``
reports it and says no once it is used up; ``reserve`` holds the estimate against it too.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from deploy.settings import Settings, get_settings, redis_client
from schemas.events import MAX_LABEL_LEN, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, MAX_TAGS
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
    credit_balance,
    credits_key,
    format_held,
    freshness_key,
    held_key,
    rate_counter_keys,
    rate_limit_key,
    scope_keys,
    spend_key,
    spend_period_end_ms,
    spend_value,
    stale_calls_field,
    stale_calls_key,
    tag_dimension,
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
    credit_balance: Decimal | None = None  # the prepaid balance as last counted; None: not on prepaid terms
    refused_by: dict[str, str] | None = None  # the scope that refused (``refusing_scope``); None if allowed

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
            "prepaid": self.credit_balance is not None,
            "credit_balance": None if self.credit_balance is None else f"{self.credit_balance.normalize():f}",
            "refused_by": self.refused_by,
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
# Prepaid credits: after the scopes' keys comes the tenant's credit balance (``credits_key``; absent
# unless the tenant is on prepaid terms), ARGV[11] is the position of the tenant scope among the scopes,
# ARGV[12] the number of scopes.
# The call is refused if its estimate and everything held for the tenant exceed the balance; a
# committed cost stays held until the spend and the balance have both counted it ("counted").
_RESERVE_TEMPLATE = """
local now, amount, entry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local id, ttl, tokens = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local stale_after, live_within = tonumber(ARGV[7]), tonumber(ARGV[8])
local column = @spend_columns@
local scopes = tonumber(ARGV[12])  -- their keys first; then the credits key, and the freshness hash if passed
local tenant_scope = tonumber(ARGV[11])
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
-- a prepaid tenant's balance (nano-USD), and up to when it counted the spend: a held cost is released
-- only once both the spend and the balance have counted it
local balance, counted = nil, caught_up
local credit = redis.call('GET', KEYS[scopes * @per_scope@ + 1])
if credit then
  local balance_text, counted_text = string.match(credit, '^(-?%d+) (%d+)$')
  if balance_text then
    balance = tonumber(balance_text)
    if counted == nil or tonumber(counted_text) < counted then counted = tonumber(counted_text) end
  end
end
-- held amounts: a reservation until it expires; a committed cost until ``cutoff`` (the spend's caught_up for
-- budgets, the balance's ``counted`` for credits) has counted it. An entry is deleted only once both have
-- (``counted`` is the earlier of the two), so a lagging balance never makes budgets count a cost twice.
local function held(key, cutoff)
  local total, fields = 0, redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local amount_text, expires, counted_after = string.match(fields[i + 1], '^(%d+):(%d+):?(%d*)$')
    local after = (counted_after ~= nil and counted_after ~= '') and tonumber(counted_after) or nil
    if amount_text == nil or tonumber(expires) < now or (after and counted ~= nil and counted >= after) then
      redis.call('HDEL', key, fields[i])
    elseif not (after and cutoff ~= nil and cutoff >= after) then
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
      local holding = held(KEYS[k + @held@], caught_up)
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
if balance then
  local holding = held(KEYS[tenant_scope * @per_scope@ + @held@], counted)
  cleaned[tenant_scope] = true
  -- a used-up balance refuses every call, a $0 estimate too (as ``check`` does)
  if balance <= 0 or holding + amount > balance then return {0, tenant_scope, 'credits', balance, holding} end
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
    refused_by: dict[str, str] | None = None  # the scope that said no (``refusing_scope``); None if allowed

    def as_json(self) -> dict[str, Any]:
        return {
            "reservation_id": self.reservation_id,
            "allowed": self.allowed,
            "amount": str(self.amount),
            "reason": self.reason,
            "refused_by": self.refused_by,
        }


def refusing_scope(tenant_id: str, dimension: str, value: str) -> dict[str, str]:
    """The machine-readable ``refused_by`` of a decision: which scope refused, and its ``scope_label``."""
    return {
        "tenant_id": tenant_id,
        "dimension": dimension,
        "value": value,
        "label": scope_label(tenant_id, dimension, value),
    }


# The longest value a budget scope can have: a tag value, or a "provider/model" of two labels.
_MAX_SCOPE_VALUE_LEN = max(MAX_TAG_VALUE_LEN, 2 * MAX_LABEL_LEN + 1)


def _scopes(
    feature: str | None,
    user_id: str | None,
    environment: str | None = None,
    *,
    team: str | None = None,
    api_key: str | None = None,
    model: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Every scope a call belongs to, as (dimension, value), the tenant first: the budget hierarchy a
    ``check`` or ``reserve`` decides at once. ``model`` is ``provider/model``; each tag is a scope of its
    own (``tag:<name>``, its value), so pass the call's tags that budgets may name."""
    scopes = [("tenant", "")]
    named = (
        ("feature", feature),
        ("user", user_id),
        ("environment", environment),
        ("team", team),
        ("api_key", api_key),
        ("model", model),
    )
    for dimension, value in named:
        if value is not None and type(value) is not str:
            raise TypeError(f"{dimension} must be a string, got {type(value).__name__}")
        if value:
            scopes.append((dimension, value))
    if tags:
        if not isinstance(tags, Mapping):
            raise TypeError(f"tags must be a mapping of tag name to value, got {type(tags).__name__}")
        if len(tags) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags, as on an event; got {len(tags)}")
        for name, value in sorted(tags.items()):
            if type(name) is not str or type(value) is not str or not name:
                raise TypeError(f"tags are non-empty names with string values, got {name!r:.80}: {value!r:.80}")
            if len(name) > MAX_TAG_KEY_LEN:
                raise ValueError(f"tag names are at most {MAX_TAG_KEY_LEN} characters, got {len(name)}")
            if value:
                scopes.append((tag_dimension(name), value))
    for dimension, value in scopes:
        # No budget can name a longer value (streams/budgets.py), and each one is part of a Redis key name.
        if len(value) > _MAX_SCOPE_VALUE_LEN:
            raise ValueError(f"the {dimension} is longer than any budget scope ({len(value)} characters)")
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
        team: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        now: datetime | None = None,
    ) -> QuotaDecision:
        """Allowed unless an exhausted hard budget or a reached rate limit of any scope of the call (the
        tenant, its feature, user, environment, team, API key id, ``provider/model`` and tags) says no;
        reports the tightest budget. One MGET."""
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id, environment, team=team, api_key=api_key, model=model, tags=tags)
        keys = [budget_key(tenant_id, d, v) for d, v in scopes]
        keys += [spend_key(tenant_id, d, v, p) for d, v in scopes for p in PERIODS]
        keys += [rate_limit_key(tenant_id, d, v) for d, v in scopes]
        keys += [key for d, v in scopes for key in rate_counter_keys(tenant_id, d, v, now)]
        keys.append(credits_key(tenant_id))  # last: the prepaid balance, if the tenant has one
        pipe = self.redis.pipeline(transaction=False)  # one round trip: MGET + the freshness hash
        # A cluster pipeline refuses .mget() (keys may span slots); these share the tenant's slot.
        pipe.execute_command("MGET", *keys)
        pipe.hgetall(freshness_key(self.settings.worker_id))
        values, beats = pipe.execute()
        credit_raw = values.pop()
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
                limited = QuotaDecision(
                    False,
                    decision.spent,
                    decision.limit,
                    decision.remaining,
                    f"rate limit of {scope}: {reached}",
                    decision.scope,
                    decision.period,
                    stale,
                    age,
                    refused_by=refusing_scope(tenant_id, *scopes[i]),
                )
                return with_credit_balance(limited, tenant_id, credit_raw)
        return with_credit_balance(decision, tenant_id, credit_raw)

    def reserve(
        self,
        tenant_id: str,
        estimated_cost: Decimal,
        feature: str | None = None,
        user_id: str | None = None,
        *,
        environment: str | None = None,
        team: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        tags: Mapping[str, str] | None = None,
        tokens: int = 0,
        ttl_s: float = 300.0,
        now: datetime | None = None,
    ) -> Reservation:
        """Before a model call: hold ``estimated_cost`` against every hard budget of every scope of the call
        (tenant, feature, user, environment, team, API key id, ``provider/model``, tags) and count the call
        (and its ``tokens``) against their rate limits — or refuse, if any of them would be exceeded, naming
        the scope that refused (the tightest hard budget the call does not fit). Atomic across any number
        of service replicas."""
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id, environment, team=team, api_key=api_key, model=model, tags=tags)
        keys = [key for d, v in scopes for key in scope_keys(tenant_id, d, v, now)]
        held_keys = tuple(keys[_HELD :: len(SCOPE_KEYS)])
        keys.append(credits_key(tenant_id))
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
            scopes.index(("tenant", "")),
            len(scopes),
        )
        if outcome[0] == 1:
            if len(outcome) > 1 and outcome[1] == 1:  # allowed on stale data: remember it for the overrun alert
                budgets = self.redis.mget([budget_key(tenant_id, d, v) for d, v in scopes])
                spend_scopes = [(d, v, p) for d, v in scopes for p in PERIODS]
                spend_raw = self.redis.mget([spend_key(tenant_id, d, v, p) for d, v, p in spend_scopes])
                self._count_stale_calls(tenant_id, scopes, budgets, dict(zip(spend_scopes, spend_raw, strict=True)))
            return Reservation(reservation_id, True, estimated_cost, "reserved", held_keys)
        refusing = int(outcome[1])
        what = outcome[2].decode() if isinstance(outcome[2], bytes) else str(outcome[2])
        if what == "budget" and len(scopes) > 1:
            # The script stops at the first scope (in order) the call does not fit; name the tightest of all
            # (best effort: the refusal stands, and without the read the script's scope is named).
            tightest = None
            # A malformed value (a hand-written budget key) must not turn a refusal into an exception either.
            with contextlib.suppress(redis.RedisError, ValueError, KeyError, TypeError):
                tightest = self._tightest_budget(tenant_id, scopes, amount, now)
            if tightest is not None:
                refusing, outcome = tightest[0], [0, tightest[0], "budget", tightest[1], tightest[2]]
        dimension, value = scopes[refusing]
        scope = scope_label(tenant_id, dimension, value)
        if what == "stale":
            age_text = "no worker has reported" if int(outcome[3]) < 0 else f"it is {int(outcome[3]) / 1000:.0f}s old"
            reason = (
                f"hard budget of {scope} blocks while its spend data is stale ({age_text}, bound "
                f"{self.settings.quota_stale_after_s:g}s): the pipeline is behind"
            )
        elif what == "credits":
            balance, holding = Decimal(outcome[3]) / NANO, Decimal(outcome[4]) / NANO
            reason = (
                f"prepaid balance of {scope} cannot take ${estimated_cost}: "
                f"${balance.normalize():f} left and ${holding.normalize():f} held by calls in flight"
            )
        elif what == "budget":
            spent, holding = Decimal(outcome[3]) / NANO, Decimal(outcome[4]) / NANO
            reason = (
                f"hard budget of {scope} cannot take ${estimated_cost}: "
                f"${spent.normalize():f} spent and ${holding.normalize():f} held by calls in flight"
            )
        else:
            reason = f"rate limit of {scope}: {what.replace('_', ' ')} is {outcome[4]} ({outcome[3]} used)"
        refused_by = refusing_scope(tenant_id, dimension, value)
        return Reservation(reservation_id, False, estimated_cost, reason, held_keys, refused_by)

    def _tightest_budget(
        self, tenant_id: str, scopes: list[tuple[str, str]], amount_nano: int, now: datetime
    ) -> tuple[int, int, int] | None:
        """After a refusal by a hard budget (only then: one more round trip), the scope whose hard budget
        has the least room among those the call does not fit, with its spent and held nano-USD."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.execute_command(
            "MGET",
            *(budget_key(tenant_id, d, v) for d, v in scopes),
            *(spend_key(tenant_id, d, v, p) for d, v in scopes for p in PERIODS),
        )
        for d, v in scopes:
            pipe.hgetall(held_key(tenant_id, d, v))
        values, *held = pipe.execute()
        n = len(scopes)
        per_scope = len(PERIODS)
        spend = [dict(zip(PERIODS, values[n + i * per_scope : n + (i + 1) * per_scope], strict=True)) for i in range(n)]
        return tightest_budget(values[:n], spend, held, amount_nano, now)

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


def with_credit_balance(decision: QuotaDecision, tenant_id: str, raw_balance: Any) -> QuotaDecision:
    """The decision with the tenant's prepaid balance (if it is on prepaid terms): a balance used up
    refuses the call. Calls in flight are not counted here (``reserve`` counts them)."""
    mirrored = credit_balance(raw_balance)
    if mirrored is None:
        return decision
    balance = mirrored[0]
    if balance <= 0 and decision.allowed:
        reason = f"the prepaid balance of {scope_label(tenant_id, 'tenant', '')} is used up"
        by = refusing_scope(tenant_id, "tenant", "")
        return replace(decision, allowed=False, reason=reason, credit_balance=balance, refused_by=by)
    return replace(decision, credit_balance=balance)


def tightest_budget(
    budgets: list[Any], spend: list[dict[str, Any]], held: list[dict[Any, Any]], amount_nano: int, now: datetime
) -> tuple[int, int, int] | None:
    """Of the scopes (in order) whose hard budget cannot take ``amount_nano`` on top of its spend in the
    budget's period and its unexpired held amounts, the one with the least room left, as (index, spent
    nano-USD, held nano-USD); the first on a tie; None if every one fits."""
    now_ms = int(now.timestamp() * 1000)
    best: tuple[int, int, int] | None = None
    best_room = 0
    for i, raw in enumerate(budgets):
        budget = json.loads(raw) if raw else {}
        if not budget.get("hard"):
            continue
        spent = to_nano(spend_value(spend[i].get(budget["period"]), now))
        holding = 0
        for entry in held[i].values():
            parts = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":")
            if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() and int(parts[1]) >= now_ms:
                holding += int(parts[0])
        room = to_nano(Decimal(budget["limit"])) - spent - holding
        if room < amount_nano and (best is None or room < best_room):
            best, best_room = (i, spent, holding), room
    return best


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
    data is ``stale``; otherwise report the tightest budget. Of several exhausted hard budgets (a budget
    hierarchy), the one furthest over its limit refuses and is named (``refused_by``)."""
    tightest: QuotaDecision | None = None
    blocked: QuotaDecision | None = None
    stale_blocked: QuotaDecision | None = None
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
            if blocked is None or remaining < (blocked.remaining or Decimal(0)):
                reason = f"hard {period} budget of ${limit} for {scope} is spent (${spent})"
                by = refusing_scope(tenant_id, dimension, value)
                blocked = QuotaDecision(
                    False, spent, limit, remaining, reason, scope, period, stale, data_age_s, refused_by=by
                )
            continue
        policy = budget.get("on_stale", "allow")
        if budget.get("hard") and stale and policy != "allow":
            if stale_blocked is None:
                age = "no worker has reported" if data_age_s is None else f"it is {data_age_s:.0f}s old"
                only = "blocks" if policy == "block" else "lets only reserved calls through"
                reason = f"hard {period} budget of ${limit} for {scope} {only} while its spend data is stale ({age})"
                by = refusing_scope(tenant_id, dimension, value)
                stale_blocked = QuotaDecision(
                    False, spent, limit, remaining, reason, scope, period, stale, data_age_s, refused_by=by
                )
            continue
        if tightest is None or remaining < (tightest.remaining or Decimal(0)):
            kind = "hard" if budget.get("hard") else "soft"
            reason = f"within the {kind} {period} budget of ${limit} for {scope}"
            if remaining <= 0:
                reason = f"soft {period} budget of ${limit} for {scope} is exceeded; calls are still allowed"
            tightest = QuotaDecision(True, spent, limit, remaining, reason, scope, period, stale, data_age_s)
    if blocked is not None:
        return blocked
    if stale_blocked is not None:
        return stale_blocked
    if tightest is not None:
        return tightest
    dimension, value = scopes[-1]
    spent = spend[(dimension, value, "month")]
    scope = scope_label(tenant_id, dimension, value)
    return QuotaDecision(True, spent, None, None, "no budget applies", scope, "month", stale, data_age_s)
