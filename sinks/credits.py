"""Prepaid credits in Postgres and their Redis mirror: thin I/O around ``schemas/credits.py``.

Grants and voids are append-only rows (migration 0012); a tenant's draws, balance and expired
remainders are derived by :func:`schemas.credits.allocate` from them and the tenant's usage in the
ledger (exactly once already), read as sums between the grants' boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg
import redis

from schemas.credits import (
    Allocation,
    Grant,
    UsageSlice,
    allocate,
    check_grant,
    check_note,
    credits_still_due,
    cut_points,
)
from schemas.periods import local_midnight, period_end
from schemas.redis_keys import credit_balance, credits_key, format_credit_balance


class CreditError(ValueError):
    pass


_GRANT_COLUMNS = (
    "g.grant_id, g.tenant_id, g.amount, g.priority, g.starts_at, g.expires_at, g.created_at, g.note, v.voided_at"
)
_GRANTS = (
    f"SELECT {_GRANT_COLUMNS} FROM tokenmeter.credit_grants AS g"
    " LEFT JOIN tokenmeter.credit_voids AS v USING (grant_id)"
)


def record_grant(
    conn: psycopg.Connection,
    tenant_id: str,
    amount: Decimal,
    *,
    priority: int,
    starts_at: datetime,
    expires_at: datetime | None,
    note: str = "",
) -> Grant:
    """Append a grant (validated: ValueError says what is wrong)."""
    check_grant(tenant_id, amount, priority, starts_at, expires_at, note)
    row = conn.execute(
        "INSERT INTO tokenmeter.credit_grants (tenant_id, amount, priority, starts_at, expires_at, note)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING grant_id",
        (tenant_id, amount, priority, starts_at, expires_at, note),
    ).fetchone()
    assert row is not None
    return grants_of(conn, grant_id=int(row[0]))[0]


def void_grant(conn: psycopg.Connection, grant_id: int, now: datetime, note: str = "") -> Grant:
    """End a grant now: later usage does not draw from it. Refused for an unknown, voided or ended grant."""
    found = grants_of(conn, grant_id=grant_id)
    if not found:
        raise CreditError(f"there is no grant {grant_id}")
    grant = found[0]
    if grant.voided_at is not None:
        raise CreditError(f"grant {grant_id} was already voided at {grant.voided_at.isoformat()}")
    if grant.expires_at is not None and grant.expires_at <= now:
        raise CreditError(f"grant {grant_id} expired at {grant.expires_at.isoformat()}: nothing left to void")
    check_note(note)
    conn.execute(
        "INSERT INTO tokenmeter.credit_voids (grant_id, voided_at, note) VALUES (%s, %s, %s)"
        " ON CONFLICT (grant_id) DO NOTHING",
        (grant_id, now, note),
    )
    return grants_of(conn, grant_id=grant_id)[0]


def grants_of(conn: psycopg.Connection, tenant_id: str | None = None, grant_id: int | None = None) -> list[Grant]:
    """Grants (with their void, if any) of one tenant, one grant, or all, oldest first."""
    rows = conn.execute(
        f"{_GRANTS} WHERE (%(tenant)s::text IS NULL OR g.tenant_id = %(tenant)s)"
        " AND (%(grant)s::bigint IS NULL OR g.grant_id = %(grant)s) ORDER BY g.grant_id",
        {"tenant": tenant_id, "grant": grant_id},
    ).fetchall()
    return [Grant(*row) for row in rows]


def usage_slices(conn: psycopg.Connection, tenant_id: str, points: Sequence[datetime]) -> list[UsageSlice]:
    """The tenant's metered spend between consecutive ``points`` (sorted), and from the last one on;
    usage before the first point is not read (no grant is open then)."""
    if not points:
        return []
    rows = conn.execute(
        "SELECT width_bucket(ts, %s::timestamptz[]) AS slice, sum(total_cost) FROM tokenmeter.ledger"
        " WHERE tenant_id = %s AND ts >= %s GROUP BY slice",
        (list(points), tenant_id, points[0]),
    ).fetchall()
    slices = []
    for index, cost in rows:  # width_bucket counts from 1: slice i starts at points[i - 1]
        end = points[index] if index < len(points) else None
        slices.append(UsageSlice(points[index - 1], end, Decimal(cost)))
    return slices


def tenant_allocation(
    conn: psycopg.Connection,
    tenant_id: str,
    now: datetime,
    grants: Sequence[Grant] | None = None,
    extra_points: Iterable[datetime] = (),
) -> Allocation:
    """A tenant's draws, balance and grant states at ``now``; ``extra_points`` also cut the usage (so
    draws can be summed between them, e.g. a month's bounds)."""
    grants = grants_of(conn, tenant_id) if grants is None else grants
    points = cut_points(grants, extra_points)
    usage = usage_slices(conn, tenant_id, points) if grants else []
    return allocate(grants, usage, now)


