"""Calendar periods (day, ISO week from Monday, month) in a tenant's time zone, UTC by default.

Budgets reset, invoices close and reports group at the tenant's own midnight: Postgres truncates
each event's timestamp in the tenant's zone (``date_trunc(…, ts, zone)``), and these functions give
the same boundaries in Python. Every instant returned is UTC-aware; the labels are the local date
the period starts on (``month:2026-11-01`` is November in the tenant's zone).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("day", "week", "month")


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` (e.g. ``Europe/Berlin``); ValueError for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name such as Europe/Berlin or UTC)") from exc


def local_midnight(day: date, time_zone: str = "UTC") -> datetime:
    """The instant ``day`` begins in ``time_zone`` (as Postgres' ``date_trunc`` places it), in UTC."""
    return datetime(day.year, day.month, day.day, tzinfo=zone(time_zone)).astimezone(UTC)


def _first_day(period: str, day: date) -> date:
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown period {period!r}")


def _next_first_day(period: str, first: date) -> date:
    if period == "day":
        return first + timedelta(days=1)
    if period == "week":
        return first + timedelta(days=7)
    return (first + timedelta(days=32)).replace(day=1)


def period_start(period: str, at: datetime, time_zone: str = "UTC") -> datetime:
    """Start of the day, week or month containing ``at`` in ``time_zone``."""
    return local_midnight(_first_day(period, at.astimezone(zone(time_zone)).date()), time_zone)


@lru_cache(maxsize=4096)  # the sinks ask for the same few windows thousands of times per batch
def period_end(period: str, start: datetime, time_zone: str = "UTC") -> datetime:
    """End (exclusive) of the period that begins at ``start``; a local day may last 23 or 25 hours."""
    first = _first_day(period, start.astimezone(zone(time_zone)).date())
    return local_midnight(_next_first_day(period, first), time_zone)


def local_date(at: datetime, time_zone: str = "UTC") -> date:
    return at.astimezone(zone(time_zone)).date()


def period_label(period: str, start: datetime, time_zone: str = "UTC") -> str:
    """``month:2026-11-01``: the period and the local date it starts on."""
    return f"{period}:{local_date(start, time_zone).isoformat()}"
