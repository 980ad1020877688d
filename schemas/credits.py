"""Prepaid credits: grants, the draw-down rule and balances — pure functions, no I/O.

A grant gives a tenant ``amount`` USD of credit, drawn by the tenant's metered spend (the ledger's
``total_cost``, the same spend budgets count) of calls made at or after ``starts_at`` and before the
grant ends (``expires_at``, or ``voided_at`` if it was voided earlier). Usage draws in the time order
of the calls; at any instant it draws from the grants open then in **draw order**:

1. ``priority`` ascending (0 first; default :data:`DEFAULT_PRIORITY`),
2. then the earliest ``expires_at`` (a grant without expiry last),
3. then the oldest grant (``created_at``, then ``grant_id``).

Each grant is drawn until it is used up, then the next; usage no grant covers is ``uncovered`` (billed
as amount due). Once a grant has ended, what it had left is its ``expired`` (or ``voided``) remainder.
Nothing is stored but the grants and voids: :func:`allocate` derives every draw again from the usage,
so replays and restarts give the same numbers, exactly (Decimal, no rounding).

Between two consecutive grant boundaries (a start, an expiry, a void) the set of open grants does not
change, so usage need not be read call by call: the sum of each slice between boundaries
(:func:`cut_points`) draws exactly as its calls one by one would.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation

from schemas.events import MAX_ID_LEN, printable_problem

DEFAULT_PRIORITY = 100
MAX_PRIORITY = 1_000_000
# A million dollars a grant: far above any real top-up; a tenant's balance is mirrored to Redis in
# integer nano-USD, which the quota script's doubles hold exactly up to ~$9M (see MAX_MIRRORED_NANO).
MAX_GRANT = Decimal(1_000_000)
MAX_NOTE_LEN = 500
MAX_DECIMAL_PLACES = 12  # NUMERIC(38, 12)
_QUANTUM = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)
# Balance alerts, once each per grant: what is left falls to 20 % and 5 % of the grant, and 0 (exhausted).
ALERT_PERCENTS = (20, 5, 0)


@dataclass(frozen=True)
class Grant:
    grant_id: int
    tenant_id: str
    amount: Decimal
    priority: int
    starts_at: datetime
    expires_at: datetime | None
    created_at: datetime
    note: str = ""
    voided_at: datetime | None = None

    @property
    def ends_at(self) -> datetime | None:
        """When usage stops drawing from it: its expiry or its void, whichever is first."""
        ends = [t for t in (self.expires_at, self.voided_at) if t is not None]
        return min(ends) if ends else None

    def draw_key(self) -> tuple[int, int, datetime, datetime, int]:
        """Sort key of the draw order (module docstring)."""
        no_expiry = self.expires_at is None
        return (self.priority, int(no_expiry), self.expires_at or self.created_at, self.created_at, self.grant_id)

    def open_during(self, start: datetime, end: datetime | None) -> bool:
        """Whether usage in [start, end) draws from it (``end`` None: open-ended)."""
        ends = self.ends_at
        return self.starts_at <= start and (ends is None or (end is not None and end <= ends))


@dataclass(frozen=True)
class UsageSlice:
    """A tenant's metered spend of the calls made in [start, end); ``end`` None: no end."""

    start: datetime
    end: datetime | None
    cost: Decimal


@dataclass(frozen=True)
class Draw:
    grant_id: int
    start: datetime  # the usage slice it was drawn by
    end: datetime | None
    amount: Decimal


@dataclass(frozen=True)
class GrantState:
    grant: Grant
    drawn: Decimal
    remaining: Decimal  # usable now (zero once ended)
    expired: Decimal  # the remainder when it expired (zero unless it has)
    voided: Decimal  # the remainder when it was voided
    status: str  # pending (starts later) | active | used_up | expired | voided

    def as_json(self) -> dict[str, object]:
        g = self.grant
        return {
            "grant_id": g.grant_id,
            "tenant_id": g.tenant_id,
            "amount": plain(g.amount),
            "priority": g.priority,
            "starts_at": g.starts_at.isoformat(),
            "expires_at": g.expires_at.isoformat() if g.expires_at else None,
            "voided_at": g.voided_at.isoformat() if g.voided_at else None,
            "note": g.note,
            "status": self.status,
            "drawn": plain(self.drawn),
            "remaining": plain(self.remaining),
            "expired": plain(self.expired),
            "voided": plain(self.voided),
        }


