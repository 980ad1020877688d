"""Calendar periods in a tenant's time zone."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from schemas.periods import local_midnight, period_end, period_label, period_start, zone


def test_utc_periods_are_calendar_day_iso_week_and_month() -> None:
    at = datetime(2025, 7, 2, 15, 30, tzinfo=UTC)  # a Wednesday
    assert period_start("day", at) == datetime(2025, 7, 2, tzinfo=UTC)
    assert period_start("week", at) == datetime(2025, 6, 30, tzinfo=UTC)
    assert period_start("month", at) == datetime(2025, 7, 1, tzinfo=UTC)
    assert period_end("month", datetime(2025, 12, 1, tzinfo=UTC)) == datetime(2026, 1, 1, tzinfo=UTC)


def test_periods_start_at_the_tenants_midnight() -> None:
    at = datetime(2025, 10, 31, 23, 30, tzinfo=UTC)  # already 1 November in Berlin and Tokyo
    assert period_start("month", at, "Asia/Tokyo") == datetime(2025, 10, 31, 15, tzinfo=UTC)
    assert period_start("month", at, "Europe/Berlin") == datetime(2025, 10, 31, 23, tzinfo=UTC)
    assert period_start("month", at, "America/New_York") == datetime(2025, 10, 1, 4, tzinfo=UTC)
    assert period_label("month", period_start("month", at, "Asia/Tokyo"), "Asia/Tokyo") == "month:2025-11-01"
    assert period_label("day", at, "America/New_York") == "day:2025-10-31"


def test_a_local_day_lasts_23_or_25_hours_across_daylight_saving_changes() -> None:
    spring = local_midnight(date(2025, 3, 30), "Europe/Berlin")
    assert (period_end("day", spring, "Europe/Berlin") - spring).total_seconds() == 23 * 3600
    autumn = local_midnight(date(2025, 10, 26), "Europe/Berlin")
    assert (period_end("day", autumn, "Europe/Berlin") - autumn).total_seconds() == 25 * 3600
    week = period_start("week", autumn, "Europe/Berlin")
    assert (period_end("week", week, "Europe/Berlin") - week).total_seconds() == (7 * 24 + 1) * 3600


def test_unknown_zone_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        zone("Mars/Olympus")
