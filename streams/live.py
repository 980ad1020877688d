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
(``NamedScopes.tag_dimensions``). Models, teams and API keys have spend in Redis only for the values a
budget or rate limit names (``LiveScopes.mirrored``); their recent values still reach stage 2.

A value outside these has no live spend in Redis (its keys are deleted when it drops out, so a quota
check without a budget reports $0 for it) and no per-user anomaly rule; everything it spent is in the
ledger, the rollups, reports and invoices.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet

from schemas.records import Rollup
from schemas.redis_keys import TAG_DIMENSION_PREFIX

BOUNDED_DIMENSIONS = ("feature", "user", "environment", "model", "team", "api_key")
# Dimensions whose spend Redis mirrors only for the values a budget or rate limit names: a quota check
# reads their spend only then, and every active model of a tenant would otherwise cost three keys per batch
# in every workload. (Stage 2 still gets their recent values' windows: its rules read model months.)
NAMED_ONLY_DIMENSIONS = ("model", "team", "api_key")


def bounded(dimension: str) -> bool:
    """Whether a dimension's values are kept live only while recent or named (every tag dimension is)."""
    return dimension in BOUNDED_DIMENSIONS or dimension.startswith(TAG_DIMENSION_PREFIX)


class NamedScopes(AbstractSet[tuple[str, str, str]]):
    """The (tenant, dimension, value) scopes config.budgets names, and the (tenant, tag name) pairs that get
    tag rollups: the only tags stage 1 makes rollups for (``sinks.postgres.write_batch``), so the rollups of
    tags stay bounded by the budgets, not by what events carry (DESIGN.md §4.5).

    A read-only set changed only by ``add`` and ``discard`` (not a ``set`` subclass: its other mutators
    would bypass the tag bookkeeping). ``tag_dimensions`` is a frozenset rebound whole on each change, so
    stage 1's sink thread always reads one consistent snapshot.

    A pair stays in ``tag_dimensions`` after its last named scope goes, until the caller has recorded it
    stale in Postgres and ``retire``s it (``unnamed_tags``): no batch skips a tag whose rollups are still
    recorded complete, so a budget naming it later knows it must rebuild them. ``keep`` does the same for
    the pairs Postgres records complete when stage 1 starts (before its budgets are all read back)."""

    def __init__(self, scopes: Iterable[tuple[str, str, str]] = ()) -> None:
        # ``keep`` runs on stage 1's sink thread (before its first write), the rest on its main thread.
        self._lock = threading.Lock()
        self._scopes: set[tuple[str, str, str]] = set()
        self._tag_scopes: dict[tuple[str, str], int] = {}  # (tenant, tag name) -> named scopes with it
        self._kept: set[tuple[str, str]] = set()  # pairs still counted though perhaps unnamed
        self.tag_dimensions: frozenset[tuple[str, str]] = frozenset()
        for scope in scopes:  # also how the set operators (&, |, -) build their results
            self.add(scope)

    def __contains__(self, scope: object) -> bool:
        return scope in self._scopes

    def __iter__(self) -> Iterator[tuple[str, str, str]]:
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def add(self, scope: tuple[str, str, str]) -> None:
        with self._lock:
            if scope in self._scopes:
                return
            self._scopes.add(scope)
            pair = _tag_pair(scope)
            if pair is not None:
                self._tag_scopes[pair] = self._tag_scopes.get(pair, 0) + 1
                self._publish()

    def discard(self, scope: tuple[str, str, str]) -> None:
        with self._lock:
            if scope not in self._scopes:
                return
            self._scopes.discard(scope)
            pair = _tag_pair(scope)
            if pair is not None:
                left = self._tag_scopes[pair] - 1
                if left:
                    self._tag_scopes[pair] = left
                else:
                    del self._tag_scopes[pair]
                    self._kept.add(pair)  # counted on until recorded stale (``retire``)

    def keep(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Count these (tenant, tag name) pairs whether named or not, until ``retire``d."""
        with self._lock:
            self._kept.update(pairs)
            self._publish()

    def unnamed_tags(self) -> frozenset[tuple[str, str]]:
        """The pairs still counted that nothing names: to be recorded stale, then ``retire``d."""
        with self._lock:
            return frozenset(self._kept.difference(self._tag_scopes))

    def retire(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Stop counting these pairs, unless a scope names one again meanwhile."""
        with self._lock:
            self._kept.difference_update(pair for pair in pairs if pair not in self._tag_scopes)
            self._publish()

    def _publish(self) -> None:
        self.tag_dimensions = frozenset(self._kept.union(self._tag_scopes))


def _tag_pair(scope: tuple[str, str, str]) -> tuple[str, str] | None:
    tenant_id, dimension, _ = scope
    if dimension.startswith(TAG_DIMENSION_PREFIX):
        return tenant_id, dimension.removeprefix(TAG_DIMENSION_PREFIX)
    return None


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

    def drop_tenants(self, tenants: AbstractSet[str]) -> list[tuple[str, str, str]]:
        """Stop tracking these tenants' values (their partitions went to another process, which tracks the
        values it sees from now on); return the dropped scopes no budget names (their live state goes)."""
        dropped = []
        for tenant_id, dimension in [pair for pair in self._recent if pair[0] in tenants]:
            for value in self._recent.pop((tenant_id, dimension)):
                if (tenant_id, dimension, value) not in self.named:
                    dropped.append((tenant_id, dimension, value))
        return dropped

    def live(self, r: Rollup) -> bool:
        if not bounded(r.dimension):
            return True
        if (r.tenant_id, r.dimension, r.dimension_value) in self.named:
            return True
        recent = self._recent.get((r.tenant_id, r.dimension))
        return recent is not None and r.dimension_value in recent

    def mirrored(self, r: Rollup) -> bool:
        """Whether Redis mirrors this window's scope: a live one, but of ``NAMED_ONLY_DIMENSIONS`` only a named one."""
        if r.dimension in NAMED_ONLY_DIMENSIONS:
            return (r.tenant_id, r.dimension, r.dimension_value) in self.named
        return self.live(r)

    def tracked(self) -> int:
        """How many values are tracked in all (for tests and metrics)."""
        return sum(len(values) for values in self._recent.values())
