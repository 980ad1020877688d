"""``tokenmeter demo``: the whole product on the local stack, from nothing, in a couple of minutes.

Brings the stack up (if needed), ensures topics, starts a worker, sets budgets, then plays services
of four tenants calling several providers' models through ``UsageProducer`` — with cache reads, a
feature whose prompt keeps growing, an agent stuck in a loop, and one tenant running into its hard
budget (its service asks ``QuotaClient`` before each call and stops when told no). A live panel shows
events/s, spend and alerts; at the end the report is printed and written as HTML.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deploy.isolation import WorkerProcess
from deploy.output import cell
from deploy.report_render import print_report, render_html
from deploy.settings import Settings
from deploy.stack import LocalStack
from deploy.topics import ensure_topics
from producers.producer import UsageProducer
from producers.quota import QuotaClient
from sinks.alerts import list_alerts
from sinks.reports import build_report, parse_period
from streams.budgets import Budget
from streams.lag import wait_for_sinks

TENANTS = {  # name: (share of traffic, models with weights)
    "acme": (0.45, [("openai", "gpt-4o", 5), ("openai", "gpt-4o-mini", 6), ("anthropic", "claude-sonnet-4-5", 2)]),
    "globex": (0.2, [("anthropic", "claude-sonnet-4-5", 4), ("anthropic", "claude-haiku-4-5", 3)]),
    "initech": (0.2, [("openai", "o3", 1), ("openai", "gpt-4o-mini", 4), ("google", "gemini-2.5-flash", 4)]),
    "umbrella": (0.15, [("google", "gemini-2.5-flash", 5), ("google", "gemini-2.5-pro", 2)]),
}
FEATURES = ["search", "chat", "summarize", "classify"]


@dataclass
class Traffic:
    """Generates one service call at a time, like a mix of real services would."""

    started: float
    rng: random.Random = field(default_factory=lambda: random.Random(42))

    def call(self, now: float) -> dict[str, Any]:
        rng = self.rng
        elapsed = now - self.started
        if elapsed > 15 and rng.random() < 0.12:
            # initech's agent is stuck: the same session calls o3 again and again, its context growing
            return {"tenant_id": "initech", "provider": "openai", "model": "o3", "feature": "agent",
                    "session_id": "agent-run-7731", "user_id": "svc-agent", "environment": "prod",
                    "input_tokens": 6000 + int(elapsed * 120), "output_tokens": 900, "latency_ms": 9000,
                    "cache_read_tokens": 4096}  # fmt: skip
        tenant = rng.choices(list(TENANTS), [share for share, _ in TENANTS.values()])[0]
        models = TENANTS[tenant][1]
        provider, model, _ = rng.choices(models, [w for *_, w in models])[0]
        feature = rng.choice(FEATURES)
        input_tokens = int(rng.lognormvariate(7.2, 0.9)) + 20
        if feature == "summarize":
            input_tokens += int(elapsed * 400)  # a prompt template that keeps growing
        cached = rng.randint(0, input_tokens // 2) if rng.random() < 0.5 else 0
        return {
            "tenant_id": tenant, "provider": provider, "model": model, "feature": feature,
            "user_id": f"{tenant[:2]}-user-{int(rng.paretovariate(1.1)) % 300}",
            "environment": "prod" if rng.random() < 0.85 else "staging",
            "session_id": f"{tenant}-s{rng.randint(1, 2000)}", "input_tokens": input_tokens,
            "cache_read_tokens": cached, "output_tokens": int(rng.lognormvariate(5.3, 0.7)) + 5,
            "latency_ms": int(rng.lognormvariate(6.8, 0.5)),
        }  # fmt: skip


# Measured averages of this traffic (USD per call), used to size budgets that this run will cross.
GLOBEX_PER_CALL = Decimal("0.007")
AGENT_PER_CALL = Decimal("0.02")
ACME_PER_CALL = Decimal("0.0035")


def _set_budgets(settings: Settings, quota: QuotaClient, rate: int, duration: float | None) -> list[Budget]:
    """Budgets on top of what is already spent, sized from the traffic to come, so every run shows
    thresholds firing: globex runs into a hard budget about 60% of the way through."""

    def spent(tenant: str, feature: str | None = None) -> Decimal:
        return quota.check(tenant, feature=feature).spent

    seconds = Decimal(str(duration or 60))
    globex = Decimal(rate) * Decimal("0.2") * seconds * GLOBEX_PER_CALL * Decimal("0.6")
    agent = Decimal(rate) * Decimal("0.12") * max(seconds - 15, Decimal(5)) * AGENT_PER_CALL * Decimal("0.6")
    acme = Decimal(rate) * Decimal("0.45") * seconds * ACME_PER_CALL * Decimal("1.5")
    cents = Decimal("0.01")
    budgets = [
        Budget("globex", "tenant", "", "month", (spent("globex") + max(globex, Decimal(1))).quantize(cents), hard=True),
        Budget("acme", "tenant", "", "month", (spent("acme") + max(acme, Decimal(1))).quantize(cents)),
        Budget("initech", "feature", "agent", "month",
               (spent("initech", "agent") + max(agent, Decimal(1))).quantize(cents)),
    ]  # fmt: skip
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for budget in budgets:
        producer.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    producer.flush(15)
    return budgets


def _alerts_since(settings: Settings, since: datetime) -> list[dict[str, Any]]:
    try:
        with psycopg.connect(settings.database_url, connect_timeout=3) as conn:
            return [a for a in list_alerts(conn, limit=5000) if a["created_at"] >= since.isoformat()]
    except psycopg.OperationalError:
        return []


def _panel(sent: int, rate: float, elapsed: float, duration: float | None, spend: dict[str, Any],
           alerts: list[dict[str, Any]], blocked_skips: int) -> Group:  # fmt: skip
    head = f"{elapsed:5.0f}s" + (f" / {duration:.0f}s" if duration else " (Ctrl-C to stop)")
    table = Table(title=f"live spend this month — {sent:,} calls recorded, {rate:,.0f} calls/s, {head}",
                  title_justify="left", expand=True)  # fmt: skip
    for column in ("tenant", "spent (USD)", "budget", "quota check"):
        table.add_column(column)
    for tenant, decision in spend.items():
        budget = (
            "" if decision.limit is None else f"${decision.limit} ({'hard' if 'hard' in decision.reason else 'soft'})"
        )
        verdict = "[green]allowed[/]" if decision.allowed else "[bold red]BLOCKED[/]"
        table.add_row(cell(tenant), f"{decision.spent:.4f}", budget, verdict)
    # Alert messages carry tenant, feature and user names: printed literally (deploy/output.py).
    lines = [Text.assemble(cell(a["kind"], style="yellow"), " ", cell(a["message"])) for a in alerts[-6:]]
    recent = Text("\n").join(lines) if lines else Text("none yet", style="dim")
    footer = f"[dim]globex calls refused by the quota check: {blocked_skips:,}[/]"
    return Group(table, Panel(recent, title=f"alerts fired ({len(alerts)})", title_align="left"), footer)


def _paced_calls(rate: int, duration: float | None) -> Iterator[float]:
    started = time.monotonic()
    n = 0
    while duration is None or time.monotonic() - started < duration:
        due = started + n / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        n += 1
        yield time.monotonic()


def run_demo(settings: Settings, duration: float | None, rate: int, console: Console) -> Path:
    console.rule("[bold]tokenmeter demo")
    stack = LocalStack(settings)
    console.print("1/5 local stack (Kafka, Postgres, Redis) …")
    stack.up(progress=lambda m: console.print(f"    {m}", highlight=False))
    for change in ensure_topics(settings):
        if change.action != "unchanged":
            console.print(f"    topic {change.topic}: {change.action}")
    console.print("2/5 starting a worker (tokenmeter worker) …")
    log_dir = settings.home / "demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, log_dir)
    worker.start(loglevel="warning")
    try:
        quota = QuotaClient(settings)
        budgets = _set_budgets(settings, quota, rate, duration)
        console.print("3/5 budgets: " + "; ".join(f"{b.scope_label} ${b.limit}/{b.period}"
                                                  f"{' hard' if b.hard else ''}" for b in budgets))  # fmt: skip
        console.print(f"4/5 traffic: {rate} calls/s from 4 tenants' services"
                      + (f" for {duration:.0f}s" if duration else " until Ctrl-C"))  # fmt: skip
        started_at = datetime.now(UTC)
        traffic = Traffic(time.monotonic())
        sent = blocked_skips = 0
        window: list[float] = []
        spend: dict[str, Any] = {}
        alerts: list[dict[str, Any]] = []
        last_refresh = 0.0
        globex_allowed = True
        with UsageProducer(settings) as producer, Live(console=console, refresh_per_second=4) as live:
            try:
                for now in _paced_calls(rate, duration):
                    call = traffic.call(now)
                    if call["tenant_id"] == "globex" and not globex_allowed:
                        blocked_skips += 1  # the service asked first and did not call the model
                        continue
                    producer.record(call)
                    sent += 1
                    window.append(now)
                    if now - last_refresh >= 0.5:
                        last_refresh = now
                        window = [t for t in window if now - t <= 2.0]
                        spend = {tenant: quota.check(tenant) for tenant in TENANTS}
                        globex_allowed = spend["globex"].allowed
                        if int(now) % 2 == 0:
                            alerts = _alerts_since(settings, started_at)
                        live.update(_panel(sent, len(window) / 2.0, now - traffic.started, duration, spend, alerts,
                                           blocked_skips))  # fmt: skip
            except KeyboardInterrupt:
                console.print("stopping traffic …")
        console.print()
        console.print("5/5 waiting for the pipeline to catch up (tokenmeter lag --wait) …")
        caught_up = wait_for_sinks(settings, timeout=120)
        # Budget alerts come from stage 2 (Faust, consumer group = worker id) reading metering.rollups.
        caught_up = caught_up and wait_for_sinks(settings, 60, topic=settings.topic_rollups, group=settings.worker_id)
        if not caught_up:
            console.print("[yellow]the worker is still behind; the report may miss the last events[/]")
    finally:
        worker.stop()
    alerts = _alerts_since(settings, started_at)
    console.print(f"\n[bold]{len(alerts)} alerts fired during the demo[/] (tokenmeter alerts list):")
    for a in alerts:
        console.print(Text.assemble("  ", cell(f"{a['kind']:<22}", style="yellow"), " ", cell(a["message"])))
    with psycopg.connect(settings.database_url) as conn:
        report = build_report(conn, None, parse_period("month"))
    print_report(report, console)
    html_path = settings.home / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    console.rule()
    console.print(f"HTML report with charts: {html_path}")
    console.print("The stack is still up. Try: tokenmeter report --tenant initech · tokenmeter quota check "
                  "--tenant globex · tokenmeter invoice --tenant acme --period "
                  f"{started_at:%Y-%m} · tokenmeter alerts list · tokenmeter dev down")  # fmt: skip
    return html_path
