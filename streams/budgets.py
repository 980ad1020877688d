"""Budgets: configuration on the compacted ``config.budgets`` topic, and the pure threshold rule.

A budget limits one scope — a tenant, or a tenant's feature, user, environment, team, API key (its id),
model (``provider/model``) or tag value (dimension ``tag:<name>``) — over a calendar
period (day, ISO week or month in the tenant's time zone) and fires alerts at thresholds (default 50/80/100 %). A hard
budget also blocks: once the scope's spend reaches the limit, ``QuotaClient.check`` answers not
allowed (it compares the spend and the limit it reads from Redis, so a new period or a raised limit
unblocks by itself). One budget per scope: setting it again replaces it.

Records on the topic are validated field by field (strict JSON types, printable names, limits that
the alert's decimal encoding and Redis can hold), whoever wrote them; ``ConfigFollower`` skips and
counts a record that fails.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from schemas.events import MAX_ID_LEN, MAX_LABEL_LEN, MAX_TAG_KEY_LEN, MAX_TAG_VALUE_LEN, printable_problem
from schemas.periods import PERIODS, period_label
from schemas.records import Alert, Rollup, scope_label
from schemas.redis_keys import SCOPE_DIMENSIONS, TAG_DIMENSION_PREFIX, is_scope_dimension
from streams.config_topic import config_amount, config_text

SCOPES = SCOPE_DIMENSIONS
MAX_MODEL_SCOPE_LEN = 2 * MAX_LABEL_LEN + 1  # "<provider>/<model>"
# The longest scope value of any dimension (a tag's value): what a config record's value may hold.
MAX_SCOPE_VALUE_LEN = max(MAX_ID_LEN, MAX_TAG_VALUE_LEN, MAX_MODEL_SCOPE_LEN)
DEFAULT_THRESHOLDS = (50, 80, 100)
# What a hard budget does while the spend data behind it is stale (the pipeline is behind, e.g. during
# a Postgres outage; ``QuotaClient`` sees the age): ``allow`` decides on the data it has (calls made
# meanwhile can overrun); ``allow_reserved`` lets only ``reserve()`` calls through (their costs stay held
# until the pipeline has counted them, so they cannot overrun); ``block`` refuses every call.
ON_STALE = ("allow", "allow_reserved", "block")
# A quadrillion dollars a period: no real budget comes near it, and with 12 decimal places it stays
# well inside NUMERIC(38, 12) and the alerts' Avro decimals.
MAX_BUDGET = Decimal(10**15)
# Calls and tokens per minute or day: Redis counts them and its Lua script compares them as doubles,
# exact up to 2**53; this bound keeps far below.
MAX_RATE_LIMIT = 10**12


def _check_scope(tenant_id: object, dimension: object, value: object) -> None:
    if not isinstance(tenant_id, str) or not 0 < len(tenant_id) <= MAX_ID_LEN:
        raise ValueError(f"the tenant must be 1-{MAX_ID_LEN} characters")
    if not isinstance(dimension, str) or not is_scope_dimension(dimension):
        raise ValueError(f"scope must be one of {', '.join(SCOPES)} or {TAG_DIMENSION_PREFIX}<tag name>")
    # A tag scope follows the event's tag rules (a value an event can carry), the others the id rules.
    tag = dimension.startswith(TAG_DIMENSION_PREFIX)
    if tag and len(dimension) - len(TAG_DIMENSION_PREFIX) > MAX_TAG_KEY_LEN:
        raise ValueError(f"a tag name must be 1-{MAX_TAG_KEY_LEN} characters")
    max_value = MAX_TAG_VALUE_LEN if tag else MAX_MODEL_SCOPE_LEN if dimension == "model" else MAX_ID_LEN
    if not isinstance(value, str) or len(value) > max_value:
        raise ValueError(f"the scope value must be at most {max_value} characters")
    if (dimension == "tenant") != (value == ""):
        raise ValueError("a tenant budget has no scope value; the others need one")
    for name, text in (("tenant", tenant_id), ("scope", dimension), (dimension, value)):
        problem = printable_problem(text)
        if problem is not None:
            raise ValueError(f"{name}: {problem}")


@dataclass(frozen=True)
class Budget:
    tenant_id: str
    dimension: str  # one of SCOPES (tenant, feature, user, environment, team, api_key, model) or tag:<name>
    value: str  # '' for the tenant itself
    period: str  # day | week | month
    limit: Decimal
    hard: bool = False
    thresholds: tuple[int, ...] = field(default=DEFAULT_THRESHOLDS)
    on_stale: str = "allow"  # ON_STALE; only hard budgets block, so only they use it

    def __post_init__(self) -> None:
        _check_scope(self.tenant_id, self.dimension, self.value)
        if self.on_stale not in ON_STALE:
            raise ValueError(f"on_stale must be one of {', '.join(ON_STALE)}")
        if self.period not in PERIODS:
            raise ValueError(f"period must be one of {', '.join(PERIODS)}")
        if not isinstance(self.limit, Decimal):
            raise ValueError(f"the limit must be a Decimal amount of USD, got {type(self.limit).__name__}")
        # Frozen, but the limit may lose trailing zeros beyond 12 places here (10.0000000000000 → 10.000000000000).
        object.__setattr__(self, "limit", config_amount(self.limit, "limit", positive=True, below=MAX_BUDGET))
        if type(self.hard) is not bool:
            raise ValueError("hard must be true or false")
        if (
            not isinstance(self.thresholds, tuple)
            or not self.thresholds
            or any(type(t) is not int or not 0 < t <= 1000 for t in self.thresholds)
        ):
            raise ValueError("thresholds are whole percentages between 1 and 1000")

    @property
    def key(self) -> str:
        return budget_id(self.tenant_id, self.dimension, self.value)

    @property
    def scope_label(self) -> str:
        return scope_label(self.tenant_id, self.dimension, self.value)

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "tenant_id": self.tenant_id,
                "dimension": self.dimension,
                "value": self.value,
                "period": self.period,
                "limit": str(self.limit),
                "hard": self.hard,
                "thresholds": list(self.thresholds),
                "on_stale": self.on_stale,
            }
        ).encode()

    def redis_json(self) -> str:
        """What ``QuotaClient`` reads from the budget key (``schemas.redis_keys.budget_key``)."""
        return json.dumps(
            {"limit": str(self.limit), "period": self.period, "hard": self.hard, "on_stale": self.on_stale}
        )


def budget_id(tenant_id: str, dimension: str, value: str) -> str:
    return json.dumps([tenant_id, dimension, value])  # unambiguous whatever the names contain


def _json_object(value: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"a {what} is a JSON object, got {type(data).__name__}")
    return data


def parse_budget(value: bytes) -> Budget:
    """Validate one budget record; ValueError says what is wrong with it. Types are strict: "false"
    for ``hard`` or "50" for a threshold is an error, not a guess."""
    data = _json_object(value, "budget")
    thresholds = data.get("thresholds", list(DEFAULT_THRESHOLDS))
    if not isinstance(thresholds, list) or any(type(t) is not int for t in thresholds):
        raise ValueError("thresholds must be a list of whole percentages")
    if "limit" not in data:
        raise ValueError("limit is required")
    return Budget(
        tenant_id=config_text(data, "tenant_id", max_len=MAX_ID_LEN),
        dimension=config_text(data, "dimension"),
        value=config_text(data, "value", max_len=MAX_SCOPE_VALUE_LEN, allow_empty=True),
        period=config_text(data, "period"),
        limit=config_amount(data["limit"], "limit", positive=True, below=MAX_BUDGET),
        hard=data.get("hard", False),
        thresholds=tuple(sorted(set(thresholds))),
        on_stale=config_text(data, "on_stale") if "on_stale" in data else "allow",
    )


def crossed(budget: Budget, spent: Decimal) -> list[int]:
    """The thresholds that ``spent`` has reached (each fires once per period; the caller remembers)."""
    percent = spent * 100 / budget.limit
    return [t for t in budget.thresholds if percent >= t]


def budget_alerts(budgets: dict[str, Budget], rollups: Iterable[Rollup], now: datetime) -> list[Alert]:
    """Alerts for every threshold reached in the windows of these rollups, with deterministic ids
    (scope, limit, period window, threshold), so the caller can fire each one once."""
    alerts = []
    for r in rollups:
        if r.granularity not in PERIODS or not is_scope_dimension(r.dimension):
            continue
        budget = budgets.get(budget_id(r.tenant_id, r.dimension, r.dimension_value))
        if budget is None or budget.period != r.granularity:
            continue
        period = period_label(budget.period, r.window_start, r.time_zone)
        for threshold in crossed(budget, r.cost):
            blocked = budget.hard and threshold >= 100
            alerts.append(
                Alert(
                    # The limit is part of the id: a changed limit re-arms its thresholds.
                    alert_id=f"budget:{budget.key}:{budget.limit.normalize():f}:{period}:{threshold}",
                    kind="budget.blocked" if blocked else "budget.threshold",
                    tenant_id=r.tenant_id,
                    scope={"dimension": r.dimension, "value": r.dimension_value},
                    period=period,
                    threshold_percent=threshold,
                    current=r.cost,
                    limit=budget.limit,
                    message=(
                        f"{budget.scope_label} has spent ${r.cost.normalize():f} of its {budget.period} budget of "
                        f"${budget.limit.normalize():f} ({r.cost * 100 / budget.limit:.1f}%, threshold {threshold}%)"
                        + ("; calls are now blocked" if blocked else "")
                    ),
                    details={
                        "hard": str(budget.hard).lower(),
                        "percent": f"{r.cost * 100 / budget.limit:.2f}",
                        "window_start": r.window_start.isoformat(),
                        "time_zone": r.time_zone,
                    },
                    created_at=now,
                )
            )
    return alerts


def overrun_alerts(
    budgets: dict[str, Budget], rollups: Iterable[Rollup], now: datetime, stale_calls: Callable[[Budget, Rollup], int]
) -> list[Alert]:
    """A hard budget with ``on_stale=allow`` that ended up over its limit after quota clients let
    ``stale_calls(budget, window)`` calls through on stale spend data (an outage hid the spend): once per
    scope, limit and period window (DESIGN §4.7)."""
    alerts = []
    for r in rollups:
        budget = budgets.get(budget_id(r.tenant_id, r.dimension, r.dimension_value))
        if (
            budget is None
            or budget.period != r.granularity
            or not budget.hard
            or budget.on_stale != "allow"
            or r.cost <= budget.limit
        ):
            continue
        calls = stale_calls(budget, r)
        if calls <= 0:
            continue
        period = period_label(budget.period, r.window_start, r.time_zone)
        over = r.cost - budget.limit
        alerts.append(
            Alert(
                alert_id=f"budget.overrun_during_outage:{budget.key}:{budget.limit.normalize():f}:{period}",
                kind="budget.overrun_during_outage",
                tenant_id=r.tenant_id,
                scope={"dimension": r.dimension, "value": r.dimension_value},
                period=period,
                current=r.cost,
                limit=budget.limit,
                message=(
                    f"{budget.scope_label} overran its hard {budget.period} budget of "
                    f"${budget.limit.normalize():f} by ${over.normalize():f}: {calls} calls were allowed "
                    "while the spend data was stale (on_stale=allow)"
                ),
                details={
                    "overrun": f"{over:f}",
                    "stale_calls": str(calls),
                    "window_start": r.window_start.isoformat(),
                    "time_zone": r.time_zone,
                    "hard": "true",
                },
                created_at=now,
            )
        )
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
        _check_scope(self.tenant_id, self.dimension, self.value)
        limits = (self.calls_per_minute, self.tokens_per_minute, self.calls_per_day)
        if all(limit is None for limit in limits) or any(
            limit is not None and (type(limit) is not int or not 0 < limit <= MAX_RATE_LIMIT) for limit in limits
        ):
            raise ValueError(f"give at least one limit, each a whole number from 1 to {MAX_RATE_LIMIT:,}")

    @property
    def key(self) -> str:
        return RATE_LIMIT_PREFIX + budget_id(self.tenant_id, self.dimension, self.value)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def redis_json(self) -> str:
        limits = {
            "calls_per_minute": self.calls_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "calls_per_day": self.calls_per_day,
        }
        return json.dumps({name: limit for name, limit in limits.items() if limit is not None})


RATE_LIMIT_PREFIX = "ratelimit:"


def parse_rate_limit(value: bytes) -> RateLimit:
    data = _json_object(value, "rate limit")
    unknown = set(data) - set(RateLimit.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown rate limit fields: {', '.join(sorted(map(repr, unknown)))}")
    return RateLimit(
        tenant_id=config_text(data, "tenant_id", max_len=MAX_ID_LEN),
        dimension=config_text(data, "dimension"),
        value=config_text(data, "value", max_len=MAX_SCOPE_VALUE_LEN, allow_empty=True),
        calls_per_minute=data.get("calls_per_minute"),
        tokens_per_minute=data.get("tokens_per_minute"),
        calls_per_day=data.get("calls_per_day"),
    )


@dataclass(frozen=True)
class ConfigRecord:
    """One record of ``config.budgets``: a scope's budget or rate limit; ``item`` None if deleted."""

    kind: str  # budget | rate_limit
    scope: tuple[str, str, str]  # tenant, dimension, value
    item: Budget | RateLimit | None