def usage_versions(conn: psycopg.Connection, tenant_ids: Sequence[str]) -> dict[str, int]:
    """Per tenant, how many calls its ledger holds (from the month rollups): changes exactly when new
    usage was recorded, so a worker derives a balance again only then."""
    rows = conn.execute(
        "SELECT tenant_id, sum(calls)::bigint FROM tokenmeter.rollups WHERE granularity = 'month'"
        " AND dimension = 'tenant' AND tenant_id = ANY(%s) GROUP BY tenant_id",
        (list(tenant_ids),),
    ).fetchall()
    return {tenant: int(calls) for tenant, calls in rows}


# ---------------------------------------------------------------- the Redis mirror
# Set the balance unless the stored one has counted up to a later instant (schemas.redis_keys.credit_write_wins).
_SET_IF_LATER = """
local stored = redis.call('GET', KEYS[1])
if stored then
  local counted = string.match(stored, '^%-?%d+ (%d+)$')
  if counted and tonumber(counted) > tonumber(ARGV[2]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""


def mirror_balance(
    client: redis.Redis | redis.RedisCluster, tenant_id: str, balance: Decimal, counted_up_to_ms: int
) -> bool:
    """Write a prepaid tenant's balance for ``QuotaClient``; False if a later one was there already."""
    return mirror_balances(client, {tenant_id: balance}, counted_up_to_ms) == 1


def mirror_balances(
    client: redis.Redis | redis.RedisCluster, balances: Mapping[str, Decimal], counted_up_to_ms: int
) -> int:
    """Write many tenants' balances in one pipeline (EVAL as a raw command: a cluster pipeline has no
    .eval(), and each script touches one key, so one slot); returns how many were written."""
    pipe = client.pipeline(transaction=False)
    for tenant_id, balance in balances.items():
        value = format_credit_balance(balance, counted_up_to_ms)
        pipe.execute_command("EVAL", _SET_IF_LATER, 1, credits_key(tenant_id), value, counted_up_to_ms)
    return sum(int(written) for written in pipe.execute())


def forget_balance(client: redis.Redis | redis.RedisCluster, tenant_id: str) -> None:
    """The tenant is no longer on prepaid terms (its last grant was voided)."""
    client.delete(credits_key(tenant_id))


def mirrored_balance(client: redis.Redis | redis.RedisCluster, tenant_id: str) -> Decimal | None:
    found = credit_balance(client.get(credits_key(tenant_id)))
    return None if found is None else found[0]


# ---------------------------------------------------------------- invoices
@dataclass(frozen=True)
class CreditApplied:
    """What one grant paid of an invoice's usage."""

    grant_id: int
    note: str
    applied: Decimal

    def as_json(self) -> dict[str, object]:
        return {"grant_id": self.grant_id, "note": self.note, "applied": str(self.applied)}


def month_bounds(period: str, time_zone: str) -> tuple[datetime, datetime]:
    """The instants the month ``YYYY-MM`` starts and ends at in the tenant's time zone."""
    start = local_midnight(datetime.strptime(period, "%Y-%m").date(), time_zone)
    return start, period_end("month", start, time_zone)


def open_invoice_credits(
    conn: psycopg.Connection, tenant_id: str, period: str, time_zone: str, finalized_before: Sequence[str]
) -> list[CreditApplied]:
    """Per grant (by id), the credit the open invoice of ``period`` applies (:func:`credits_still_due`):
    the draws of the usage of the month and of every earlier finalized month (``finalized_before``,
    whose late usage it bills as adjustments), less what the tenant's earlier invoices applied."""
    grants = grants_of(conn, tenant_id)
    if not grants:
        return []
    months = [month_bounds(month, time_zone) for month in (period, *finalized_before)]
    ends = months[0][1]
    allocation = tenant_allocation(conn, tenant_id, ends, grants, [t for bounds in months for t in bounds])
    drawn = [allocation.applied_between(start, end) for start, end in months]
    rows = conn.execute(
        "SELECT grant_id, sum(applied) FROM tokenmeter.invoice_credits WHERE tenant_id = %s AND period < %s"
        " GROUP BY grant_id",
        (tenant_id, period),
    ).fetchall()
    applied = credits_still_due(drawn, {int(grant_id): Decimal(amount) for grant_id, amount in rows})
    by_id = {g.grant_id: g for g in grants}
    return [CreditApplied(grant_id, by_id[grant_id].note, amount) for grant_id, amount in applied.items()]


def frozen_credits(conn: psycopg.Connection, tenant_id: str, period: str) -> list[CreditApplied]:
    rows = conn.execute(
        "SELECT c.grant_id, g.note, c.applied FROM tokenmeter.invoice_credits AS c"
        " JOIN tokenmeter.credit_grants AS g USING (grant_id) WHERE c.tenant_id = %s AND c.period = %s"
        " ORDER BY c.grant_id",
        (tenant_id, period),
    ).fetchall()
    return [CreditApplied(int(grant_id), note, applied) for grant_id, note, applied in rows]


def freeze_credits(conn: psycopg.Connection, tenant_id: str, period: str, credits: Sequence[CreditApplied]) -> None:
    """Store what a finalized invoice applied (inside the finalizing transaction)."""
    with conn.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO tokenmeter.invoice_credits (tenant_id, period, grant_id, applied) VALUES (%s, %s, %s, %s)",
            [(tenant_id, period, c.grant_id, c.applied) for c in credits],
        )
