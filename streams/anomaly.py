"""Anomaly rules: pure functions over windowed aggregates, each with a minimum volume so that a
quiet scope does not flap. Stage 2 (``streams/app.py``) feeds them from its ``rollups`` table and
fires each finding once per scope and hour (the alert id holds both).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

HOURS_PER_DAY = 24


@dataclass(frozen=True)
class Window:
    cost: Decimal
    calls: int


@dataclass(frozen=True)
class Finding:
    rule: str
    current: Decimal
    baseline: Decimal
    ratio: Decimal
    message: str


def _ratio(current: Decimal, baseline: Decimal) -> Decimal:
    return (current / baseline).quantize(Decimal("0.01")) if baseline else Decimal(0)


def hourly_baseline(days: Sequence[Window]) -> Decimal:
    """The average hourly spend over the given (previous) days."""
    return sum((d.cost for d in days), Decimal(0)) / (HOURS_PER_DAY * len(days)) if days else Decimal(0)


def spend_spike(
    this_hour: Window,
    previous_days: Sequence[Window],
    factor: Decimal = Decimal(3),
    min_cost: Decimal = Decimal(1),
    min_history_days: int = 1,
) -> Finding | None:
    """Spend in the current hour at least ``factor`` × the average hour of the previous days."""
    history = [d for d in previous_days if d.calls]
    if len(history) < min_history_days or this_hour.cost < min_cost:
        return None
    # Days without calls are missing history (a new tenant, windows expired), not quiet days: averaging
    # them in would make a tenant's second day look like a spike.
    baseline = hourly_baseline(history)
    if not baseline or this_hour.cost < factor * baseline:
        return None
    ratio = _ratio(this_hour.cost, baseline)
    message = f"spent ${this_hour.cost:.2f} this hour, {ratio}× the 7-day hourly average of ${baseline:.2f}"
    return Finding("spend_spike", this_hour.cost, baseline, ratio, message)


def daily_spend_spike(
    today: Window, previous_days: Sequence[Window], factor: Decimal = Decimal(3), min_cost: Decimal = Decimal(5)
) -> Finding | None:
    """Spend today at least ``factor`` × the average of the previous days."""
    history = [d for d in previous_days if d.calls]
    if not history or today.cost < min_cost:
        return None
    baseline = sum((d.cost for d in history), Decimal(0)) / len(history)  # days with calls: see spend_spike
    if not baseline or today.cost < factor * baseline:
        return None
    ratio = _ratio(today.cost, baseline)
    return Finding(
        "daily_spend_spike",
        today.cost,
        baseline,
        ratio,
        f"spent ${today.cost:.2f} today, {ratio}× the 7-day daily average of ${baseline:.2f}",
    )


def cost_per_call_jump(
    this_hour: Window, previous_days: Sequence[Window], factor: Decimal = Decimal(4), min_calls: int = 20
) -> Finding | None:
    """A feature's average cost per call this hour at least ``factor`` × its 7-day average."""
    calls = sum(d.calls for d in previous_days)
    if this_hour.calls < min_calls or calls < min_calls:
        return None
    baseline = sum((d.cost for d in previous_days), Decimal(0)) / calls
    current = this_hour.cost / this_hour.calls
    if not baseline or current < factor * baseline:
        return None
    ratio = _ratio(current, baseline)
    message = f"average cost per call ${current:.5f} this hour, {ratio}× the 7-day average ${baseline:.5f}"
    return Finding("cost_per_call_jump", current, baseline, ratio, message)


def user_spike(
    this_hour: Window,
    previous_days: Sequence[Window],
    increase_percent: Decimal = Decimal(200),
    min_cost: Decimal = Decimal("0.5"),
) -> Finding | None:
    """A user's spend this hour above their hourly baseline by at least ``increase_percent``."""
    finding = spend_spike(this_hour, previous_days, factor=1 + increase_percent / 100, min_cost=min_cost)
    if finding is None:
        return None
    return Finding("user_spike", finding.current, finding.baseline, finding.ratio, finding.message)


def runaway_loop(
    calls_this_minute: int, typical_per_minute: Decimal, factor: Decimal = Decimal(10), min_calls: int = 30
) -> Finding | None:
    """One trace or session calling far above the norm of a conversation (calls per minute)."""
    if calls_this_minute < min_calls or calls_this_minute < factor * max(typical_per_minute, Decimal(1)):
        return None
    ratio = _ratio(Decimal(calls_this_minute), max(typical_per_minute, Decimal(1)))
    return Finding(
        "runaway_loop",
        Decimal(calls_this_minute),
        typical_per_minute,
        ratio,
        f"{calls_this_minute} calls in one minute, {ratio}× a typical conversation",
    )


