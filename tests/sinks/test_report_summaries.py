"""Report summaries (migration 0016, ``sinks/summaries.py``) against the real Postgres: a month report read
from the summaries equals the same sections computed here from the events themselves, whether the
summaries are caught up, half way or not started, with duplicates, month edges, missing latencies and
concurrent summarizers."""

from __future__ import annotations

import math
import random
import threading
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent
from sinks import summaries
from sinks.postgres import write_batch
from sinks.reports import build_report, parse_period
from sinks.summaries import TOP_CALLS_KEPT, pending_batches, summarize_pending
from streams.pricing import PriceBook

MONTHS = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC))
SECTIONS = ("top_requests", "top_conversations", "latency_by_model", "by_service_tier", "by_processing")
MODELS = [("openai", "gpt-4o"), ("anthropic", "claude-sonnet-4-5"), ("google", "gemini-2.5-flash"), ("acme", "nope-1")]


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def events(tenants: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        month = rng.choice(MONTHS)
        # Month edges: the first and last microsecond of a month, else anywhere in its first 28 days.
        moment = rng.choice(
            [
                month,
                month + timedelta(days=rng.randrange(28), seconds=rng.randrange(86400)),
                month - timedelta(microseconds=1),
            ]
        )
        provider, model = rng.choice(MODELS)
        out.append(
            {
                "event_id": f"sum-{seed}-{i}",
                "timestamp": moment,
                "tenant_id": rng.choice(tenants),
                "provider": provider,
                "model": model,
                "input_tokens": rng.choice([0, 1, 900, 20_000, 3_000_000]),
                "output_tokens": rng.randrange(0, 5000),
                "session_id": rng.choice([None, "s1", "s2", "s3", "conversation: 'quoted' ☃"]),
                "trace_id": rng.choice([None, "t1", "t2"]),
                "latency_ms": rng.choice([None, 0, 1, 250, 251, 10_000, rng.randrange(1, 60_000)]),
                "service_tier": rng.choice([None, "flex", "priority"]),
                "processing": rng.choice([None, "batch"]),
            }
        )
    return out


def priced(raw: list[dict[str, Any]]) -> list[PricedEvent]:
    book = PriceBook()
    items = []
    for fields in raw:
        event = validate_event({k: v for k, v in fields.items() if v is not None})
        items.append(PricedEvent(event, book.price(event)))
    return items


def expected(items: list[PricedEvent], tenant: str, start: datetime, end: datetime, top: int) -> dict[str, Any]:
    """The sections as the report defines them, computed from the first item of each event id."""
    first: dict[str, PricedEvent] = {}
    for item in items:
        first.setdefault(item.event.event_id, item)
    calls = [i for i in first.values() if i.event.tenant_id == tenant and start <= i.event.timestamp < end]
    ranked = sorted(calls, key=lambda i: (-i.price.total_cost, i.event.event_id))[:top]
    conversations: dict[str, list[PricedEvent]] = defaultdict(list)
    latencies: dict[str, list[int]] = defaultdict(list)
    tiers: dict[str, Decimal] = defaultdict(Decimal)
    processing: dict[str, Decimal] = defaultdict(Decimal)
    for i in calls:
        e = i.event
        if e.session_id or e.trace_id:
            conversations[e.session_id or e.trace_id or ""].append(i)
        if e.latency_ms is not None:
            latencies[f"{e.provider}/{e.model}"].append(e.latency_ms)
        tiers[e.service_tier or "(none)"] += i.price.total_cost
        processing[e.processing or "(none)"] += i.price.total_cost

    def disc(values: list[int], fraction: float) -> int:  # percentile_disc: position ceil(fraction × n)
        ordered = sorted(values)
        return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]

    conversation_rows = sorted(
        (
            (sum((i.price.total_cost for i in group), Decimal(0)), name, len(group))
            for name, group in conversations.items()
        ),
        key=lambda row: (-row[0], row[1]),
    )[:top]
    return {
        "top_requests": [i.event.event_id for i in ranked],
        "top_conversations": [(name, n, cost) for cost, name, n in conversation_rows],
        "latency_by_model": {
            model: (len(values), disc(values, 0.5), disc(values, 0.95)) for model, values in latencies.items()
        },
        "by_service_tier": {name: cost for name, cost in tiers.items()},
        "by_processing": {name: cost for name, cost in processing.items()},
    }


def observed(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "top_requests": [r["event_id"] for r in report["top_requests"]],
        "top_conversations": [(r["conversation"], r["calls"], Decimal(r["cost"])) for r in report["top_conversations"]],
        "latency_by_model": {r["model"]: (r["calls"], r["p50_ms"], r["p95_ms"]) for r in report["latency_by_model"]},
        "by_service_tier": {r["name"]: Decimal(r["cost"]) for r in report["by_service_tier"]},
        "by_processing": {r["name"]: Decimal(r["cost"]) for r in report["by_processing"]},
    }


