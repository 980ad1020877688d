"""Cost reports from the Postgres metering tables: the four questions of DESIGN.md §6.

1. totals (the period, today, this week, this month) and ``trend_7d``;
2. ``by_provider`` and ``by_model``;
3. ``by_feature`` and ``by_environment``;
4. ``by_user``, ``avg_cost_per_call``, ``top_requests`` and ``top_conversations``; ``latency_by_model``;
and spend by price context: ``by_service_tier`` and ``by_processing`` (batch or not); and by the levels of a
budget hierarchy: ``by_team`` and ``by_api_key`` (calls without a team or key are not listed there).

Breakdowns and trends read the day rollups (a few rows per tenant and day, however many calls). The
top requests, conversations, latencies and price contexts of whole UTC months read the month summaries
(``sinks/summaries.py``), exactly; of other periods, the ledger, through its (tenant, ts) and ts indexes.
Money stays Decimal and is emitted as decimal strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg

from schemas.periods import local_date, local_midnight, period_end, period_start
from schemas.records import money
from sinks import summaries

BREAKDOWNS = {"by_model": "model", "by_feature": "feature", "by_environment": "environment", "by_user": "user"}
# Budget hierarchies: spend per team and per API key id (only calls that carry one have rows there).
BREAKDOWNS |= {"by_team": "team", "by_api_key": "api_key"}


@dataclass(frozen=True)
class Period:
    label: str
    start: datetime  # inclusive, local midnight (as a UTC instant)
    end: datetime  # exclusive
    time_zone: str = "UTC"


def parse_period(text: str, now: datetime | None = None, time_zone: str = "UTC") -> Period:
    """``today``, ``week`` (ISO, this week), ``month`` (this month), ``YYYY-MM``, or ``YYYY-MM-DD..YYYY-MM-DD``
    (inclusive days), as calendar periods in ``time_zone`` (a tenant's; UTC across tenants)."""
    now = now or datetime.now(UTC)
    named = {"today": "day", "day": "day", "week": "week", "this-week": "week", "month": "month", "this-month": "month"}
    if text in named:
        kind = named[text]
        start = period_start(kind, now, time_zone)
        first = local_date(start, time_zone)
        label = {"day": f"today ({first})", "week": f"week of {first}", "month": first.strftime("%Y-%m")}[kind]
        return Period(label, start, period_end(kind, start, time_zone), time_zone)
    if re.fullmatch(r"\d{4}-\d{2}", text):
        start = local_midnight(datetime.strptime(text, "%Y-%m").date(), time_zone)
        return Period(text, start, period_end("month", start, time_zone), time_zone)
    found = re.fullmatch(r"(\d{4}-\d{2}-\d{2})\.\.(\d{4}-\d{2}-\d{2})", text)
    if found:
        first_day, last_day = (date.fromisoformat(part) for part in found.groups())
        if last_day < first_day:
            raise ValueError("the range ends before it starts")
        end = local_midnight(last_day + timedelta(days=1), time_zone)
        return Period(text, local_midnight(first_day, time_zone), end, time_zone)
    raise ValueError("period must be today, week, month, YYYY-MM or YYYY-MM-DD..YYYY-MM-DD")


def _money(value: Decimal | None) -> str:
    return f"{(value or Decimal(0)).normalize():f}" if value else "0"


def _average(cost: Decimal, calls: int) -> str:
    """A per-call average, to the ledger's 12 places (a display figure, not billed)."""
    return _money(money(cost / calls)) if calls else "0"


def _tenant_filter(tenant_id: str | None) -> tuple[str, dict[str, Any]]:
    return ("AND tenant_id = %(tenant)s", {"tenant": tenant_id}) if tenant_id else ("", {})


def _spend(conn: psycopg.Connection, tenant_id: str | None, start: datetime, end: datetime) -> tuple[Decimal, int, int]:
    where, params = _tenant_filter(tenant_id)
    row = conn.execute(
        "SELECT coalesce(sum(cost), 0), coalesce(sum(calls), 0), coalesce(sum(unpriced_calls), 0)"
        " FROM tokenmeter.rollups WHERE granularity = 'day' AND dimension = 'tenant'"
        f" AND window_start >= %(start)s AND window_start < %(end)s {where}",
        {"start": start, "end": end, **params},
    ).fetchone()
    assert row is not None
    return Decimal(row[0]), int(row[1]), int(row[2])


def _breakdown(
    conn: psycopg.Connection, tenant_id: str | None, period: Period, dimension: str, total: Decimal, limit: int
) -> list[dict[str, Any]]:
    where, params = _tenant_filter(tenant_id)
    rows = conn.execute(
        "SELECT dimension_value, sum(cost), sum(calls), sum(input_tokens), sum(output_tokens)"
        " FROM tokenmeter.rollups WHERE granularity = 'day' AND dimension = %(dimension)s"
        f" AND window_start >= %(start)s AND window_start < %(end)s {where}"
        " GROUP BY dimension_value ORDER BY sum(cost) DESC, dimension_value LIMIT %(limit)s",
        {"dimension": dimension, "start": period.start, "end": period.end, "limit": limit, **params},
    ).fetchall()
    return [
        {
            "name": name or "(none)",
            "cost": _money(cost),
            "calls": int(calls),
            "input_tokens": int(tin),
            "output_tokens": int(tout),
            "share": f"{cost * 100 / total:.1f}" if total else "0.0",
            "avg_cost_per_call": _average(cost, calls),
        }
        for name, cost, calls, tin, tout in rows
    ]


def build_report(
    conn: psycopg.Connection, tenant_id: str | None, period: Period, top: int = 10, now: datetime | None = None
) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    total, calls, unpriced = _spend(conn, tenant_id, period.start, period.end)
    zone = period.time_zone
    relative = {}
    for name in ("day", "week", "month"):
        start = period_start(name, now, zone)
        relative[name] = _spend(conn, tenant_id, start, now + timedelta(days=1))[0]
    report: dict[str, Any] = {
        "tenant_id": tenant_id,
        "period": {
            "label": period.label,
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            "time_zone": zone,
        },
        "currency": "USD",
        "totals": {
            "cost": _money(total),
            "calls": calls,
            "unpriced_calls": unpriced,
            "today": _money(relative["day"]),
            "this_week": _money(relative["week"]),
            "this_month": _money(relative["month"]),
        },
    }
    # Seven local days ending with the period's last day (or today, if the period is still open).
    last_day = min(local_date(period.end - timedelta(microseconds=1), zone), local_date(now, zone))
    trend = []
    for offset in range(6, -1, -1):
        day = last_day - timedelta(days=offset)
        start = local_midnight(day, zone)
        cost, day_calls, _ = _spend(conn, tenant_id, start, local_midnight(day + timedelta(days=1), zone))
        trend.append({"date": day.isoformat(), "cost": _money(cost), "calls": day_calls})
    report["trend_7d"] = trend
    for key, dimension in BREAKDOWNS.items():
        report[key] = _breakdown(conn, tenant_id, period, dimension, total, 10_000 if key != "by_user" else 1000)
    providers: dict[str, dict[str, Any]] = {}
    for row in report["by_model"]:
        provider = row["name"].split("/", 1)[0]
        entry = providers.setdefault(provider, {"name": provider, "cost": Decimal(0), "calls": 0})
        entry["cost"] += Decimal(row["cost"])
        entry["calls"] += row["calls"]
    report["by_provider"] = [
        {
            "name": p["name"],
            "cost": _money(p["cost"]),
            "calls": p["calls"],
            "share": f"{p['cost'] * 100 / total:.1f}" if total else "0.0",
            "avg_cost_per_call": _average(p["cost"], p["calls"]),
        }
        for p in sorted(providers.values(), key=lambda p: (-p["cost"], p["name"]))
    ]
    report["avg_cost_per_call"] = {
        "overall": _average(total, calls),
        "by_feature": {row["name"]: row["avg_cost_per_call"] for row in report["by_feature"]},
        "by_model": {row["name"]: row["avg_cost_per_call"] for row in report["by_model"]},
    }
    where, params = _tenant_filter(tenant_id)
    window = {"start": period.start, "end": period.end, "top": top, **params}
    months = summaries.source(conn, period.start, period.end, top)
    report["top_requests"] = [
        {
            "event_id": r[0],
            "tenant_id": r[1],
            "timestamp": r[2].isoformat(),
            "model": f"{r[3]}/{r[4]}",
            "feature": r[5],
            "user_id": r[6],
            "trace_id": r[7],
            "input_tokens": r[8],
            "output_tokens": r[9],
            "cost": _money(r[10]),
        }
        for r in _section(conn, "top_requests", where, window, months)
    ]
    report["top_conversations"] = [
        {
            "tenant_id": r[0],
            "conversation": r[1],
            "calls": int(r[2]),
            "cost": _money(r[3]),
            "first": r[4].isoformat(),
            "last": r[5].isoformat(),
        }
        for r in _section(conn, "top_conversations", where, window, months)
    ]
    report["latency_by_model"] = [
        {"model": f"{r[0]}/{r[1]}", "calls": int(r[2]), "p50_ms": int(r[3]), "p95_ms": int(r[4])}
        for r in _section(conn, "latency_by_model", where, window, months)
    ]
    report.update(_price_context_breakdowns(_section(conn, "price_context", where, window, months), total))
    return report


# The sections the rollups cannot answer, from the ledger (rows in the shape of ``sinks.summaries``' functions,
# which answer them for whole UTC months). Spend per tier and processing: one scan of the period for both.
_PERIOD = "FROM tokenmeter.ledger WHERE ts >= %(start)s AND ts < %(end)s {where}"
_LEDGER_SECTIONS = {
    "top_requests": "SELECT event_id, tenant_id, ts, provider, model, feature, user_id, trace_id, input_tokens,"
    f" output_tokens, total_cost {_PERIOD} ORDER BY total_cost DESC, event_id LIMIT %(top)s",
    "top_conversations": "SELECT tenant_id, coalesce(session_id, trace_id), count(*), sum(total_cost), min(ts),"
    f" max(ts) {_PERIOD} AND coalesce(session_id, trace_id) IS NOT NULL GROUP BY 1, 2"
    " ORDER BY sum(total_cost) DESC, 2 LIMIT %(top)s",
    "latency_by_model": "SELECT provider, model, count(*), percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms),"
    f" percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_ms) {_PERIOD} AND latency_ms IS NOT NULL"
    " GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
    "price_context": "SELECT GROUPING(service_tier), coalesce(service_tier, processing), sum(total_cost), count(*)"
    f" {_PERIOD} GROUP BY GROUPING SETS ((service_tier), (processing)) ORDER BY 3 DESC, 2",
}
_SUMMARY_SECTIONS = {
    "top_requests": summaries.top_requests,
    "top_conversations": summaries.top_conversations,
    "latency_by_model": summaries.latency_by_model,
    "price_context": summaries.price_context,
}


def _section(
    conn: psycopg.Connection, name: str, where: str, window: dict[str, Any], source: summaries.Source | None
) -> list[tuple[Any, ...]]:
    if source is not None:
        return _SUMMARY_SECTIONS[name](conn, where, window, source)
    return conn.execute(_LEDGER_SECTIONS[name].format(where=where), window).fetchall()


def _price_context_breakdowns(rows: list[tuple[Any, ...]], total: Decimal) -> dict[str, list[dict[str, Any]]]:
    """``by_service_tier`` and ``by_processing`` from (grouped by processing?, name, cost, calls) rows.
    Calls without a tier, or not batch, are ``(none)``."""
    found: dict[str, list[dict[str, Any]]] = {"by_service_tier": [], "by_processing": []}
    for by_processing, name, cost, calls in rows:
        found["by_processing" if by_processing else "by_service_tier"].append(
            {
                "name": name or "(none)",
                "cost": _money(cost),
                "calls": int(calls),
                "share": f"{cost * 100 / total:.1f}" if total else "0.0",
                "avg_cost_per_call": _average(cost, calls),
            }
        )
    return found


def trace_report(
    conn: psycopg.Connection, trace_id: str | None = None, session_id: str | None = None, tenant_id: str | None = None
) -> dict[str, Any]:
    """What one trace (an agent run, a request fanning out to several calls) or one session cost: each
    call from the ledger in time order, the totals and a breakdown by model. With ``tenant_id`` the
    ledger's (tenant, trace) index answers it; without, Postgres skips over the tenants of that index."""
    if (trace_id is None) == (session_id is None):
        raise ValueError("give a trace id or a session id (one of them)")
    column, wanted = ("trace_id", trace_id) if trace_id is not None else ("session_id", session_id)
    where, params = _tenant_filter(tenant_id)
    rows = conn.execute(
        "SELECT event_id, tenant_id, ts, provider, model, feature, user_id, trace_id, session_id, input_tokens,"
        " output_tokens, cache_read_tokens, cache_write_tokens, latency_ms, price_status, total_cost"
        f" FROM tokenmeter.ledger WHERE {column} = %(wanted)s {where} ORDER BY ts, event_id",
        {"wanted": wanted, **params},
    ).fetchall()
    calls = [
        {
            "event_id": r[0],
            "tenant_id": r[1],
            "timestamp": r[2].isoformat(),
            "model": f"{r[3]}/{r[4]}",
            "feature": r[5],
            "user_id": r[6],
            "trace_id": r[7],
            "session_id": r[8],
            "input_tokens": r[9],
            "output_tokens": r[10],
            "cache_read_tokens": r[11],
            "cache_write_tokens": r[12],
            "latency_ms": r[13],
            "price_status": r[14],
            "cost": _money(r[15]),
        }
        for r in rows
    ]
    total = sum((Decimal(r[15]) for r in rows), Decimal(0))
    models: dict[str, dict[str, Any]] = {}
    for call in calls:
        entry = models.setdefault(call["model"], {"name": call["model"], "calls": 0, "cost": Decimal(0)})
        entry["calls"] += 1
        entry["cost"] += Decimal(call["cost"])
    return {
        "trace_id": trace_id,
        "session_id": session_id,
        "tenants": sorted({c["tenant_id"] for c in calls}),
        "currency": "USD",
        "totals": {
            "cost": _money(total),
            "calls": len(calls),
            "unpriced_calls": sum(1 for c in calls if c["price_status"] != "priced"),
            "input_tokens": sum(c["input_tokens"] for c in calls),
            "output_tokens": sum(c["output_tokens"] for c in calls),
            "first": calls[0]["timestamp"] if calls else None,
            "last": calls[-1]["timestamp"] if calls else None,
        },
        "by_model": [
            {"name": m["name"], "calls": m["calls"], "cost": _money(m["cost"])}
            for m in sorted(models.values(), key=lambda m: (-m["cost"], m["name"]))
        ],
        "calls": calls,
    }


CSV_SECTIONS = (
    "by_provider",
    "by_model",
    "by_feature",
    "by_environment",
    "by_user",
    "by_service_tier",
    "by_processing",
    "by_team",
    "by_api_key",
)


def report_rows(report: dict[str, Any]) -> list[list[str | int | Decimal]]:
    """Flat rows for CSV: section, name, cost, calls, share. Numbers stay numbers (Decimal, int) so the
    CSV writer can tell them from names, which it neutralises for spreadsheets (``deploy.output.csv_safe``)."""
    rows: list[list[str | int | Decimal]] = [["section", "name", "cost", "calls", "share_percent"]]
    totals = report["totals"]
    rows.append(["totals", report["period"]["label"], Decimal(totals["cost"]), totals["calls"], Decimal("100.0")])
    for day in report["trend_7d"]:
        rows.append(["trend_7d", day["date"], Decimal(day["cost"]), day["calls"], ""])
    for section in CSV_SECTIONS:
        rows += [
            [section, r["name"], Decimal(r["cost"]), r["calls"], Decimal(r["share"])] for r in report.get(section, ())
        ]
    rows += [["top_requests", r["event_id"], Decimal(r["cost"]), 1, ""] for r in report["top_requests"]]
    return rows


def whatif(
    conn: psycopg.Connection, book: Any, tenant_id: str, period: Period, from_model: str, to_model: str
) -> dict[str, Any]:
    """Reprice every call of ``from_model`` ("provider/model") in the period as if ``to_model`` had
    served it: same tokens, the other model's price at each call's own time (tiers included)."""
    from schemas.events import UsageEvent

    from_provider, _, from_name = from_model.partition("/")
    to_provider, _, to_name = to_model.partition("/")
    if not (from_name and to_name):
        raise ValueError("models are written provider/model, e.g. openai/gpt-4o")
    calls = 0
    actual = alternative = Decimal(0)
    unpriced = 0
    with conn.cursor(name="whatif") as cursor:  # server-side: a month can hold millions of calls
        cursor.itersize = 10_000
        cursor.execute(
            "SELECT ts, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, total_cost"
            " FROM tokenmeter.ledger WHERE tenant_id = %s AND provider = %s AND model = %s"
            " AND ts >= %s AND ts < %s",
            (tenant_id, from_provider, from_name, period.start, period.end),
        )
        for ts, input_tokens, output_tokens, cache_read, cache_write, cost in cursor:
            calls += 1
            actual += cost
            event = UsageEvent.model_construct(
                event_id="whatif",
                timestamp=ts,
                tenant_id=tenant_id,
                provider=to_provider,
                model=to_name,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                cache_read_tokens=cache_read,
                cache_write_tokens=cache_write,
                input_audio_tokens=None,
                output_audio_tokens=None,
                input_image_tokens=None,
            )
            price = book.price(event)
            if price.status != "priced":
                unpriced += 1
            alternative += price.total_cost
    if unpriced:
        raise ValueError(f"{to_model} has no price for {unpriced} of the calls")
    return {
        "tenant_id": tenant_id,
        "period": period.label,
        "from": from_model,
        "to": to_model,
        "calls": calls,
        "actual_cost": _money(actual),
        "whatif_cost": _money(alternative),
        "difference": _money(alternative - actual),
        "ratio": f"{alternative / actual:.4f}" if actual else None,
    }
