"""QuotaClient: "may this tenant / feature / user make another model call?" in one Redis round trip.

The pipeline keeps Redis current (``sinks/redis.py``): the spend of each scope for the open day, week
and month, and the budgets that apply (``tm:budget:<tenant>:<dimension>:<value>``, JSON with
``limit``, ``period`` and ``hard``). ``check`` reads all of them with one ``MGET`` and decides here, so
a raised limit or a new period unblocks a scope without anybody having to clear a flag.
"""

from __future__ import annotations

import json
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


class QuotaClient:
    def __init__(self, settings: Settings | None = None, client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = client or redis.Redis.from_url(self.settings.redis_url, socket_timeout=1.0)

    def check(
        self, tenant_id: str, feature: str | None = None, user_id: str | None = None, *, now: datetime | None = None
    ) -> QuotaDecision:
        now = now or datetime.now(UTC)
        scopes = [("tenant", "")]
        if feature:
            scopes.append(("feature", feature))
        if user_id:
            scopes.append(("user", user_id))
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