class ConversationRates:
    """Calls per minute of each conversation (session, else trace) over the last few minutes, bounded:
    minutes older than ``keep_minutes`` are dropped, so state is (active conversations × minutes).

    Kept per minute, with a histogram of the counts, so a batch costs what it touches: dropping a minute
    and finding the median conversation no longer scan (and sort) every count held, which took stage 1
    tens of milliseconds per batch once a few minutes of traffic were held."""

    def __init__(self, keep_minutes: int = 10, max_counts: int = 200_000) -> None:
        self.keep_minutes = keep_minutes
        self.max_counts = max_counts  # bounded whatever the number of conversations: oldest minutes go first
        self._minutes: dict[int, dict[tuple[str, str], int]] = {}
        self._histogram: collections.Counter[int] = collections.Counter()  # count -> conversation-minutes
        self._size = 0

    def counted(self) -> list[tuple[str, str, int]]:
        """The (tenant, conversation, minute) counts held."""
        return [(t, c, minute) for minute, counts in self._minutes.items() for t, c in counts]

    def observe(self, calls: Sequence[tuple[str, str | None, int]]) -> list[tuple[str, str, int, Finding]]:
        """Count (tenant, conversation, epoch minute) calls; return (tenant, conversation, minute,
        finding) for conversations running away in a minute of this batch."""
        touched: set[tuple[str, str, int]] = set()
        histogram = self._histogram
        # Counted per conversation-minute first (in C): the state below is then touched once per key, not per call.
        for (tenant, conversation, minute), calls_in_batch in collections.Counter(calls).items():
            if conversation is None:
                continue
            counts = self._minutes.get(minute)
            if counts is None:
                counts = self._minutes[minute] = {}
            key = (tenant, conversation)
            before = counts.get(key, 0)
            counts[key] = before + calls_in_batch
            if before:
                histogram[before] -= 1
            else:
                self._size += 1
            histogram[before + calls_in_batch] += 1
            touched.add((tenant, conversation, minute))
        if not touched:
            return []
        # A batch may span months (a backfill): minutes older than the window are counted, then dropped
        # with the rest of the old state, and never judged (they describe a past nobody can stop now).
        oldest_kept = max(minute for _, _, minute in touched) - self.keep_minutes
        for minute in [m for m in self._minutes if m < oldest_kept]:
            self._forget(self._minutes.pop(minute).values())
        if self._size > self.max_counts:
            self._evict_oldest(self._size - self.max_counts)
        recent = [key for key in touched if key[2] >= oldest_kept and (key[0], key[1]) in self._minutes.get(key[2], ())]
        typical = self._median_without([self._minutes[m][(t, c)] for t, c, m in recent])
        findings = []
        for tenant, conversation, minute in sorted(recent):
            finding = runaway_loop(self._minutes[minute][(tenant, conversation)], typical)
            if finding is not None:
                findings.append((tenant, conversation, minute, finding))
        return findings

    def _forget(self, counts: Iterable[int]) -> None:
        for n in counts:
            self._histogram[n] -= 1
            self._size -= 1

    def _evict_oldest(self, excess: int) -> None:
        """Drop ``excess`` counts, oldest minute first (within a minute, the first counted first)."""
        for minute in sorted(self._minutes):
            counts = self._minutes[minute]
            if len(counts) <= excess:
                excess -= len(counts)
                self._forget(self._minutes.pop(minute).values())
            else:
                for key in list(counts)[:excess]:
                    self._forget((counts.pop(key),))
                excess = 0
            if not excess:
                return

    def _median_without(self, excluded: Sequence[int]) -> Decimal:
        """The (upper) median count of the conversation-minutes held, ``excluded`` counts left out; 1 if none."""
        remaining = self._histogram.copy()
        remaining.subtract(excluded)
        total = self._size - len(excluded)
        if total <= 0:
            return Decimal(1)
        position = total // 2
        for count in sorted(n for n, held in remaining.items() if held > 0):
            position -= remaining[count]
            if position < 0:
                return Decimal(count)
        raise AssertionError("histogram and size disagree")  # pragma: no cover
