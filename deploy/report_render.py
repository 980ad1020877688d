"""Renderings of a report (``sinks.reports.build_report``): a terminal view (rich) and a
self-contained HTML page whose charts are inline SVG (no scripts, no network)."""

from __future__ import annotations

import html
from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from deploy.output import cell

PALETTE = ["#3b6fd8", "#e07b39", "#3aa675", "#c84b6e", "#8e6cc9", "#c9a43b", "#4bb3c8", "#7a7a7a"]


def print_report(report: dict[str, Any], console: Console | None = None, rows: int = 8) -> None:
    console = console or Console()
    t = report["totals"]
    who = report["tenant_id"] or "all tenants"
    console.rule(cell(f"tokenmeter report — {who}, {report['period']['label']}", style="bold"))
    console.print(
        f"[bold]1. Total[/]: ${t['cost']} over {t['calls']:,} calls ({t['unpriced_calls']:,} unpriced) — "
        f"today ${t['today']}, this week ${t['this_week']}, this month ${t['this_month']}"
    )
    trend = "  ".join(f"{d['date'][5:]} ${Decimal(d['cost']):.2f}" for d in report["trend_7d"])
    console.print(f"   last 7 days: {trend}")
    sections = [("2. By provider", "by_provider"), ("2. By model", "by_model"), ("3. By feature", "by_feature"),
                ("3. By environment", "by_environment"), ("4. By user", "by_user")]  # fmt: skip
    for title, key in sections:
        table = Table(title=title, title_justify="left", show_edge=False)
        for column in ("name", "cost (USD)", "calls", "share %", "avg/call"):
            table.add_column(column, justify="left" if column == "name" else "right")
        for row in report[key][:rows]:
            table.add_row(cell(row["name"]), row["cost"], f"{row['calls']:,}", row["share"],
                          row.get("avg_cost_per_call", ""))  # fmt: skip
        if len(report[key]) > rows:
            table.add_row(f"… {len(report[key]) - rows} more", "", "", "", "")
        console.print(table)
    console.print(f"[bold]4. Average cost per call[/]: ${report['avg_cost_per_call']['overall']}")
    top = Table(title="4. Most expensive requests", title_justify="left", show_edge=False)
    for column in ("cost (USD)", "tenant", "model", "feature", "user", "when"):
        top.add_column(column)
    for r in report["top_requests"][:5]:
        top.add_row(r["cost"], cell(r["tenant_id"]), cell(r["model"]), cell(r["feature"]), cell(r["user_id"]),
                    r["timestamp"][:19])  # fmt: skip
    console.print(top)
    if report["top_conversations"]:
        conv = Table(title="4. Most expensive conversations (session or trace)", title_justify="left", show_edge=False)
        for column in ("cost (USD)", "tenant", "conversation", "calls"):
            conv.add_column(column)
        for c in report["top_conversations"][:5]:
            conv.add_row(c["cost"], cell(c["tenant_id"]), cell(c["conversation"]), f"{c['calls']:,}")
        console.print(conv)


def _bars(rows: list[dict[str, Any]], width: int = 560, limit: int = 8) -> str:
    """Horizontal bars: name, bar proportional to cost, amount and share."""
    rows = rows[:limit]
    if not rows:
        return "<p class='empty'>no spend in this period</p>"
    top = max(Decimal(r["cost"]) for r in rows) or Decimal(1)
    height = 26 * len(rows) + 6
    parts = [f"<svg role='img' viewBox='0 0 {width} {height}' width='{width}' height='{height}'>"]
    for i, row in enumerate(rows):
        y = 6 + 26 * i
        bar = int(Decimal(260) * Decimal(row["cost"]) / top) if top else 0
        name = html.escape(row["name"][:32])
        parts.append(
            f"<text x='0' y='{y + 14}' class='label'>{name}</text>"
            f"<rect x='200' y='{y}' width='{max(bar, 1)}' height='18' rx='3' fill='{PALETTE[i % len(PALETTE)]}'>"
            f"<title>{name}: ${html.escape(row['cost'])}</title></rect>"
            f"<text x='{206 + bar}' y='{y + 14}' class='value'>"
            f"${Decimal(row['cost']):.2f} · {row.get('share', '')}%</text>"
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
        parts.append(
            f"<rect x='{x}' y='{height - bar + 24}' width='{step - 16}' height='{max(bar, 1)}' rx='3'"
            f" fill='{PALETTE[0]}'>"
            f"<title>{html.escape(day['date'])}: ${html.escape(day['cost'])}</title></rect>"
            f"<text x='{x + (step - 16) // 2}' y='{height + 42}' class='axis'>{html.escape(day['date'][5:])}</text>"
            f"<text x='{x + (step - 16) // 2}' y='{height - bar + 18}' class='axis'>${Decimal(day['cost']):.2f}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]], limit: int = 15) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(row.get(key) if row.get(key) is not None else ''))}</td>"
                         for _, key in columns) + "</tr>"
        for row in rows[:limit]
    )  # fmt: skip
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    t = report["totals"]
    who = html.escape(report["tenant_id"] or "all tenants")
    cards = "".join(
        f"<div class='card'><div class='k'>{label}</div><div class='v'>{value}</div></div>"
        for label, value in [("period total", f"${Decimal(t['cost']):,.2f}"), ("calls", f"{t['calls']:,}"),
                             ("today", f"${Decimal(t['today']):,.2f}"),
                             ("this week", f"${Decimal(t['this_week']):,.2f}"),
                             ("this month", f"${Decimal(t['this_month']):,.2f}"),
                             ("avg per call", f"${Decimal(report['avg_cost_per_call']['overall']):.5f}"),
                             ("unpriced calls", f"{t['unpriced_calls']:,}")]
    )  # fmt: skip
    money_columns = [("name", "name"), ("cost (USD)", "cost"), ("calls", "calls"), ("share %", "share"),
                     ("avg per call", "avg_cost_per_call")]  # fmt: skip
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
.empty {{ color: #888; }}
</style></head><body>
<h1>tokenmeter — {who}, {html.escape(report["period"]["label"])}</h1>
<div class="cards">{cards}</div>
<div class="grid">
<section id="spend-over-time"><h2>1. Spend over the last 7 days</h2>{_columns(report["trend_7d"])}</section>
<section id="model-mix"><h2>2. Model mix</h2>{_bars(report["by_model"])}</section>
<section id="providers"><h2>2. Providers</h2>{_bars(report["by_provider"])}</section>
<section id="features"><h2>3. Top features</h2>{_bars(report["by_feature"])}</section>
<section id="environments"><h2>3. Environments</h2>{_bars(report["by_environment"])}</section>
<section id="users"><h2>4. Top users</h2>{_bars(report["by_user"])}</section>
</div>
<h2>4. Most expensive requests</h2>
{
        _table(
            report["top_requests"],
            [
                ("cost (USD)", "cost"),
                ("tenant", "tenant_id"),
                ("model", "model"),
                ("feature", "feature"),
                ("user", "user_id"),
                ("when", "timestamp"),
            ],
        )
    }
<h2>4. Most expensive conversations</h2>
{
        _table(
            report["top_conversations"],
            [("cost (USD)", "cost"), ("tenant", "tenant_id"), ("session / trace", "conversation"), ("calls", "calls")],
        )
    }
<h2>By model</h2>{_table(report["by_model"], money_columns)}
<h2>By feature</h2>{_table(report["by_feature"], money_columns)}
</body></html>
"""
