"""Budgets: configuration on the compacted ``config.budgets`` topic, and the pure threshold rule.

A budget limits one scope — a tenant, or a tenant's feature, user or environment — over a calendar
period (day, ISO week or month in the tenant's time zone) and fires alerts at thresholds (default 50/80/100 %). A hard
budget also blocks: once the scope's spend reaches the limit, ``QuotaClient.check`` answers not
allowed (it compares the spend and the limit it reads from Redis, so a new period or a raised limit
unblocks by itself). One budget per scope: setting it again replaces it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sinks.postgres import Rollup
from streams.periods import PERIODS, period_label

SCOPES = ("tenant", "feature", "user", "environment")
DEFAULT_THRESHOLDS = (50, 80, 100)


@dataclass(frozen=True)
class Budget:
    tenant_id: str
    dimension: str  # tenant | feature | user | environment
    value: str  # '' for the tenant itself
    period: str  # day | week | month
    limit: Decimal
    hard: bool = False
    thresholds: tuple[int, ...] = field(default=DEFAULT_THRESHOLDS)

    def __post_init__(self) -> None:
        if self.dimension not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}")
        if (self.dimension == "tenant") != (self.value == ""):
            raise ValueError("a tenant budget has no scope value; the others need one")
        if not self.limit > 0:
            raise ValueError("the limit must be a positive amount of USD")
        if not self.thresholds or any(not 0 < t <= 1000 for t in self.thresholds):
            raise ValueError("thresholds are percentages between 1 and 1000")

    @property
    def key(self) -> str:
        return budget_id(self.tenant_id, self.dimension, self.value)

    @property
    def scope_label(self) -> str:
        return self.tenant_id if self.dimension == "tenant" else f"{self.tenant_id}/{self.dimension}={self.value}"

    def to_json(self) -> bytes:
        return json.dumps({
            "tenant_id": self.tenant_id, "dimension": self.dimension, "value": self.value, "period": self.period,
            "limit": str(self.limit), "hard": self.hard, "thresholds": list(self.thresholds),
        }).encode()  # fmt: skip

    def redis_json(self) -> str:
        """What ``QuotaClient`` reads from ``tm:budget:…``."""
        return json.dumps({"limit": str(self.limit), "period": self.period, "hard": self.hard})


def budget_id(tenant_id: str, dimension: str, value: str) -> str:
    return json.dumps([tenant_id, dimension, value])  # unambiguous whatever the names contain


def parse_budget(value: bytes) -> Budget:
    data: dict[str, Any] = json.loads(value)
    return Budget(
        tenant_id=str(data["tenant_id"]), dimension=str(data["dimension"]), value=str(data.get("value", "")),
        period=str(data["period"]), limit=Decimal(str(data["limit"])), hard=bool(data.get("hard", False)),
        thresholds=tuple(sorted(int(t) for t in data.get("thresholds", DEFAULT_THRESHOLDS))),
    )  # fmt: skip


def crossed(budget: Budget, spent: Decimal) -> list[int]:
    """The thresholds that ``spent`` has reached (each fires once per period; the caller remembers)."""
    percent = spent * 100 / budget.limit
    return [t for t in budget.thresholds if percent >= t]


def budget_alerts(budgets: dict[str, Budget], rollups: Iterable[Rollup], now: datetime) -> list[dict[str, Any]]:
    """Alerts for every threshold reached in the windows of these rollups, with deterministic ids
    (scope, limit, period window, threshold), so the caller can fire each one once."""
    alerts = []
    for r in rollups:
        if r.granularity not in PERIODS or r.dimension not in SCOPES:
            continue
        budget = budgets.get(budget_id(r.tenant_id, r.dimension, r.dimension_value))
        if budget is None or budget.period != r.granularity:
            continue
        period = period_label(budget.period, r.window_start, r.time_zone)
        for threshold in crossed(budget, r.cost):
            blocked = budget.hard and threshold >= 100
            alerts.append({
                # The limit is part of the id: a changed limit re-arms its thresholds.
                "alert_id": f"budget:{budget.key}:{budget.limit.normalize():f}:{period}:{threshold}",
                "kind": "budget.blocked" if blocked else "budget.threshold",
                "tenant_id": r.tenant_id, "scope": {"dimension": r.dimension, "value": r.dimension_value},
                "period": period, "threshold_percent": threshold, "current": r.cost, "baseline": None,
                "limit": budget.limit,
                "message": (
                    f"{budget.scope_label} has spent ${r.cost.normalize():f} of its {budget.period} budget of "
                    f"${budget.limit.normalize():f} ({r.cost * 100 / budget.limit:.1f}%, threshold {threshold}%)"
                    + ("; calls are now blocked" if blocked else "")
                ),
                "details": {"hard": str(budget.hard).lower(), "percent": f"{r.cost * 100 / budget.limit:.2f}",
                            "window_start": r.window_start.isoformat(), "time_zone": r.time_zone},
                "created_at": now,
            })  # fmt: skip
    return alerts


@dataclass(frozen=True)
class RateLimit:
    """Calls and tokens per minute and calls per day for a scope, counted by ``QuotaClient.reserve``.
    Kept on the budgets topic under the key ``ratelimit:<scope>``."""

    tenant_id: str
    dimension: str
    value: str
    calls_per_minute: int | None = None
    tokens_per_minute: int | None = None
    calls_per_day: int | None = None

    def __post_init__(self) -> None:
        if self.dimension not in SCOPES or (self.dimension == "tenant") != (self.value == ""):
            raise ValueError("scope must be the tenant, or one feature, user or environment of it")
        limits = (self.calls_per_minute, self.tokens_per_minute, self.calls_per_day)
        if all(limit is None for limit in limits) or any(limit is not None and limit < 1 for limit in limits):
            raise ValueError("give at least one limit, each a positive whole number")

    @property
    def key(self) -> str:
        return RATE_LIMIT_PREFIX + budget_id(self.tenant_id, self.dimension, self.value)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def redis_json(self) -> str:
        limits = {"calls_per_minute": self.calls_per_minute, "tokens_per_minute": self.tokens_per_minute,
                  "calls_per_day": self.calls_per_day}  # fmt: skip
        return json.dumps({name: limit for name, limit in limits.items() if limit is not None})


RATE_LIMIT_PREFIX = "ratelimit:"


def parse_rate_limit(value: bytes) -> RateLimit:
    return RateLimit(**json.loads(value))


@dataclass(frozen=True)
class ConfigRecord:
    """One record of ``config.budgets``: a scope's budget or rate limit; ``item`` None if deleted."""

    kind: str  # budget | rate_limit
    scope: tuple[str, str, str]  # tenant, dimension, value
    item: Budget | RateLimit | None


def parse_config_record(key: str, value: bytes | None) -> ConfigRecord:
    if key.startswith(RATE_LIMIT_PREFIX):
        tenant_id, dimension, scope_value = json.loads(key.removeprefix(RATE_LIMIT_PREFIX))
        limit = None if value is None else parse_rate_limit(value)
        return ConfigRecord("rate_limit", (tenant_id, dimension, scope_value), limit)
    tenant_id, dimension, scope_value = json.loads(key)
    return ConfigRecord("budget", (tenant_id, dimension, scope_value), None if value is None else parse_budget(value))
