"""Prepaid credits' pure rules: the draw-down order, expiry and voids, balances, validation — checked
against an independent call-by-call simulation, exact to the ledger's 12 decimal places."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from schemas.credits import (
    Grant,
    UsageSlice,
    alert_levels,
    allocate,
    check_grant,
    credits_still_due,
    cut_points,
    grant_amount,
)
from schemas.redis_keys import (
    credit_balance,
    credit_write_wins,
    credits_key,
    format_credit_balance,
    parse_scope_key,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def grant(
    grant_id: int,
    amount: str,
    priority: int = 100,
    starts: float = 0,
    expires: float | None = None,
    voided: float | None = None,
) -> Grant:
    return Grant(
        grant_id,
        "acme",
        Decimal(amount),
        priority,
        day(starts),
        None if expires is None else day(expires),
        created_at=day(starts) + timedelta(seconds=grant_id),
        voided_at=None if voided is None else day(voided),
    )


def slices(
    calls: list[tuple[datetime, Decimal]], grants: list[Grant], extra: list[datetime] | None = None
) -> list[UsageSlice]:
    """Sum the calls between the grants' boundaries (and ``extra`` points), as the Postgres query does."""
    points = cut_points(grants, extra or [])
    sums: dict[int, Decimal] = {}
    for at, cost in calls:
        index = sum(1 for p in points if p <= at)  # width_bucket
        if index:
            sums[index] = sums.get(index, Decimal(0)) + cost
    return [UsageSlice(points[i - 1], points[i] if i < len(points) else None, c) for i, c in sums.items()]


def simulate(grants: list[Grant], calls: list[tuple[datetime, Decimal]]) -> tuple[dict[int, Decimal], Decimal]:
    """The documented rule applied call by call, written independently of allocate(): each call draws
    from the grants open at its instant, lowest priority number first, then earliest expiry (none
    last), then the oldest."""
    left = {g.grant_id: g.amount for g in grants}
    uncovered = Decimal(0)
    for at, cost in sorted(calls):
        open_now = []
        for g in grants:
            ends = min([t for t in (g.expires_at, g.voided_at) if t is not None], default=None)
            if g.starts_at <= at and (ends is None or at < ends):
                open_now.append(g)
        never = datetime.max.replace(tzinfo=UTC)
        open_now.sort(key=lambda g: (g.priority, g.expires_at or never, g.created_at, g.grant_id))
        for g in open_now:
            take = min(cost, left[g.grant_id])
            left[g.grant_id] -= take
            cost -= take
        uncovered += cost
    return {g.grant_id: g.amount - left[g.grant_id] for g in grants}, uncovered


def test_grants_draw_down_by_priority_then_earliest_expiry_then_age() -> None:
    grants = [
        grant(1, "10", priority=100),  # no expiry: after the expiring ones of its priority
        grant(2, "5", priority=100, expires=20),
        grant(3, "3", priority=100, expires=10),  # earliest expiry of priority 100: first of them
        grant(4, "2", priority=0, expires=30),  # priority 0: drawn before everything
    ]
    calls = [(day(1), Decimal("4.5")), (day(2), Decimal("0.000000000001"))]
    allocation = allocate(grants, slices(calls, grants), day(3))
    drawn = {s.grant.grant_id: s.drawn for s in allocation.grants}
    # 4.500000000001: grant 4 (priority 0) gives 2, then grant 3 (expires first) 2.500000000001
    assert drawn == {4: Decimal(2), 3: Decimal("2.500000000001"), 2: Decimal(0), 1: Decimal(0)}
    assert [s.grant.grant_id for s in allocation.grants] == [4, 3, 2, 1]
    assert allocation.balance == Decimal("15.499999999999")  # 20 granted - 4.500000000001
    assert allocation.uncovered == 0 and allocation.prepaid


def test_expired_remainder_is_recorded_and_later_usage_draws_the_next_grant() -> None:
    grants = [grant(1, "3", priority=1, expires=10), grant(2, "5", priority=2)]
    calls = [(day(5), Decimal("1.25")), (day(10), Decimal("2")), (day(12), Decimal("4"))]
    allocation = allocate(grants, slices(calls, grants), day(15))
    first, second = allocation.states[1], allocation.states[2]
    # usage at the instant of expiry no longer draws from grant 1 (expires_at is exclusive)
    assert (first.status, first.drawn, first.expired, first.remaining) == (
        "expired",
        Decimal("1.25"),
        Decimal("1.75"),
        0,
    )
    assert (second.status, second.drawn, second.remaining) == ("used_up", Decimal(5), Decimal(0))
    assert allocation.uncovered == Decimal(1)  # 2 + 4 - 5
    assert allocation.balance == 0


def test_void_stops_later_draws_keeps_earlier_ones_and_ends_prepaid_terms() -> None:
    grants = [grant(1, "10", voided=5)]
    calls = [(day(1), Decimal("2")), (day(6), Decimal("3"))]
    allocation = allocate(grants, slices(calls, grants), day(7))
    state = allocation.states[1]
    assert (state.status, state.drawn, state.voided, state.expired) == ("voided", Decimal(2), Decimal(8), Decimal(0))
    assert allocation.uncovered == Decimal(3) and allocation.balance == 0 and not allocation.prepaid


