"""Which scopes get live structures, so that state stays bounded however many users a tenant has.

The ledger and the Postgres rollups keep every call and every scope. The live structures — stage 2's
table and alerts (``metering.rollups``), and the spend a quota check reads from Redis — exist for:

- the tenant itself;
- every feature, user, environment, model, team, API key and tag value a budget or a rate limit names
  (``config.budgets``);
- the ``per_tenant`` most recently active values of each dimension of a tenant (default 1,000 users,
  1,000 features, 1,000 environments, 1,000 models, 1,000 teams, 1,000 API keys, 1,000 values of each
  budgeted tag); an older one drops out and comes back with its next call, its windows carrying the
  absolute totals from Postgres again.

Tags have rollups at all only for the tag names some budget or rate limit of the tenant names
(``NamedScopes.tag_dimensions``).

A value outside these has no live spend in Redis (its keys are deleted when it drops out, so a quota
check without a budget reports $0 for it) and no per-user anomaly rule; everything it spent is in the
ledger, the rollups, reports and invoices.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from schemas.records import Rollup
from schemas.redis_keys import TAG_DIMENSION_PREFIX

BOUNDED_DIMENSIONS = ("feature", "user", "environment", "model", "team", "api_key")


def bounded(dimension: str) -> bool:
    """Whether a dimension's values are kept live only while recent or named (every tag dimension is)."""
    return dimension in BOUNDED_DIMENSIONS or dimension.startswith(TAG_DIMENSION_PREFIX)


class NamedScopes(set[tuple[str, str, str]]):
    """The (tenant, dimension, value) scopes config.budgets names, and the (tenant, tag name) pairs among
    them: the only tags stage 1 makes rollups for (``sinks.postgres.write_batch``), so the rollups of
    tags stay bounded by the budgets, not by what events carry (DESIGN.md §4.5).

    Changed by the config follower on stage 1's main thread, read by its sink thread: ``tag_dimensions``
    is a frozenset rebound whole on each change, so the reader always takes one consistent snapshot."""

    def __init__(self) -> None:
        super().__init__()
        self._tag_scopes: dict[tuple[str, str], int] = {}  # (tenant, tag name) -> named scopes with it
        self.tag_dimensions: frozenset[tuple[str, str]] = frozenset()

    def add(self, scope: tuple[str, str, str]) -> None:
        if scope in self:
            return
        super().add(scope)
        tenant_id, dimension, _ = scope
        if dimension.startswith(TAG_DIMENSION_PREFIX):
            pair = (tenant_id, dimension.removeprefix(TAG_DIMENSION_PREFIX))
            self._tag_scopes[pair] = self._tag_scopes.get(pair, 0) + 1
            self.tag_dimensions = frozenset(self._tag_scopes)

    def discard(self, scope: object) -> None:
        if scope not in self:
            return
        super().discard(scope)
        assert isinstance(scope, tuple)  # a member, so a (tenant, dimension, value) tuple
        tenant_id, dimension, _ = scope
        if dimension.startswith(TAG_DIMENSION_PREFIX):
            pair = (tenant_id, dimension.removeprefix(TAG_DIMENSION_PREFIX))
            left = self._tag_scopes[pair] - 1
            if left:
                self._tag_scopes[pair] = left
            else:
                del self._tag_scopes[pair]
            self.tag_dimensions = frozenset(self._tag_scopes)


class LiveScopes:
    def __init__(self, per_tenant: int = 1000) -> None:
        self.per_tenant = per_tenant
        self._recent: dict[tuple[str, str], OrderedDict[str, None]] = {}
        self.named = NamedScopes()  # (tenant, dimension, value) named by a budget or limit

    def observe(self, rollups: Iterable[Rollup]) -> list[tuple[str, str, str]]:
        """Mark the values of a batch as active (most recent last), evicting the least recent ones;
        return the evicted (tenant, dimension, value) scopes that no budget names (their live state goes)."""
        evicted = []
        for r in rollups:
            if r.granularity != "day" or not bounded(r.dimension):
                continue
            recent = self._recent.setdefault((r.tenant_id, r.dimension), OrderedDict())
            if r.dimension_value in recent:
                recent.move_to_end(r.dimension_value)
                continue
            recent[r.dimension_value] = None
            if len(recent) > self.per_tenant:
                value, _ = recent.popitem(last=False)
                if (r.tenant_id, r.dimension, value) not in self.named:
                    evicted.append((r.tenant_id, r.dimension, value))
        return [(t, d, v) for t, d, v in evicted if v not in self._recent[(t, d)]]  # not back in the same batch

    def live(self, r: Rollup) -> bool:
        if not bounded(r.dimension):
            return True
        if (r.tenant_id, r.dimension, r.dimension_value) in self.named:
            return True
        recent = self._recent.get((r.tenant_id, r.dimension))
        return recent is not None and r.dimension_value in recent

    def tracked(self) -> int:
        """How many values are tracked in all (for tests and metrics)."""
        return sum(len(values) for values in self._recent.values())
