"""Renderings of a report (``sinks.reports.build_report``): a terminal view (rich) and a
self-contained HTML page whose charts are inline SVG (no scripts, no network). Both round money for
people (``deploy.output.usd``) and say so; the HTML keeps the exact amounts in the charts' tooltips."""

from __future__ import annotations

import html
from decimal import Decimal
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from deploy.output import cell, rounding_note, usd

PALETTE = ["#3b6fd8", "#e07b39", "#3aa675", "#c84b6e", "#8e6cc9", "#c9a43b", "#4bb3c8", "#7a7a7a"]


def print_report(report: dict[str, Any], console: Console | None = None, rows: int = 8) -> None:
    console = console or Console()
    t = report["totals"]
    who = report["tenant_id"] or "all tenants"
    console.rule(cell(f"tokenmeter report — {who}, {report['period']['label']}", style="bold"))
    console.print(cell(rounding_note("json", "csv"), style="dim"))
    console.print(
        f"[bold]1. Total[/]: {usd(t['cost'])} over {t['calls']:,} calls ({t['unpriced_calls']:,} unpriced) — "
        f"today {usd(t['today'])}, this week {usd(t['this_week'])}, this month {usd(t['this_month'])}"
    )
    trend = "  ".join(f"{d['date'][5:]} {usd(d['cost'])}" for d in report["trend_7d"])
    console.print(f"   last 7 days: {trend}")
    sections = [
        ("2. By provider", "by_provider"),
        ("2. By model", "by_model"),
        ("3. By feature", "by_feature"),
        ("3. By environment", "by_environment"),
        ("4. By user", "by_user"),
    ]
    # Budget hierarchies: only when some calls named a team or an API key id.
    sections += [
        (title, key) for title, key in (("By team", "by_team"), ("By API key", "by_api_key")) if report.get(key)
    ]
    # Price contexts only when some calls had one (most reports: every call standard, not batch).
    sections += [
        (title, key)
        for title, key in (("2. By service tier", "by_service_tier"), ("2. Batch or not", "by_processing"))
        if _has_context(report, key)
    ]
    for title, key in sections:
        table = Table(title=title, title_justify="left", show_edge=False)
        for column in ("name", "cost", "calls", "share %", "avg/call"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for row in report[key][:rows]:
            average = row.get("avg_cost_per_call")
            table.add_row(
                cell(row["name"]),
                usd(row["cost"]),
                f"{row['calls']:,}",
                row["share"],
                "" if average is None else usd(average, "per_call"),
            )
        if len(report[key]) > rows:
            table.add_row(f"… {len(report[key]) - rows} more", "", "", "", "")
        console.print(table)
    console.print(f"[bold]4. Average cost per call[/]: {usd(report['avg_cost_per_call']['overall'], 'per_call')}")
    top = Table(title="4. Most expensive requests", title_justify="left", show_edge=False)
    for column in ("cost", "tenant", "model", "feature", "user", "when"):
        top.add_column(column, justify="right" if column == "cost" else "left")
    for r in report["top_requests"][:5]:
        top.add_row(
            usd(r["cost"], "per_call"),
            cell(r["tenant_id"]),
            cell(r["model"]),
            cell(r["feature"]),
            cell(r["user_id"]),
            r["timestamp"][:19],
        )
    console.print(top)
    if report["top_conversations"]:
        conv = Table(title="4. Most expensive conversations (session or trace)", title_justify="left", show_edge=False)
        for column in ("cost", "tenant", "conversation", "calls"):
            conv.add_column(column, justify="left" if column in ("tenant", "conversation") else "right")
        for c in report["top_conversations"][:5]:
            conv.add_row(usd(c["cost"]), cell(c["tenant_id"]), cell(c["conversation"]), f"{c['calls']:,}")
        console.print(conv)


def _has_context(report: dict[str, Any], key: str) -> bool:
    """Whether a price-context breakdown says more than "every call had none"."""
    return any(row["name"] != "(none)" for row in report.get(key, []))


# Width of one character of the 12 px chart font, rounded up (digits are ~6.7 px in system-ui/DejaVu Sans).
CHAR_PX = 7.5


def _bars(rows: list[dict[str, Any]], width: int = 560, limit: int = 8) -> str:
    """Horizontal bars: name, bar proportional to cost, rounded amount and share (exact amount in the tooltip).
    The longest label decides how far the longest bar may reach, so no label runs past the right edge."""
    rows = rows[:limit]
    if not rows:
        return "<p class='empty'>no spend in this period</p>"
    top = max(Decimal(r["cost"]) for r in rows) or Decimal(1)
    labels = [f"{usd(row['cost'])} · {row.get('share', '')}%" for row in rows]
    span = max(40, width - 206 - int(CHAR_PX * max(map(len, labels))) - 8)
    height = 26 * len(rows) + 6
    parts = [f"<svg role='img' viewBox='0 0 {width} {height}' width='{width}' height='{height}'>"]
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        y = 6 + 26 * i
        bar = int(Decimal(span) * Decimal(row["cost"]) / top) if top else 0
        # The name column is 200 px, ~28 characters of a typical name: a longer one is cut with an ellipsis
        # (the tooltip has it whole) instead of running under the bar.
        name = html.escape(row["name"] if len(row["name"]) <= 28 else row["name"][:27] + "…")
        parts.append(
            f"<text x='0' y='{y + 14}' class='label'>{name}</text>"
            f"<rect x='200' y='{y}' width='{max(bar, 1)}' height='18' rx='3' fill='{PALETTE[i % len(PALETTE)]}'>"
            f"<title>{html.escape(row['name'])}: ${html.escape(row['cost'])}</title></rect>"
            f"<text x='{206 + bar}' y='{y + 14}' class='value'>{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _columns(days: list[dict[str, Any]], width: int = 560, height: int = 200) -> str:
    """Spend per day as columns."""
    top = max((Decimal(d["cost"]) for d in days), default=Decimal(0)) or Decimal(1)
    step = width // max(len(days), 1)
    # 24 px above the tallest column for its label, 30 below the columns for the dates.
    parts = [f"<svg role='img' viewBox='0 0 {width} {height + 54}' width='{width}' height='{height + 54}'>"]
    for i, day in enumerate(days):
        bar = int(Decimal(height) * Decimal(day["cost"]) / top)
        x = i * step + 8
        label = usd(day["cost"])
        half = int(CHAR_PX * len(label) / 2) + 2  # centred over its column, but never past the chart's edges
        centre = min(max(x + (step - 16) // 2, half), width - half)
        parts.append(
            f"<rect x='{x}' y='{height - bar + 24}' width='{step - 16}' height='{max(bar, 1)}' rx='3'"
            f" fill='{PALETTE[0]}'>"
            f"<title>{html.escape(day['date'])}: ${html.escape(day['cost'])}</title></rect>"
            f"<text x='{x + (step - 16) // 2}' y='{height + 42}' class='axis'>{html.escape(day['date'][5:])}</text>"
            f"<text x='{centre}' y='{height - bar + 18}' class='axis'>{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str]],
    limit: int = 15,
    money: dict[str, Literal["total", "per_call"]] | None = None,
) -> str:
    """An HTML table; the columns named in ``money`` are amounts, rounded as ``usd`` does for that kind."""

    def shown(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        if value is None:
            return ""
        return usd(value, money[key]) if money and key in money else str(value)

    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(shown(row, key))}</td>" for _, key in columns) + "</tr>"
        for row in rows[:limit]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    t = report["totals"]
    who = html.escape(report["tenant_id"] or "all tenants")
    cards = "".join(
        f"<div class='card'><div class='k'>{label}</div><div class='v'>{html.escape(value)}</div></div>"
        for label, value in [
            ("period total", usd(t["cost"])),
            ("calls", f"{t['calls']:,}"),
            ("today", usd(t["today"])),
            ("this week", usd(t["this_week"])),
            ("this month", usd(t["this_month"])),
            ("avg per call", usd(report["avg_cost_per_call"]["overall"], "per_call")),
            ("unpriced calls", f"{t['unpriced_calls']:,}"),
        ]
    )
    money_columns = [
        ("name", "name"),
        ("cost", "cost"),
        ("calls", "calls"),
        ("share %", "share"),
        ("avg per call", "avg_cost_per_call"),
    ]
    breakdown: dict[str, Literal["total", "per_call"]] = {"cost": "total", "avg_cost_per_call": "per_call"}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tokenmeter report — {who}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.1rem; margin-top: 2rem; }}
.cards {{ display: flex; flex-wrap: wrap; gap: .8rem; }}
.card {{ background: #f3f5f9; border-radius: 8px; padding: .7rem 1rem; min-width: 120px; }}
.k {{ color: #666; font-size: .8rem; }} .v {{ font-size: 1.3rem; font-weight: 600; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 1.5rem; }}
svg text {{ font: 12px system-ui, sans-serif; fill: #333; }} svg text.axis {{ text-anchor: middle; fill: #555; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ border-bottom: 1px solid #e4e4e4; padding: 4px 8px; text-align: left; }}
.empty {{ color: #888; }} .note {{ color: #666; font-size: .8rem; }}
</style></head><body>
<h1>tokenmeter — {who}, {html.escape(report["period"]["label"])}</h1>
<div class="cards">{cards}</div>
<p class="note">{html.escape(rounding_note("json", "csv"))}; a bar's or column's tooltip has the exact amount.</p>
<div class="grid">
<section id="spend-over-time"><h2>1. Spend over the last 7 days</h2>{_columns(report["trend_7d"])}</section>
<section id="model-mix"><h2>2. Model mix</h2>{_bars(report["by_model"])}</section>
<section id="providers"><h2>2. Providers</h2>{_bars(report["by_provider"])}</section>
<section id="features"><h2>3. Top features</h2>{_bars(report["by_feature"])}</section>
<section id="environments"><h2>3. Environments</h2>{_bars(report["by_environment"])}</section>
<section id="users"><h2>4. Top users</h2>{_bars(report["by_user"])}</section>
{
        "".join(
            f'<section id="{key}"><h2>{title}</h2>{_bars(report[key])}</section>'
            for key, title in (("by_service_tier", "2. Service tiers"), ("by_processing", "2. Batch or not"))
            if _has_context(report, key)
        )
    }
</div>
<h2>4. Most expensive requests</h2>
{
        _table(
            report["top_requests"],
            [
                ("cost", "cost"),
                ("tenant", "tenant_id"),
                ("model", "model"),
                ("feature", "feature"),
                ("user", "user_id"),
                ("when", "timestamp"),
            ],
            money={"cost": "per_call"},
        )
    }
<h2>4. Most expensive conversations</h2>
{
        _table(
            report["top_conversations"],
            [("cost", "cost"), ("tenant", "tenant_id"), ("session / trace", "conversation"), ("calls", "calls")],
            money={"cost": "total"},
        )
    }
<h2>By model</h2>{_table(report["by_model"], money_columns, money=breakdown)}
<h2>By feature</h2>{_table(report["by_feature"], money_columns, money=breakdown)}
</body></html>
"""


def print_trace(report: dict[str, Any], console: Console | None = None) -> None:
    """A trace's or session's calls in time order, then its totals by model (``sinks.reports.trace_report``)."""
    console = console or Console()
    what = f"trace {report['trace_id']}" if report["trace_id"] is not None else f"session {report['session_id']}"
    t = report["totals"]
    console.rule(cell(f"tokenmeter — {what}", style="bold"))
    if not t["calls"]:
        console.print(cell(f"no calls of {what} in the ledger", style="yellow"))
        return
    console.print(cell(rounding_note("json", "csv"), style="dim"))
    calls = Table(show_edge=False)
    for column in ("when (UTC)", "model", "feature", "user", "in", "out", "ms", "cost"):
        calls.add_column(column, justify="left" if column in ("when (UTC)", "model", "feature", "user") else "right")
    for c in report["calls"]:
        calls.add_row(
            c["timestamp"][:23],
            cell(c["model"]),
            cell(c["feature"] or ""),
            cell(c["user_id"] or ""),
            f"{c['input_tokens']:,}",
            f"{c['output_tokens']:,}",
            "" if c["latency_ms"] is None else f"{c['latency_ms']:,}",
            usd(c["cost"], "per_call") if c["price_status"] == "priced" else "unpriced",
        )
    console.print(calls)
    by_model = Table(title="by model", title_justify="left", show_edge=False)
    for column in ("model", "calls", "cost"):
        by_model.add_column(column, justify="left" if column == "model" else "right")
    for m in report["by_model"]:
        by_model.add_row(cell(m["name"]), f"{m['calls']:,}", usd(m["cost"], "per_call"))
    console.print(by_model)
    unpriced = f" ({t['unpriced_calls']:,} unpriced)" if t["unpriced_calls"] else ""
    console.print(
        f"[bold]Total[/]: {usd(t['cost'], 'per_call')} over {t['calls']:,} calls{unpriced}, "
        f"{t['input_tokens']:,} input and {t['output_tokens']:,} output tokens, {t['first'][:23]} → {t['last'][:23]}; "
        f"tenant {cell(', '.join(report['tenants']))}"
    )