def test_a_grant_that_starts_later_is_pending_and_not_in_the_balance() -> None:
    grants = [grant(1, "4"), grant(2, "6", starts=10)]
    allocation = allocate(grants, slices([(day(1), Decimal("1"))], grants), day(2))
    assert allocation.states[2].status == "pending" and allocation.balance == Decimal(3)


def test_random_grants_and_usage_match_a_call_by_call_simulation_exactly() -> None:
    rng = random.Random(16)
    for _ in range(200):
        grants = []
        for grant_id in range(1, rng.randint(1, 6) + 1):
            starts = rng.randint(0, 20)
            expires = starts + rng.randint(1, 30) if rng.random() < 0.6 else None
            voided = starts + rng.randint(0, 25) if rng.random() < 0.2 else None
            amount = f"{rng.randint(0, 40)}.{rng.randint(1, 10**12 - 1):012d}"
            grants.append(grant(grant_id, amount, rng.choice([0, 5, 100]), starts, expires, voided))
        calls = [
            (day(rng.uniform(0, 60)), Decimal(rng.randint(1, 5 * 10**12)) / Decimal(10**12))
            for _ in range(rng.randint(0, 80))
        ]
        calls += [(g.expires_at, Decimal("0.5")) for g in grants if g.expires_at]  # exactly at a boundary
        allocation = allocate(grants, slices(calls, grants), day(61))
        drawn, uncovered = simulate(grants, calls)
        assert {s.grant.grant_id: s.drawn for s in allocation.grants} == drawn
        before_any = sum((c for at, c in calls if at < min(g.starts_at for g in grants)), Decimal(0))
        assert allocation.uncovered == uncovered - before_any  # usage before every grant is not on credit terms
        total = sum((c for _, c in calls), Decimal(0))
        assert sum(drawn.values()) + allocation.uncovered == total - before_any  # each cent drawn or uncovered
        for s in allocation.grants:
            assert s.drawn + s.remaining + s.expired + s.voided == s.grant.amount


def test_usage_straddling_a_boundary_is_refused() -> None:
    grants = [grant(1, "1", expires=10)]
    with pytest.raises(ValueError, match="straddles"):
        allocate(grants, [UsageSlice(day(5), day(15), Decimal(1))], day(20))
    with pytest.raises(ValueError, match="negative"):
        allocate(grants, [UsageSlice(day(0), day(10), Decimal(-1))], day(20))


def test_alert_levels_fire_at_20_and_5_percent_and_when_used_up_only_while_open() -> None:
    grants = [grant(1, "100"), grant(2, "100", expires=5)]

    def levels(spent: str, at: float) -> dict[int, list[int]]:
        allocation = allocate(grants, slices([(day(1), Decimal(spent))], grants), day(at))
        return {s.grant.grant_id: alert_levels(s) for s in allocation.grants}

    assert levels("79.99", 2) == {2: [], 1: []}  # grant 2 (expires) is drawn first
    assert levels("80", 2) == {2: [20], 1: []}
    assert levels("95", 2) == {2: [20, 5], 1: []}
    assert levels("100", 2) == {2: [20, 5, 0], 1: []}
    assert levels("196", 2) == {2: [20, 5, 0], 1: [20, 5]}
    assert levels("95", 6) == {2: [], 1: []}  # grant 2 expired with 5 left: not "running low"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("-5", "positive"),
        ("0", "positive"),
        ("NaN", "positive"),
        ("Infinity", "positive"),
        ("1e400", "at most"),
        ("1000000.000000000001", "at most"),
        ("0.0000000000001", "decimal places"),
        ("five", "not a decimal"),
        (5.5, "got float"),
        (True, "got bool"),
        (None, "got NoneType"),
    ],
)
def test_grant_amounts_are_exact_positive_and_bounded(raw: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        grant_amount(raw)


def test_grant_amounts_keep_every_decimal() -> None:
    assert grant_amount(" 12.500000000001 ") == Decimal("12.500000000001")
    assert grant_amount(500) == Decimal(500)


def test_grants_refuse_bad_names_priorities_and_times() -> None:
    ok: dict[str, Any] = {
        "tenant_id": "acme",
        "amount": Decimal(1),
        "priority": 1,
        "starts_at": day(0),
        "expires_at": None,
    }
    check_grant(**ok, note="welcome credit")
    for change, problem in [
        ({"tenant_id": "ac\x00me"}, "control character"),
        ({"tenant_id": ""}, "1-200"),
        ({"tenant_id": "x" * 201}, "1-200"),
        ({"priority": -1}, "priority"),
        ({"priority": 10**7}, "priority"),
        ({"priority": True}, "priority"),
        ({"expires_at": day(0)}, "before it starts"),
        ({"starts_at": datetime(2026, 1, 1)}, "time zone"),
    ]:
        with pytest.raises(ValueError, match=problem):
            check_grant(**{**ok, **change}, note="")  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="control character"):
        check_grant(**ok, note="bad\x1bnote")
    with pytest.raises(ValueError, match="at most 500"):
        check_grant(**ok, note="n" * 501)


