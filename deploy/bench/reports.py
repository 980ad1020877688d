"""How fast reports and invoices are with a large ledger (``tokenmeter bench --report-rows N``).

Fills a scratch database (``deploy.isolation.scratch_stores``) with N synthetic ledger rows spread
over 20 tenants, 8 models, 40 features, 3,000 users and 90 days, builds the rollups from them the
way a tenant's time-zone change does (``set_time_zone``), folds the rows into the report summaries as
the worker does (``summarize_pending``; the fill's inserts are queued like the sink's), then times the
month report across all tenants, one tenant's report and one invoice (median of 3 runs each).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import psycopg

from deploy.isolation import scratch_stores
from deploy.settings import Settings
from sinks.invoices import invoice
from sinks.postgres import ensure_partitions, set_time_zone
from sinks.reports import build_report, parse_period
from sinks.summaries import summarize_pending

TENANTS = 20
_FILL = """
INSERT INTO tokenmeter.ledger (event_id, ts, tenant_id, provider, model, user_id, feature, environment,
    session_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, latency_ms, price_status,
    input_cost, output_cost, total_cost, price_source)
SELECT 'bench-' || i, %(end)s::timestamptz - interval '1 second' * (i::bigint * 7776000 / %(rows)s),
       't' || (i %% {tenants}), (ARRAY['openai', 'anthropic', 'google', 'openai'])[1 + i %% 4],
       'model-' || (i %% 8), 'u' || (i %% 3000), 'feature-' || (i %% 40),
       (ARRAY['prod', 'staging', 'dev'])[1 + i %% 3], 's' || (i %% 50000),
       1000 + i %% 5000, 50 + i %% 900, i %% 700, 0, 200 + i %% 3000, 'priced',
       (1000 + i %% 5000) * 0.0000025, (50 + i %% 900) * 0.00001,
       (1000 + i %% 5000) * 0.0000025 + (50 + i %% 900) * 0.00001, 'bench'
FROM generate_series(%(first)s::int, %(last)s::int) AS i
"""


@dataclass(frozen=True)
class ReportBench:
    ledger_rows: int
    fill_s: float
    rollups_s: float
    summaries_s: float
    report_all_tenants_ms: float
    report_one_tenant_ms: float
    invoice_ms: float


def _median_ms(call: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def run_report_bench(settings: Settings, rows: int, say: Callable[[str], None]) -> ReportBench:
    end = datetime.now(UTC)
    with scratch_stores(settings) as scratch, psycopg.connect(scratch.database_url, autocommit=True) as conn:
        started = time.perf_counter()
        # The ledger is partitioned by UTC month: the 90 days filled below need theirs (the sink makes
        # them per batch; this fill inserts directly).
        days = (end - timedelta(days=n) for n in range(91))
        ensure_partitions(conn, {date(day.year, day.month, 1) for day in days})
        chunk = 200_000
        for first in range(0, rows, chunk):
            last = min(first + chunk, rows) - 1
            conn.execute(_FILL.format(tenants=TENANTS), {"end": end, "first": first, "last": last, "rows": rows})
            say(f"report bench: {last + 1:,} of {rows:,} ledger rows")
        conn.execute("ANALYZE tokenmeter.ledger")
        filled = time.perf_counter()
        for tenant in range(TENANTS):
            set_time_zone(conn, f"t{tenant}", "UTC")  # rebuilds the tenant's rollups from its ledger rows
        conn.execute("ANALYZE tokenmeter.rollups")
        rolled = time.perf_counter()
        say(f"report bench: rollups built in {rolled - filled:.1f} s; summarizing")
        while summarize_pending(conn):
            pass
        conn.execute("ANALYZE tokenmeter.report_conversations, tokenmeter.report_latency, tokenmeter.report_top_calls")
        summarized = time.perf_counter()
        say(f"report bench: summaries made in {summarized - rolled:.1f} s; timing reports")
        month = parse_period("month", end)
        return ReportBench(
            ledger_rows=rows,
            fill_s=round(filled - started, 1),
            rollups_s=round(rolled - filled, 1),
            summaries_s=round(summarized - rolled, 1),
            report_all_tenants_ms=_median_ms(lambda: build_report(conn, None, month, now=end)),
            report_one_tenant_ms=_median_ms(lambda: build_report(conn, "t3", month, now=end)),
            invoice_ms=_median_ms(lambda: invoice(conn, "t3", end.strftime("%Y-%m"))),
        )
