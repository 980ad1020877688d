"""Each anomaly rule fires on its pattern and stays quiet otherwise."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.records import Rollup
from streams.anomaly import (
    Window,
    cost_per_call_jump,
    daily_spend_spike,
    runaway_loop,
    spend_spike,
    user_spike,
)
from streams.app import anomaly_alerts, window_key

WEEK = [Window(Decimal("24"), 240)] * 7  # $1 an hour, $0.10 a call


def test_spend_spike() -> None:
    fired = spend_spike(Window(Decimal("3.5"), 30), WEEK)
    assert fired is not None and fired.ratio == Decimal("3.50") and fired.baseline == Decimal(1)
    assert spend_spike(Window(Decimal("2.5"), 30), WEEK) is None  # below 3x
    assert spend_spike(Window(Decimal("0.9"), 9), [Window(Decimal("0.24"), 3)] * 7) is None  # below the minimum
    assert spend_spike(Window(Decimal("50"), 500), [Window(Decimal(0), 0)] * 7) is None  # no history: no baseline


def test_daily_spend_spike() -> None:
    assert daily_spend_spike(Window(Decimal("80"), 800), WEEK) is not None
    assert daily_spend_spike(Window(Decimal("60"), 600), WEEK) is None


def test_cost_per_call_jump() -> None:
    fired = cost_per_call_jump(Window(Decimal("12"), 25), WEEK)  # $0.48 a call vs $0.10
    assert fired is not None and fired.ratio == Decimal("4.80")
    assert cost_per_call_jump(Window(Decimal("6"), 25), WEEK) is None  # 2.4x
    assert cost_per_call_jump(Window(Decimal("12"), 5), WEEK) is None  # too few calls


def test_user_spike() -> None:
    assert user_spike(Window(Decimal("3.1"), 10), WEEK) is not None  # +210%
    assert user_spike(Window(Decimal("2.9"), 10), WEEK) is None  # +190%


def test_runaway_loop() -> None:
    assert runaway_loop(120, Decimal(2)) is not None
    assert runaway_loop(15, Decimal(1)) is None  # under the minimum volume
    assert runaway_loop(40, Decimal(5)) is None  # 8x a typical conversation


def test_anomaly_alerts_read_history_from_the_table() -> None:
    hour = datetime(2025, 7, 20, 15, tzinfo=UTC)
    table: dict[str, dict[str, Any]] = {}
    for back in range(1, 8):
        day = datetime(2025, 7, 20, tzinfo=UTC) - timedelta(days=back)
        table[window_key("acme", "day", day, "tenant", "")] = {"cost": "24", "calls": 240}
    spike = Rollup("acme", "hour", hour, "tenant", "", 40, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal("4"))
    calm = Rollup("acme", "hour", hour, "tenant", "", 20, 0, 1, 1, 0, 0, Decimal(0), Decimal(0), Decimal("1.5"))
    (alert,) = anomaly_alerts([spike], table.get, hour)
    assert alert.kind == "anomaly.spend_spike" and alert.baseline == Decimal(1) and alert.current == 4
    assert alert.alert_id.endswith(hour.isoformat())  # once per scope and hour
    assert anomaly_alerts([calm], table.get, hour) == []


def test_a_runaway_conversation_is_found_among_normal_ones() -> None:
    from schemas.events import validate_event
    from streams.anomaly import ConversationRates
    from streams.meter import runaway_alerts

    at = datetime(2025, 7, 20, 15, 4, 10, tzinfo=UTC)

    def call(i: int, session: str | None) -> Any:
        fields = {
            "event_id": f"e{i}",
            "timestamp": at,
            "tenant_id": "acme",
            "provider": "openai",
            "model": "gpt-4o",
            "input_tokens": 10,
            "output_tokens": 1,
            "session_id": session,
        }
        return validate_event(fields)

    normal = [call(i, f"s{i % 40}") for i in range(80)] + [call(1000 + i, None) for i in range(50)]
    rates = ConversationRates()
    assert runaway_alerts(rates, normal, at) == []
    loop = [call(2000 + i, "agent-7") for i in range(100)]
    (alert,) = runaway_alerts(rates, loop, at)
    assert alert.kind == "anomaly.runaway_loop" and alert.scope == {"conversation": "agent-7"}
    assert alert.current == 100 and alert.baseline == 2
    assert runaway_alerts(rates, [], at) == []


def test_a_batch_spanning_months_of_sessions_is_counted_without_error() -> None:
    """A backfill: sessions spread over three months in one batch (this raised KeyError and looped stage 1)."""
    from streams.anomaly import ConversationRates

    start = int(datetime(2025, 4, 1, tzinfo=UTC).timestamp()) // 60
    calls = [("acme", f"s{i % 7}", start + i * 1_300) for i in range(100)]  # ~90 days, one call each ~22 h
    calls += [("acme", "agent-7", start + 99 * 1_300)] * 60  # a loop in the newest minute
    rates = ConversationRates(keep_minutes=10)
    findings = rates.observe(calls)
    assert [(tenant, conversation) for tenant, conversation, _minute, _finding in findings] == [("acme", "agent-7")]
    assert all(minute >= start + 99 * 1_300 - 10 for _t, _c, minute in rates.counted())  # old minutes dropped
    assert rates.observe(list(reversed(calls))) != []  # same batch again, newest first: still no error


def test_days_without_calls_are_missing_history_not_quiet_days() -> None:
    """A tenant's second day: one day of history, six empty ones. $2 in an hour after a $24 day is 2×
    its hourly average, not 14× (averaging the empty days in made every new tenant spike)."""
    history = [Window(Decimal(24), 100)] + [Window(Decimal(0), 0)] * 6
    assert spend_spike(Window(Decimal(2), 10), history) is None
    assert spend_spike(Window(Decimal(3), 10), history) is not None  # 3× the average hour of the day it had
    assert daily_spend_spike(Window(Decimal(30), 10), history) is None
    assert daily_spend_spike(Window(Decimal(80), 10), history) is not None


class _ScanningRates:
    """The straightforward ConversationRates (every count scanned and sorted per batch): the reference
    the incremental one must agree with."""

    def __init__(self, keep_minutes: int, max_counts: int) -> None:
        self.keep_minutes, self.max_counts = keep_minutes, max_counts
        self.counts: dict[tuple[str, str, int], int] = {}

    def observe(self, calls: list[tuple[str, str | None, int]]) -> list[tuple[str, str, int, Any]]:
        from streams.anomaly import runaway_loop

        touched = set()
        for tenant, conversation, minute in calls:
            if conversation is not None:
                key = (tenant, conversation, minute)
                self.counts[key] = self.counts.get(key, 0) + 1
                touched.add(key)
        if not touched:
            return []
        oldest_kept = max(m for _, _, m in touched) - self.keep_minutes
        self.counts = {k: n for k, n in self.counts.items() if k[2] >= oldest_kept}
        if len(self.counts) > self.max_counts:
            for key in sorted(self.counts, key=lambda k: k[2])[: len(self.counts) - self.max_counts]:
                del self.counts[key]
        recent = [k for k in touched if k in self.counts]
        recent_set = set(recent)
        others = sorted(n for k, n in self.counts.items() if k not in recent_set)
        typical = Decimal(others[len(others) // 2]) if others else Decimal(1)
        found = [(k, runaway_loop(self.counts[k], typical)) for k in sorted(recent)]
        return [(k[0], k[1], k[2], f) for k, f in found if f is not None]


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["acme", "globex"]),
                st.one_of(st.none(), st.sampled_from([f"s{i}" for i in range(6)])),
                st.integers(0, 40),
            ),
            max_size=120,
        ),
        max_size=8,
    ),
    keep_minutes=st.integers(0, 12),
    max_counts=st.integers(1, 30),
    loops=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 40), st.integers(30, 200)), max_size=3),
)
def test_incremental_conversation_rates_agree_with_scanning_every_count(
    batches: list[list[tuple[str, str | None, int]]],
    keep_minutes: int,
    max_counts: int,
    loops: list[tuple[int, int, int]],
) -> None:
    from streams.anomaly import ConversationRates

    for batch_no, minute, calls in loops:  # some conversations that do run away
        if batch_no < len(batches):
            batches[batch_no] = batches[batch_no] + [("acme", "loop", minute)] * calls
    incremental = ConversationRates(keep_minutes=keep_minutes, max_counts=max_counts)
    reference = _ScanningRates(keep_minutes, max_counts)
    for batch in batches:
        assert incremental.observe(batch) == reference.observe(batch)
        assert sorted(incremental.counted()) == sorted(reference.counts)


def test_report_folding_defers_to_a_stage_one_with_more_than_a_batch_to_do_for_at_most_the_deferral() -> None:
    from streams.app import SUMMARY_MAX_DEFERRAL_S, defer_summaries

    assert defer_summaries(10_001, 10_000, 0.0)
    assert not defer_summaries(10_000, 10_000, 0.0)  # a batch or less: folding goes on
    assert defer_summaries(500_000, 10_000, SUMMARY_MAX_DEFERRAL_S - 1)
    assert not defer_summaries(500_000, 10_000, SUMMARY_MAX_DEFERRAL_S)  # waited long enough: fold anyway