def test_the_mirrored_balance_is_exact_nano_usd_rounded_down_and_never_goes_back() -> None:
    key = credits_key("ac:me{1}")
    parsed = parse_scope_key(key)
    assert parsed is not None and (parsed.kind, parsed.tenant_id, parsed.dimension) == ("credits", "ac:me{1}", "tenant")
    value = format_credit_balance(Decimal("1.0000000019"), 1_700_000_000_000)
    assert value == "1000000001 1700000000000"  # never more than the grants hold
    assert credit_balance(value) == (Decimal("1.000000001"), 1_700_000_000_000)
    assert credit_balance(format_credit_balance(Decimal(10**9), 1)) == (Decimal(9_000_000), 1)  # capped
    assert credit_balance(b"junk") is None and credit_balance(None) is None
    assert credit_write_wins("5 200", b"7 100") and credit_write_wins("5 200", "7 200")
    assert not credit_write_wins("5 100", b"7 200")


# ---------------------------------------------------------------- credits applied on invoices (issue #16)
def test_credits_still_due_are_the_draws_less_what_earlier_invoices_applied() -> None:
    drawn = [{1: Decimal("3"), 2: Decimal("0.5")}, {1: Decimal("1.25"), 3: Decimal("2")}]
    applied_before = {1: Decimal("4"), 2: Decimal("0.5"), 4: Decimal("9")}
    # grant 1: 4.25 drawn, 4 applied → 0.25; grant 2: settled; grant 3: new; grant 4: no draws here
    assert credits_still_due(drawn, applied_before) == {1: Decimal("0.25"), 3: Decimal("2")}
    assert credits_still_due([{1: Decimal("1")}], {1: Decimal("2")}) == {}  # never negative
    assert credits_still_due([], {}) == {}


MONTH_DAYS = 10


def month_of(at: datetime) -> int:
    return int((at - T0) / timedelta(days=MONTH_DAYS))


@pytest.mark.parametrize("seed", range(150))
def test_late_usage_is_paid_once_by_credit_or_amount_due(seed: int) -> None:
    """Months of 10 days, finalized in order; between finalizations, calls of the open month and late
    calls into finalized months arrive. Each invoice applies credits_still_due over the draws of the
    usage it and earlier invoices bill. Checked against the call-by-call simulation: per grant, the
    credits applied over all invoices equal its draws by every call; each invoice's credits are at
    most what it bills; and amount due + credits over all invoices is every call's cost, once."""
    rng = random.Random(seed)
    months = 4
    grants = []
    for grant_id in range(1, rng.randint(1, 4) + 1):
        starts = rng.uniform(0, 25)
        expires = starts + rng.uniform(1, 20) if rng.random() < 0.5 else None
        voided = starts + rng.uniform(0.5, 20) if rng.random() < 0.2 else None
        amount = Decimal(rng.randint(1, 4000)).scaleb(-3)
        grants.append(grant(grant_id, f"{amount}", rng.choice((0, 1, 100)), starts, expires, voided))

    def call(month: int) -> tuple[datetime, Decimal]:
        return day(month * MONTH_DAYS + rng.uniform(0, MONTH_DAYS)), Decimal(rng.randint(1, 900)).scaleb(-3)

    bounds = [day(m * MONTH_DAYS) for m in range(months + 1)]
    calls: list[tuple[datetime, Decimal]] = []
    billed_cost: list[Decimal] = []  # what each invoice bills: its month's calls and late calls, at cost
    applied: list[dict[int, Decimal]] = []
    cost_billed_before = Decimal(0)
    for month in range(months):
        calls += [call(month) for _ in range(rng.randint(0, 6))]
        calls += [call(rng.randrange(month)) for _ in range(rng.randint(0, 3) if month else 0)]  # late
        allocation = allocate(grants, slices(calls, grants, bounds), day(100))
        drawn = [allocation.applied_between(bounds[m], bounds[m + 1]) for m in range(month + 1)]
        before: dict[int, Decimal] = {}
        for earlier in applied:
            for grant_id, amount in earlier.items():
                before[grant_id] = before.get(grant_id, Decimal(0)) + amount
        applied.append(credits_still_due(drawn, before))
        cost_now = sum((c for at, c in calls if month_of(at) <= month), Decimal(0))
        billed_cost.append(cost_now - cost_billed_before)
        cost_billed_before = cost_now
        assert sum(applied[-1].values(), Decimal(0)) <= billed_cost[-1]

    expected_draws, uncovered = simulate(grants, calls)
    total_applied = {g.grant_id: sum((a.get(g.grant_id, Decimal(0)) for a in applied), Decimal(0)) for g in grants}
    assert total_applied == expected_draws
    due = [cost - sum(a.values(), Decimal(0)) for cost, a in zip(billed_cost, applied, strict=True)]
    assert sum(due, Decimal(0)) == uncovered
    assert sum(due, Decimal(0)) + sum(total_applied.values(), Decimal(0)) == sum(c for _, c in calls)
