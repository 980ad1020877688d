"""The worker's side of prepaid credits: follow the grants in Postgres, mirror each prepaid tenant's
balance to Redis for ``QuotaClient``, and raise the balance alerts.

Every worker does this (like following budgets): each second it reads how current the spend data is
(the freshness hash) *before* reading Postgres, so the balance it derives has counted every call
produced before that instant, and writes both together (``schemas.redis_keys.credits_key``). A
tenant's balance is derived again only when its grants or its usage changed or a grant boundary
passed; otherwise the stored balance is only stamped with the newer instant.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime

import psycopg

from deploy.settings import Settings, redis_client
from schemas.credits import Allocation, Grant, alert_levels, cut_points, percent_left
from schemas.records import Alert
from schemas.redis_keys import caught_up_ms, freshness_key
from sinks.credits import forget_balance, grants_of, mirror_balances, tenant_allocation, usage_versions
from streams.metrics import CONFIG_REJECTED

log = logging.getLogger("tokenmeter.credits")


def credit_alerts(allocation: Allocation, now: datetime) -> list[Alert]:
    """A grant's balance alerts reached (20 %, 5 % left, used up), each with an id of its own per grant,
    so each fires once whatever how often it is evaluated."""
    alerts = []
    for state in allocation.grants:
        g = state.grant
        for level in alert_levels(state):
            about = f"grant {g.grant_id} of {g.tenant_id}" + (f" ({g.note})" if g.note else "")
            if level == 0:
                message = f"{about} is used up: ${g.amount.normalize():f} drawn"
            else:
                message = (
                    f"{about} has ${state.remaining.normalize():f} of ${g.amount.normalize():f} left "
                    f"({percent_left(state):.1f}%, threshold {level}%)"
                )
            alerts.append(
                Alert(
                    alert_id=f"credits:{g.grant_id}:{level}",
                    kind="credits.exhausted" if level == 0 else "credits.low",
                    tenant_id=g.tenant_id,
                    scope={"grant_id": str(g.grant_id)},
                    period=f"grant:{g.grant_id}",
                    threshold_percent=level,
                    current=state.remaining,
                    limit=g.amount,
                    message=message + f"; the tenant's prepaid balance is ${allocation.balance.normalize():f}",
                    details={
                        "grant_id": str(g.grant_id),
                        "drawn": f"{state.drawn:f}",
                        "tenant_balance": f"{allocation.balance:f}",
                        "note": g.note,
                    },
                    created_at=now,
                )
            )
    return alerts


def boundary_passed(grants: Iterable[Grant], since: datetime | None, now: datetime) -> bool:
    """Whether a grant started, expired or was voided in (since, now]: its balance changes without usage."""
    return since is None or any(since < t <= now for t in cut_points(grants))


class UnconfirmedAlerts:
    """Alerts reached but not yet confirmed stored, offered again every round until :meth:`confirm`.

    A balance alert is derived when the balance changes; an exhausted tenant makes no new calls, so if
    the alert store fails that round the alert would never be derived again. Holding it here until the
    store has it makes one failure a delay, not a loss; offering it twice is harmless (the store keeps
    each alert id once). Bounded: at most three alerts per grant wait, only while the store fails."""

    def __init__(self) -> None:
        self._waiting: dict[str, Alert] = {}

    def add(self, alerts: Iterable[Alert]) -> None:
        for alert in alerts:
            self._waiting.setdefault(alert.alert_id, alert)  # the first one reached is the one to store

    def due(self) -> list[Alert]:
        return list(self._waiting.values())

    def confirm(self, alert_ids: Iterable[str]) -> None:
        for alert_id in alert_ids:
            self._waiting.pop(alert_id, None)


class CreditFollower:
    """``tick(now)``: one round of following, mirroring and alerting; returns the alerts reached that
    the caller has not yet :meth:`confirm`-ed as stored (so every round, until it does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_client(settings, socket_timeout=2.0)
        self._conn: psycopg.Connection | None = None
        self._derived: dict[str, tuple[tuple[Grant, ...], int, Allocation]] = {}  # tenant → grants, usage, result
        self._last: datetime | None = None
        self._forgotten: set[str] = set()
        self._failed: dict[str, tuple[tuple[Grant, ...], int]] = {}  # tenant → the data it failed on
        self._unconfirmed = UnconfirmedAlerts()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.database_url, autocommit=True, connect_timeout=5)
        return self._conn

    def tick(self, now: datetime) -> list[Alert]:
        now_ms = int(now.timestamp() * 1000)
        # First: every call produced before this instant is in Postgres now (stage 1 writes it there first).
        counted = caught_up_ms(self.redis.hgetall(freshness_key(self.settings.worker_id)), now_ms) or 0  # type: ignore[arg-type]
        try:
            return self._follow(self._connection(), now, counted)
        except psycopg.OperationalError:
            self._conn = None  # connect again next time
            raise

    def _follow(self, conn: psycopg.Connection, now: datetime, counted: int) -> list[Alert]:
        by_tenant: dict[str, list[Grant]] = {}
        for g in grants_of(conn):
            by_tenant.setdefault(g.tenant_id, []).append(g)
        prepaid = [t for t, grants in by_tenant.items() if any(g.voided_at is None for g in grants)]
        versions = usage_versions(conn, prepaid) if prepaid else {}
        alerts: list[Alert] = []
        derived_now: list[str] = []
        for tenant in prepaid:
            grants = tuple(by_tenant[tenant])
            version = versions.get(tenant, 0)
            known = self._derived.get(tenant)
            changed = known is None or known[:2] != (grants, version) or boundary_passed(grants, self._last, now)
            if changed and self._failed.get(tenant) != (grants, version):
                try:
                    allocation = tenant_allocation(conn, tenant, now, grants)
                except psycopg.Error:
                    # The store, not the tenant (down, a lagging migration, an aborted transaction): the whole
                    # round is retried next tick. Counting it as this tenant's bad data would skip an idle
                    # tenant until its data changes, which for a used-up tenant is never.
                    raise
                except Exception as exc:
                    # One tenant's data must not stop every other balance: skip it, count it once, and try
                    # again when its grants or usage change. Its last balance stays in Redis, with the
                    # instant it counted up to: calls committed since stay held against it. Bad data (a
                    # ValueError says what) is one line; anything else is a bug and keeps its traceback.
                    if isinstance(exc, ValueError):
                        log.error(
                            "cannot derive the prepaid balance of %r (%s); skipped until its data changes", tenant, exc
                        )
                    else:
                        log.exception("cannot derive the prepaid balance of %r; skipped until its data changes", tenant)
                    CONFIG_REJECTED.labels(topic="credit_grants").inc()
                    self._failed[tenant] = (grants, version)
                    self._derived.pop(tenant, None)
                    continue
                self._failed.pop(tenant, None)
                self._derived[tenant] = (grants, version, allocation)
                derived_now.append(tenant)
                alerts += credit_alerts(allocation, now)
            self._forgotten.discard(tenant)
        self._unconfirmed.add(alerts)
        balances = {t: self._derived[t][2].balance for t in prepaid if t in self._derived}
        try:
            mirror_balances(self.redis, balances, counted)
        except Exception:
            # The caller gets no alerts this round (they wait in _unconfirmed); derive these tenants again
            # next round all the same, so their balances are written.
            for tenant in derived_now:
                self._derived.pop(tenant, None)
            raise
        for tenant in set(by_tenant) - set(prepaid) - self._forgotten:  # every grant voided: postpaid again
            forget_balance(self.redis, tenant)
            self._derived.pop(tenant, None)
            self._forgotten.add(tenant)
        self._last = now
        return self._unconfirmed.due()

    def confirm(self, alert_ids: Iterable[str]) -> None:
        """The alert store has these (stored now or before): stop offering them."""
        self._unconfirmed.confirm(alert_ids)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
