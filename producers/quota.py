"""QuotaClient: "may this tenant / feature / user make another model call?" in one Redis round trip.

The pipeline keeps Redis current (``sinks/redis.py``): the spend of each scope for the open day, week
and month, and the budgets that apply (``tm:budget:<tenant>:<dimension>:<value>``, JSON with
``limit``, ``period`` and ``hard``). ``check`` reads all of them with one ``MGET`` and decides here, so
a raised limit or a new period unblocks a scope without anybody having to clear a flag.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis

from deploy.settings import Settings, get_settings
from sinks.redis import PERIODS, period_start, spend_key
from sinks.redis import _escape as escape_key_part


def budget_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:budget:{escape_key_part(tenant_id)}:{dimension}:{escape_key_part(value)}"


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    spent: Decimal  # in the scope and period of the deciding budget (or the narrowest scope's month)
    limit: Decimal | None
    remaining: Decimal | None
    reason: str
    scope: str
    period: str

    def as_json(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "spent": str(self.spent),
            "limit": None if self.limit is None else str(self.limit),
            "remaining": None if self.remaining is None else str(self.remaining),
            "reason": self.reason,
            "scope": self.scope,
            "period": self.period,
        }


# ---------------------------------------------------------------- reservations (hard budgets under concurrency)
# Check-then-call lets N concurrent calls all see the same remaining budget and all go ahead. A
# reservation holds the estimated cost atomically (one Lua script over every scope's budget, spend
# and held amounts), so concurrent callers can overrun a hard budget by at most what they reserved.
# Amounts are integer nano-USD inside the script (exact below ~$9M); Decimal outside.
NANO = Decimal("1e9")
_RESERVE = """
local now, amount, entry = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local id, ttl = ARGV[4], tonumber(ARGV[5])
local column = {day = 2, week = 3, month = 4}
local function held(key)
  local total, fields = 0, redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    local amount_text, expires = string.match(fields[i + 1], '^(%d+):(%d+)$')
    if tonumber(expires) < now then redis.call('HDEL', key, fields[i]) else total = total + tonumber(amount_text) end
  end
  return total
end
for s = 0, #KEYS / 5 - 1 do
  local raw = redis.call('GET', KEYS[s * 5 + 1])
  if raw then
    local budget = cjson.decode(raw)
    if budget['hard'] then
      local spent = math.floor(tonumber(redis.call('GET', KEYS[s * 5 + column[budget['period']]]) or '0') * 1e9 + 0.5)
      local holding = held(KEYS[s * 5 + 5])
      if spent + holding + amount > math.floor(tonumber(budget['limit']) * 1e9 + 0.5) then
        return {0, s, spent, holding}
      end
    end
  end
end
for s = 0, #KEYS / 5 - 1 do
  redis.call('HSET', KEYS[s * 5 + 5], id, entry)
  redis.call('PEXPIRE', KEYS[s * 5 + 5], ttl * 2)