@dataclass(frozen=True)
class Allocation:
    grants: list[GrantState]  # in draw order
    draws: list[Draw]
    uncovered: Decimal  # usage no grant covered
    balance: Decimal  # what the active grants have left now
    prepaid: bool  # on prepaid terms: at least one grant that is not voided
    states: dict[int, GrantState] = field(default_factory=dict)

    def applied_between(self, start: datetime, end: datetime) -> dict[int, Decimal]:
        """Per grant, what usage in [start, end) drew from it; ``start`` and ``end`` must be cut points."""
        applied: dict[int, Decimal] = {}
        for d in self.draws:
            if start <= d.start and d.end is not None and d.end <= end:
                applied[d.grant_id] = applied.get(d.grant_id, Decimal(0)) + d.amount
        return applied


def credits_still_due(
    drawn_by_billed_usage: Iterable[Mapping[int, Decimal]], applied_before: Mapping[int, Decimal]
) -> dict[int, Decimal]:
    """Per grant, the credit an invoice applies: what the usage it bills *or earlier invoices billed*
    drew (one mapping per month of usage: the invoice's own and every earlier finalized one, late usage
    included) less what earlier invoices applied already. Late usage of a settled month thus gets its
    credit on the invoice that bills its adjustment line, and each draw is applied exactly once.

    Never negative: a grant's draws only grow as usage is added, so the difference is negative only
    when draws moved between months that are not all billed (a month before the first invoice getting
    usage after a later month was finalized); such a grant applies nothing. Grants with nothing omitted."""
    drawn: dict[int, Decimal] = {}
    for month in drawn_by_billed_usage:
        for grant_id, amount in month.items():
            drawn[grant_id] = drawn.get(grant_id, Decimal(0)) + amount
    due = {grant_id: amount - applied_before.get(grant_id, Decimal(0)) for grant_id, amount in drawn.items()}
    return {grant_id: amount for grant_id, amount in sorted(due.items()) if amount > 0}


def plain(amount: Decimal) -> str:
    """An exact amount without the trailing zeros NUMERIC(38, 12) reads back with: ``500``, ``0.25``."""
    return f"{amount.normalize():f}"


def cut_points(grants: Iterable[Grant], extra: Iterable[datetime] = ()) -> list[datetime]:
    """Every instant at which the set of open grants can change, and ``extra`` ones, sorted, distinct."""
    points = set(extra)
    for g in grants:
        points.add(g.starts_at)
        points.update(t for t in (g.expires_at, g.voided_at) if t is not None)
    return sorted(points)


def allocate(grants: Sequence[Grant], usage: Sequence[UsageSlice], now: datetime) -> Allocation:
    """Draw ``usage`` down from ``grants`` in the documented order; the state of each grant at ``now``.

    ``usage`` slices must not straddle a grant boundary (cut them at :func:`cut_points`): a slice
    that does is a ValueError, since which of its calls fell before the boundary is unknown."""
    ordered = sorted(grants, key=Grant.draw_key)
    boundaries = cut_points(ordered)
    left = {g.grant_id: g.amount for g in ordered}
    draws: list[Draw] = []
    uncovered = Decimal(0)
    for piece in sorted(usage, key=lambda u: u.start):
        if piece.cost < 0:
            raise ValueError(f"usage from {piece.start.isoformat()} is negative: {piece.cost}")
        after = bisect_right(boundaries, piece.start)  # the first boundary later than the slice's start
        if after < len(boundaries) and (piece.end is None or boundaries[after] < piece.end):
            raise ValueError(f"usage slice from {piece.start.isoformat()} straddles a grant boundary")
        due = piece.cost
        for g in ordered:
            if due == 0:
                break
            if left[g.grant_id] == 0 or not g.open_during(piece.start, piece.end):
                continue
            take = min(left[g.grant_id], due)
            left[g.grant_id] -= take
            due -= take
            draws.append(Draw(g.grant_id, piece.start, piece.end, take))
        uncovered += due
    states = [_state(g, g.amount - left[g.grant_id], left[g.grant_id], now) for g in ordered]
    return Allocation(
        grants=states,
        draws=draws,
        uncovered=uncovered,
        balance=sum((s.remaining for s in states if s.status in ("active", "used_up")), Decimal(0)),
        prepaid=any(g.voided_at is None for g in ordered),
        states={s.grant.grant_id: s for s in states},
    )


