"""Which scopes get live structures, so that state stays bounded however many users a tenant has.

The ledger and the Postgres rollups keep every call and every scope. The live structures — stage 2's
table and alerts (``metering.rollups``), and the spend a quota check reads from Redis — exist for:

- the tenant itself and its models (alerts on unknown models need those);
- every feature, user and environment a budget or a rate limit names (``config.budgets``);
- the ``per_tenant`` most recently active values of each dimension of a tenant (default 1,000 users,
  1,000 features, 1,000 environments, 1,000 models); an older one drops out and comes back with its
  next call, its windows carrying the absolute totals from Postgres again.

A value outside these has no live spend in Redis (its keys are deleted when it drops out, so a quota
check without a budget reports $0 for it) and no per-user anomaly rule; everything it spent is in the
ledger, the rollups, reports and invoices.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from schemas.records import Rollup

BOUNDED_DIMENSIONS = ("feature", "user", "environment", "model")


class LiveScopes:
    def __init__(self, per_tenant: int = 1000) -> None:
        self.per_tenant = per_tenant
        self._recent: dict[tuple[str, str], OrderedDict[str, None]] = {}
        self.named: set[tuple[str, str, str]] = set()  # (tenant, dimension, value) named by a budget or limit

    def observe(self, rollups: Iterable[Rollup]) -> list[tuple[str, str, str]]:
        """Mark the values of a batch as active (most recent last), evicting the least recent ones;
        return the evicted (tenant, dimension, value) scopes that no budget names (their live state goes)."""
        evicted = []
        for r in rollups:
            if r.dimension not in BOUNDED_DIMENSIONS or r.granularity != "day":
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
        if r.dimension not in BOUNDED_DIMENSIONS:
            return True
        if (r.tenant_id, r.dimension, r.dimension_value) in self.named:
            return True
        recent = self._recent.get((r.tenant_id, r.dimension))
        return recent is not None and r.dimension_value in recent

    def tracked(self) -> int:
        """How many values are tracked in all (for tests and metrics)."""
        return sum(len(values) for values in self._recent.values())