def _key_scope(key: str, *, strict: bool) -> tuple[str, str, str]:
    try:
        scope = json.loads(key)
    except (json.JSONDecodeError, RecursionError):
        scope = None
    if not isinstance(scope, list) or len(scope) != 3 or not all(isinstance(part, str) for part in scope):
        raise ValueError(f"key {key[:80]!r} is not a JSON list [tenant, dimension, value]")
    if strict:
        _check_scope(*scope)
    return scope[0], scope[1], scope[2]


def parse_config_record(key: str, value: bytes | None) -> ConfigRecord:
    """One record of ``config.budgets``, validated; ValueError if the key, the value, or their
    agreement (the value's scope is the key's) is wrong."""
    kind = "rate_limit" if key.startswith(RATE_LIMIT_PREFIX) else "budget"
    # A deletion only needs the key's shape: it must still clear whatever an older writer left.
    scope = _key_scope(key.removeprefix(RATE_LIMIT_PREFIX), strict=value is not None)
    if value is None:
        return ConfigRecord(kind, scope, None)
    item = parse_rate_limit(value) if kind == "rate_limit" else parse_budget(value)
    if (item.tenant_id, item.dimension, item.value) != scope:
        raise ValueError(f"the key names scope {list(scope)}, the value {[item.tenant_id, item.dimension, item.value]}")
    return ConfigRecord(kind, scope, item)