def check_reports(conn: psycopg.Connection, items: list[PricedEvent], tenants: list[str], top: int = 10) -> None:
    for tenant in tenants:
        for label, (start, end) in {
            "2024-02": (MONTHS[1], MONTHS[2]),
            "2024-01-01..2024-03-31": (MONTHS[0], MONTHS[2] + timedelta(days=31)),
        }.items():
            period = parse_period(label)
            assert (period.start, period.end) == (start, end)
            report = build_report(conn, tenant, period, top=top, now=MONTHS[2])
            want = expected(items, tenant, start, end, top)
            got = observed(report)
            # Ties in cost may order conversations either way in neither path: compare what is determined.
            assert got["top_requests"] == want["top_requests"], (tenant, label)
            assert got["top_conversations"] == want["top_conversations"], (tenant, label)
            assert got["latency_by_model"] == want["latency_by_model"], (tenant, label)
            assert got["by_service_tier"] == want["by_service_tier"], (tenant, label)
            assert got["by_processing"] == want["by_processing"], (tenant, label)


def test_month_reports_from_summaries_equal_the_events_at_every_stage(conn: psycopg.Connection, unique: str) -> None:
    tenants = [f"sum-a-{unique}", f"sum-b-{unique}", f"sum:{{c}}-{unique}"]
    raw = events(tenants, 900, seed=1)
    raw += [dict(r, latency_ms=7, timestamp=r["timestamp"] + timedelta(days=40)) for r in raw[:50]]  # duplicates
    items = priced(raw)
    assert summaries.whole_months(MONTHS[1], MONTHS[2]) is not None
    for chunk in range(0, len(items), 100):  # ten batches, each a transaction of the sink
        write_batch(conn, items[chunk : chunk + 100])
    check_reports(conn, items, tenants)  # nothing summarized: the queued batches' rows from the ledger
    # A batch summarized between the report's read of the queue and a section's statement counts once.
    feb = parse_period("2024-02")
    window = {"start": feb.start, "end": feb.end, "top": 10, "tenant": tenants[0]}
    read_before = summaries.source(conn, feb.start, feb.end, 10)
    assert read_before is not None and read_before.batches
    summarize_pending(conn, max_batches=4)
    rows = summaries.top_conversations(conn, "AND tenant_id = %(tenant)s", window, read_before)
    want = expected(items, tenants[0], feb.start, feb.end, 10)["top_conversations"]
    assert [(r[1], r[2], r[3]) for r in rows] == want
    summarize_pending(conn, max_batches=3)
    check_reports(conn, items, tenants)  # some summarized, some not
    while summarize_pending(conn):
        pass
    check_reports(conn, items, tenants)  # all summarized
    check_reports(conn, items, tenants, top=TOP_CALLS_KEPT)
    check_reports(conn, items, tenants, top=TOP_CALLS_KEPT + 50)  # more than kept: the ledger answers