def _state(g: Grant, drawn: Decimal, left: Decimal, now: datetime) -> GrantState:
    ends = g.ends_at
    if ends is not None and ends <= now:
        voided = g.voided_at is not None and ends == g.voided_at
        status = "voided" if voided else "expired"
        return GrantState(g, drawn, Decimal(0), Decimal(0) if voided else left, left if voided else Decimal(0), status)
    if g.starts_at > now:
        return GrantState(g, drawn, left, Decimal(0), Decimal(0), "pending")
    return GrantState(g, drawn, left, Decimal(0), Decimal(0), "active" if left > 0 else "used_up")


def percent_left(state: GrantState) -> Decimal:
    return state.remaining * 100 / state.grant.amount


def alert_levels(state: GrantState) -> list[int]:
    """The balance alerts a grant has reached (:data:`ALERT_PERCENTS`): only while it is open — a grant
    that expired or was voided with credit left is not running low, and a pending one has not begun."""
    if state.status not in ("active", "used_up"):
        return []
    # remaining / amount <= p / 100, compared without dividing (no rounding at the context's 28 digits).
    remaining, amount = state.remaining, state.grant.amount
    return [p for p in ALERT_PERCENTS if (remaining * 100 <= p * amount if p else remaining == 0)]


# ---------------------------------------------------------------- validation of a new grant
def grant_amount(raw: object) -> Decimal:
    """An amount of credit from a decimal string or Decimal: finite, more than zero, at most
    :data:`MAX_GRANT`, at most 12 decimal places. ValueError says what is wrong."""
    if isinstance(raw, bool) or not isinstance(raw, str | Decimal | int):
        raise ValueError(f"the amount must be a decimal number of USD, got {type(raw).__name__}")
    shown = repr(str(raw)[:40])
    try:
        value = Decimal(raw.strip() if isinstance(raw, str) else raw)
    except InvalidOperation:
        raise ValueError(f"the amount {shown} is not a decimal number (write e.g. 500 or 12.50)") from None
    rules: tuple[tuple[Callable[[Decimal], bool], str], ...] = (  # in order: each assumes the ones before hold
        (lambda v: not v.is_finite() or v <= 0, f"must be a positive number of USD, got {shown}"),
        (lambda v: v > MAX_GRANT, f"must be at most {MAX_GRANT:,f} USD per grant, got {shown}"),
        (lambda v: v != v.quantize(_QUANTUM), f"has more than {MAX_DECIMAL_PLACES} decimal places"),
    )
    for broken, problem in rules:
        if broken(value):
            raise ValueError(f"the amount {problem}")
    return value


def check_grant(
    tenant_id: str, amount: Decimal, priority: int, starts_at: datetime, expires_at: datetime | None, note: str
) -> None:
    """ValueError for a grant that cannot be recorded."""
    check_tenant(tenant_id)
    grant_amount(amount)
    if type(priority) is not int or not 0 <= priority <= MAX_PRIORITY:
        raise ValueError(f"the priority must be a whole number from 0 to {MAX_PRIORITY:,}")
    if starts_at.tzinfo is None or (expires_at is not None and expires_at.tzinfo is None):
        raise ValueError("times need a time zone")
    if expires_at is not None and expires_at <= starts_at:
        raise ValueError(
            f"the grant would expire ({expires_at:%Y-%m-%d %H:%M}) before it starts ({starts_at:%Y-%m-%d %H:%M})"
        )
    check_note(note)


def check_note(note: str) -> None:
    """ValueError unless ``note`` is at most :data:`MAX_NOTE_LEN` printable characters."""
    if len(note) > MAX_NOTE_LEN:
        raise ValueError(f"the note must be at most {MAX_NOTE_LEN} characters")
    problem = printable_problem(note)
    if problem is not None:
        raise ValueError(f"note: {problem}")


def check_tenant(tenant_id: str) -> None:
    """ValueError unless ``tenant_id`` is a tenant id usage events could carry (the event's rule)."""
    if not isinstance(tenant_id, str) or not 0 < len(tenant_id) <= MAX_ID_LEN:
        raise ValueError(f"the tenant must be 1-{MAX_ID_LEN} characters")
    problem = printable_problem(tenant_id)
    if problem is not None:
        raise ValueError(f"tenant: {problem}")