end
return {1}
"""


def held_key(tenant_id: str, dimension: str, value: str) -> str:
    return f"tm:held:{escape_key_part(tenant_id)}:{dimension}:{escape_key_part(value)}"


@dataclass(frozen=True)
class Reservation:
    reservation_id: str
    allowed: bool
    amount: Decimal
    reason: str
    keys: tuple[str, ...]


def _scopes(feature: str | None, user_id: str | None) -> list[tuple[str, str]]:
    scopes = [("tenant", "")]
    if feature:
        scopes.append(("feature", feature))
    if user_id:
        scopes.append(("user", user_id))
    return scopes


class QuotaClient:
    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = client or redis.Redis.from_url(self.settings.redis_url, socket_timeout=1.0)

    def check(
        self, tenant_id: str, feature: str | None = None, user_id: str | None = None, *, now: datetime | None = None
    ) -> QuotaDecision:
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id)
        starts = {period: period_start(period, now) for period in PERIODS}
        keys = [budget_key(tenant_id, d, v) for d, v in scopes]
        keys += [spend_key(tenant_id, d, v, p, starts[p]) for d, v in scopes for p in PERIODS]
        values = self.redis.mget(keys)
        budgets = values[: len(scopes)]
        spend = {
            (d, v, p): Decimal(raw.decode() if isinstance(raw, bytes) else raw) if raw else Decimal(0)
            for (d, v, p), raw in zip(
                ((d, v, p) for d, v in scopes for p in PERIODS), values[len(scopes) :], strict=True
            )
        }
        return decide(tenant_id, scopes, budgets, spend)

    def reserve(
        self, tenant_id: str, estimated_cost: Decimal, feature: str | None = None, user_id: str | None = None,
        *, ttl_s: float = 300.0, now: datetime | None = None,
    ) -> Reservation:  # fmt: skip
        """Hold ``estimated_cost`` against every hard budget of the tenant/feature/user, or refuse."""
        now = now or datetime.now(UTC)
        scopes = _scopes(feature, user_id)
        starts = {period: period_start(period, now) for period in PERIODS}
        keys: list[str] = []
        for d, v in scopes:
            keys.append(budget_key(tenant_id, d, v))
            keys += [spend_key(tenant_id, d, v, p, starts[p]) for p in PERIODS]
            keys.append(held_key(tenant_id, d, v))
        amount = int((estimated_cost * NANO).to_integral_value())
        now_ms, ttl_ms = int(now.timestamp() * 1000), int(ttl_s * 1000)
        reservation_id = uuid.uuid4().hex
        outcome = self.redis.eval(_RESERVE, len(keys), *keys, now_ms, amount, f"{amount}:{now_ms + ttl_ms}",
                                    reservation_id, ttl_ms)  # fmt: skip
        held_keys = tuple(keys[4::5])
        if outcome[0] == 1:
            return Reservation(reservation_id, True, estimated_cost, "reserved", held_keys)
        dimension, value = scopes[int(outcome[1])]
        spent, holding = Decimal(outcome[2]) / NANO, Decimal(outcome[3]) / NANO
        reason = (f"hard budget of {_label(tenant_id, dimension, value)} cannot take ${estimated_cost}: "
                  f"${spent.normalize():f} spent and ${holding.normalize():f} held by calls in flight")  # fmt: skip
        return Reservation(reservation_id, False, estimated_cost, reason, held_keys)

    def commit(self, reservation: Reservation, actual_cost: Decimal, *, settle_s: float = 2.0) -> None:
        """After the call: hold its actual cost for ``settle_s`` more, until the pipeline has counted it
        (p99 < 1 s), so that no gap opens between the reservation and the spend."""
        self._settle(reservation, actual_cost, settle_s)

    def release(self, reservation: Reservation) -> None:
        """The call was not made: free what it held."""
        self._settle(reservation, None, 0.0)

    def _settle(self, reservation: Reservation, actual_cost: Decimal | None, settle_s: float) -> None:
        if not reservation.allowed:
            return
        pipe = self.redis.pipeline(transaction=False)
        for key in reservation.keys:
            if actual_cost is None:
                pipe.hdel(key, reservation.reservation_id)
            else:
                until = int((time.time() + settle_s) * 1000)
                pipe.hset(key, reservation.reservation_id, f"{int((actual_cost * NANO).to_integral_value())}:{until}")
        pipe.execute()


def _label(tenant_id: str, dimension: str, value: str) -> str:
    return tenant_id if dimension == "tenant" else f"{tenant_id}/{dimension}={value}"


def decide(
    tenant_id: str,
    scopes: list[tuple[str, str]],
    budgets: list[Any],
    spend: dict[tuple[str, str, str], Decimal],
) -> QuotaDecision:
    """The pure decision: blocked by any exhausted hard budget; otherwise report the tightest budget."""
    tightest: QuotaDecision | None = None
    for (dimension, value), raw in zip(scopes, budgets, strict=True):
        if not raw:
            continue
        budget = json.loads(raw)
        period = budget["period"]
        limit = Decimal(budget["limit"])
        spent = spend[(dimension, value, period)]
        remaining = limit - spent
        scope = _label(tenant_id, dimension, value)
        if budget.get("hard") and remaining <= 0:
            reason = f"hard {period} budget of ${limit} for {scope} is spent (${spent})"
            return QuotaDecision(False, spent, limit, remaining, reason, scope, period)
        if tightest is None or remaining < (tightest.remaining or Decimal(0)):
            kind = "hard" if budget.get("hard") else "soft"
            reason = f"within the {kind} {period} budget of ${limit} for {scope}"
            if remaining <= 0:
                reason = f"soft {period} budget of ${limit} for {scope} is exceeded; calls are still allowed"
            tightest = QuotaDecision(True, spent, limit, remaining, reason, scope, period)
    if tightest is not None:
        return tightest
    dimension, value = scopes[-1]
    spent = spend[(dimension, value, "month")]
    scope = _label(tenant_id, dimension, value)
    return QuotaDecision(True, spent, None, None, "no budget applies", scope, "month")


_BOOK: Any = None


def estimate_cost(provider: str, model: str, input_tokens: int, max_output_tokens: int = 0,
                  cache_read_tokens: int = 0) -> Decimal | None:  # fmt: skip
    """The most a call can cost, before making it (for ``reserve``): today's price of ``model`` for the
    prompt's input tokens and the request's output cap. None for an unknown model."""
    global _BOOK
    from schemas.events import UsageEvent
    from streams.pricing import PriceBook

    if _BOOK is None:
        _BOOK = PriceBook()
    event = UsageEvent(event_id="estimate", timestamp=datetime.now(UTC), tenant_id="estimate", provider=provider,
                       model=model, input_tokens=input_tokens, output_tokens=max_output_tokens,
                       cache_read_tokens=cache_read_tokens)  # fmt: skip
    price = _BOOK.price(event)
    return price.total_cost if price.status == "priced" else None