def test_other_periods_and_all_tenants_agree_with_the_ledger(
    conn: psycopg.Connection, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenants = [f"sum-d-{unique}"]
    items = priced(events(tenants, 300, seed=2))
    write_batch(conn, items[:150])
    while summarize_pending(conn):
        pass
    write_batch(conn, items[150:])  # queued, not summarized
    period = parse_period("2024-02")
    from_summaries = build_report(conn, None, period, top=20, now=MONTHS[2])
    monkeypatch.setattr(summaries, "whole_months", lambda start, end: None)  # the ledger path
    from_ledger = build_report(conn, None, period, top=20, now=MONTHS[2])
    for section in SECTIONS:
        assert from_summaries[section] == from_ledger[section], section
    # A week is not whole months: the ledger path, still equal to the events.
    week = parse_period("2024-02-05..2024-02-11")
    report = build_report(conn, tenants[0], week, top=10, now=MONTHS[2])
    assert observed(report) == expected(items, tenants[0], week.start, week.end, 10)


def test_concurrent_summarizers_count_each_batch_once(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    tenants = [f"sum-e-{unique}"]
    items = priced(events(tenants, 600, seed=3))
    for chunk in range(0, len(items), 20):
        write_batch(conn, items[chunk : chunk + 20])
    errors: list[BaseException] = []

    def summarize() -> None:
        try:
            with psycopg.connect(settings.database_url, autocommit=True) as own:
                while summarize_pending(own, max_batches=7):
                    pass
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=summarize) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    rows = conn.execute(
        "SELECT sum(calls), sum(cost) FROM tokenmeter.report_price_context WHERE tenant_id = %s", (tenants[0],)
    ).fetchone()
    distinct = {i.event.event_id: i for i in items}.values()
    assert rows == (len(distinct), sum((i.price.total_cost for i in distinct), Decimal(0)))
    check_reports(conn, items, tenants)


def test_rows_from_before_the_migration_are_summarized_by_it(conn: psycopg.Connection, unique: str) -> None:
    """Rows with no batch id (written before migration 0016) are what the migration summarizes, with the
    same function the worker uses."""
    tenants = [f"sum-f-{unique}"]
    items = priced(events(tenants, 120, seed=4))
    write_batch(conn, items)
    with conn.transaction():
        conn.execute(
            "DELETE FROM tokenmeter.report_queue WHERE batch_id IN"
            " (SELECT batch_id FROM tokenmeter.ledger WHERE tenant_id = %s)",
            (tenants[0],),
        )
        conn.execute("UPDATE tokenmeter.ledger SET batch_id = NULL WHERE tenant_id = %s", (tenants[0],))
        for month in MONTHS:
            conn.execute("SELECT tokenmeter.summarize_rows(%s, NULL, 100)", (month.date(),))
        # Another id, so a later run of this test (same database) does not summarize these rows again.
        conn.execute("UPDATE tokenmeter.ledger SET batch_id = 0 WHERE tenant_id = %s", (tenants[0],))
    check_reports(conn, items, tenants)


def test_pending_batches_counts_the_queue(conn: psycopg.Connection, unique: str) -> None:
    while summarize_pending(conn):
        pass
    assert pending_batches(conn) == 0
    items = priced(events([f"sum-g-{unique}"], 30, seed=5))
    write_batch(conn, items[:10])
    write_batch(conn, items[10:])
    months = {(i.event.timestamp.year, i.event.timestamp.month) for i in items[:10]}
    later = {(i.event.timestamp.year, i.event.timestamp.month) for i in items[10:]}
    assert pending_batches(conn) == len(months) + len(later)  # a (batch, month) per month of each batch
    assert summarize_pending(conn) == len(months) + len(later)
    assert pending_batches(conn) == 0


def test_the_kept_top_calls_match_the_migration() -> None:
    from pathlib import Path

    sql = (Path(summaries.__file__).parent / "migrations" / "0016_report_summaries.sql").read_text()
    assert f"summarize_rows(m.first, NULL, {TOP_CALLS_KEPT})" in sql


def test_the_workers_summarizer_empties_the_queue_in_one_run(
    conn: psycopg.Connection, settings: Settings, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage-2 job (``streams.app.ReportSummarizer``) folds every queued batch in one run, however many
    calls of ``summarize_pending`` that takes (a backlog after an outage)."""
    from streams.app import ReportSummarizer

    tenants = [f"sum-h-{unique}"]
    items = priced(events(tenants, 400, seed=6))
    for chunk in range(0, len(items), 10):
        write_batch(conn, items[chunk : chunk + 10])
    queued = pending_batches(conn)
    assert queued >= 40
    monkeypatch.setattr("streams.app.SUMMARY_CHUNK_BATCHES", 7)
    assert ReportSummarizer(settings).run() == queued
    assert pending_batches(conn) == 0
    check_reports(conn, items, tenants)


def test_the_summarizer_leaves_postgres_to_a_busy_stage_one_for_a_while_not_for_good(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    """A burst or a backlog: stage 1 has more than a batch to do, so folding waits (reports stay exact: they
    read unfolded batches from the ledger); past SUMMARY_MAX_DEFERRAL_S since the queue was last empty it
    folds anyway."""
    from streams.app import SUMMARY_MAX_DEFERRAL_S, ReportSummarizer

    tenants = [f"sum-d-{unique}"]
    items = priced(events(tenants, 60, seed=8))
    for chunk in range(0, len(items), 20):
        write_batch(conn, items[chunk : chunk + 20])
    behind = [settings.worker_batch_size + 1]
    summarizer = ReportSummarizer(settings, lambda: behind[0])
    queued = pending_batches(conn)
    assert queued >= 3
    assert summarizer.run() == 0 and pending_batches(conn) >= queued  # (other tests may queue more)
    check_reports(conn, items, tenants)  # exact while waiting
    summarizer._drained -= SUMMARY_MAX_DEFERRAL_S + 1  # busy for longer than the deferral
    assert summarizer.run() >= queued and pending_batches(conn) == 0
    behind[0] = settings.worker_batch_size  # a batch or less waiting: not busy
    write_batch(conn, priced(events(tenants, 5, seed=9)))
    assert summarizer.run() >= 1 and pending_batches(conn) == 0
