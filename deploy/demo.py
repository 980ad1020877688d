"""``tokenmeter demo``: the whole product on the local stack, from nothing, in a few minutes.

Brings the stack up (if needed), ensures topics and starts a worker; backfills three weeks of history
for four tenants through the same pipeline (weekdays busier than weekends, office hours busier than
nights, and one incident: initech re-running a batch job on o3), so that the 7-day trend has a shape
and the anomaly rules have a baseline and something to find in it. Then it sets budgets and plays
the tenants' services live through ``UsageProducer`` — cache reads, a feature whose prompt keeps
growing, an agent stuck in a loop — each call reserving its largest possible cost with
``QuotaClient.reserve`` before it is made and committing its actual cost after, so that ``globex``
runs into its hard budget without overrunning it by more than its calls in flight had reserved. A live
panel shows calls/s, spend and alerts, a local dashboard serves the same, and the report ends it.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from deploy.bench.workload import Model, Tenant, Workload
from deploy.isolation import WorkerProcess
from deploy.output import cell, usd, usd_in_text
from deploy.report_render import print_report, render_html
from deploy.settings import Settings, kafka_config
from deploy.stack import LocalStack
from deploy.topics import ensure_topics
from producers.kafka_logging import KafkaLogger
from producers.producer import UsageProducer
from producers.quota import QuotaClient, Reservation
from sinks.alerts import list_alerts
from sinks.reports import build_report, parse_period
from streams.budgets import Budget
from streams.lag import wait_for_sinks
from streams.pricing import estimate_cost

# The tenants' services: the shared synthetic workload (deploy/bench/workload.py), each tenant with its
# share of the traffic and its own models.
WORKLOAD = Workload(
    tenants=(
        Tenant(
            "acme",
            0.45,
            (
                Model("openai", "gpt-4o", 5),
                Model("openai", "gpt-4o-mini", 6),
                Model("anthropic", "claude-sonnet-4-5", 2),
            ),
        ),
        Tenant("globex", 0.2, (Model("anthropic", "claude-sonnet-4-5", 4), Model("anthropic", "claude-haiku-4-5", 3))),
        Tenant(
            "initech",
            0.2,
            (Model("openai", "o3", 1), Model("openai", "gpt-4o-mini", 4), Model("google", "gemini-2.5-flash", 4)),
        ),
        Tenant("umbrella", 0.15, (Model("google", "gemini-2.5-flash", 5), Model("google", "gemini-2.5-pro", 2))),
    ),
    features=("search", "chat", "summarize", "classify"),
    max_output_tokens=1024,  # the services' max_tokens: no call writes more, so reserving it covers any call
)
TENANTS = [tenant.name for tenant in WORKLOAD.tenants]
MAX_OUTPUT_TOKENS = WORKLOAD.max_output_tokens


def service_call(rng: random.Random, elapsed: float = 0.0) -> dict[str, Any]:
    """One call of the tenants' ordinary services; the summarize prompt grows with ``elapsed`` seconds."""
    event = WORKLOAD.call(rng)
    if event["feature"] == "summarize":
        event["input_tokens"] += int(elapsed * 400)  # a prompt template that keeps growing
    return event


@dataclass
class Traffic:
    """Generates one live service call at a time, like a mix of real services would."""

    started: float
    rng: random.Random = field(default_factory=lambda: random.Random(42))

    def call(self, now: float) -> dict[str, Any]:
        rng = self.rng
        elapsed = now - self.started
        if elapsed > 15 and rng.random() < 0.12:
            # initech's agent is stuck: the same session calls o3 again and again, its context growing
            return {
                "tenant_id": "initech",
                "provider": "openai",
                "model": "o3",
                "feature": "agent",
                "session_id": "agent-run-7731",
                "user_id": "svc-agent",
                "environment": "prod",
                "input_tokens": 6000 + int(elapsed * 120),
                "output_tokens": 900,
                "latency_ms": 9000,
                "cache_read_tokens": 4096,
            }
        return service_call(rng, elapsed)


# ---------------------------------------------------------------- history (backfilled through the pipeline)
HISTORY_DAYS = 21
# Calls on a weekday per tenant. The anomaly rules judge a window against the 7 days before it that the
# worker's table holds, averaged over all 7: the first days of any history (and days whose older
# neighbours the table has already expired) are judged against one or two days and look like spikes.
# Each rule has a minimum volume, though ($5 a day or $1 an hour for a tenant, $0.50 an hour for a
# user, 20 calls an hour for a feature's cost per call, which is an average and does not depend on how
# many days there are). With these volumes an ordinary tenant-day stays under $5 (at most $3.93 over 250
# simulated days) and every hour well under its minimums, so ordinary days never fire whatever the table
# holds: only the incident does.
WEEKDAY_CALLS = {"acme": 750, "globex": 480, "initech": 1000, "umbrella": 770}
WEEKEND_SHARE = 0.3
HOURLY_SHAPE = (3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 8, 8, 7, 8, 8, 8, 7, 6, 5, 5, 4, 4, 3, 3)  # UTC office hours
INCIDENT_DAYS_AGO = 4  # inside the report's 7-day trend
INCIDENT_CALLS = 500


def history_day(day: date, until: datetime) -> list[dict[str, Any]]:
    """One day of ordinary traffic (events stamped before ``until``), oldest first. Seeded by the date
    and with ids made of it, so that running the demo again sends the same events, which the pipeline
    counts once."""
    rng = random.Random(f"tokenmeter-demo-{day.isoformat()}")
    share = WEEKEND_SHARE if day.weekday() >= 5 else 1.0
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    events = []
    for tenant in WORKLOAD.tenants:
        count = int(WEEKDAY_CALLS[tenant.name] * share * rng.uniform(0.9, 1.1))
        events += replace(WORKLOAD, tenants=(tenant,)).events(
            count,
            seed=f"tokenmeter-demo-{day.isoformat()}-{tenant.name}",
            start=midnight,
            span=timedelta(days=1),
            daily_shape=HOURLY_SHAPE,
            prefix=f"demo-{day.isoformat()}-{tenant.name}",
        )
    return sorted((e for e in events if e["timestamp"] < until), key=lambda e: e["timestamp"])


def incident(day: date) -> list[dict[str, Any]]:
    """initech re-runs its nightly classification over the whole archive on o3, at 14:00 and 15:00
    UTC: about 20× its usual day, and a cost per call of its ``classify`` feature far above normal."""
    rng = random.Random(f"tokenmeter-demo-incident-{day.isoformat()}")
    start = datetime(day.year, day.month, day.day, 14, tzinfo=UTC)
    return [
        {
            "event_id": f"demo-{day.isoformat()}-rerun-{i}",
            "timestamp": start + timedelta(seconds=7200 * i / INCIDENT_CALLS),
            "tenant_id": "initech",
            "provider": "openai",
            "model": "o3",
            "feature": "classify",
            "user_id": "svc-batch",
            "environment": "prod",
            "input_tokens": int(rng.lognormvariate(9.4, 0.3)),
            "output_tokens": rng.randint(900, 1800),
            "latency_ms": int(rng.lognormvariate(8.5, 0.4)),
        }
        for i in range(INCIDENT_CALLS)
    ]


def history(now: datetime) -> list[dict[str, Any]]:
    """The backfill, oldest first: each tenant's events reach stage 2 in order (one partition per tenant),
    so the incident is judged against the days before it, already in the worker's table."""
    today = now.date()
    events: list[dict[str, Any]] = []
    for back in range(HISTORY_DAYS, -1, -1):  # today too, up to a minute ago
        day = today - timedelta(days=back)
        day_events = history_day(day, now - timedelta(minutes=1))
        if back == INCIDENT_DAYS_AGO:
            day_events = sorted(day_events + incident(day), key=lambda e: e["timestamp"])
        events += day_events
    return events


@dataclass
class Backfill:
    events: int
    seconds: float
    anomalies: list[dict[str, Any]]


def backfill_history(settings: Settings, console: Console, now: datetime) -> Backfill:
    """Send the history through ``usage.raw`` and wait until the worker has metered and judged it."""
    started = time.monotonic()
    events = history(now)
    columns = (TextColumn("    {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with UsageProducer(settings) as producer, Progress(*columns, console=console) as progress:
        sent = progress.add_task("recorded (UsageProducer → usage.raw)", total=len(events))
        metered = progress.add_task("metered by the worker (stage 1)", total=len(events))
        judged = progress.add_task("windows and anomaly rules (stage 2)", total=1)
        for number, event in enumerate(events, 1):
            producer.record(event)
            if number % 5000 == 0:
                progress.update(sent, completed=number)
        producer.flush(60)
        progress.update(sent, completed=len(events))

        def advance(behind: int) -> None:
            progress.update(metered, completed=max(0, len(events) - behind))

        if not wait_for_sinks(settings, 300, on_progress=advance):
            console.print("[yellow]    the worker is slow; going on without waiting for it[/]")
        progress.update(metered, completed=len(events))
        wait_for_sinks(settings, 120, topic=settings.topic_rollups, group=settings.worker_id)
        progress.update(judged, completed=1)
    first_day = now.date() - timedelta(days=HISTORY_DAYS)
    return Backfill(len(events), time.monotonic() - started, history_anomalies(settings, first_day, now.date()))


def _window_day(alert: dict[str, Any]) -> date | None:
    """The day an anomaly alert's window starts (``period`` is ``hour:<ISO start>`` or ``day:<ISO start>``)."""
    try:
        return datetime.fromisoformat(alert["period"].split(":", 1)[1]).astimezone(UTC).date()
    except (ValueError, IndexError):
        return None


def history_anomalies(settings: Settings, first_day: date, today: date) -> list[dict[str, Any]]:
    """Anomaly alerts whose window lies in the backfilled days (fired now, or by an earlier demo run)."""
    found = []
    with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
        for tenant in TENANTS:
            for alert in list_alerts(conn, tenant, limit=100_000):
                day = _window_day(alert)
                if alert["kind"].startswith("anomaly.") and day is not None and first_day <= day < today:
                    found.append(alert)
    return sorted(found, key=lambda a: (a["period"].split(":", 1)[1], a["kind"]))


# ---------------------------------------------------------------- budgets and live traffic
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
        Budget(
            "initech", "feature", "agent", "month", (spent("initech", "agent") + max(agent, Decimal(1))).quantize(cents)
        ),
    ]
    # librdkafka's lines go through logging (producers/kafka_logging.py), not onto the demo's screen.
    config = kafka_config(settings, **{"enable.idempotence": True, "logger": KafkaLogger()})
    producer = Producer(config)
    for budget in budgets:
        producer.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    producer.flush(15)
    return budgets


def _alerts_since(settings: Settings, since: datetime) -> list[dict[str, Any]]:
    """The demo tenants' alerts created since ``since``, oldest first."""
    try:
        with psycopg.connect(settings.database_url, connect_timeout=3) as conn:
            found = [
                a
                for tenant in TENANTS
                for a in list_alerts(conn, tenant, limit=100_000)
                if a["created_at"] >= since.isoformat()
            ]
    except psycopg.OperationalError:
        return []
    return sorted(found, key=lambda a: (a["created_at"], a["alert_id"]))


@dataclass(order=True)
class _Call:
    """A model call in flight: reserved, not yet returned."""

    done_at: float
    number: int
    event: dict[str, Any] = field(compare=False)
    reservation: Reservation = field(compare=False)
    actual_cost: Decimal = field(compare=False)


@dataclass
class Services:
    """The tenants' services: each call reserves its largest possible cost before it is made (the prompt's
    input tokens and the request's ``max_tokens``, priced now), returns after its latency, and commits
    what it actually cost; a refused reservation means the call is not made. Calls overlap as they do
    in real services, so each tenant has up to a second's worth of reservations in flight."""

    quota: QuotaClient
    producer: UsageProducer
    in_flight: list[_Call] = field(default_factory=list)
    held: dict[str, Decimal] = field(default_factory=lambda: dict.fromkeys(TENANTS, Decimal(0)))  # in flight
    calls_in_flight: Counter[str] = field(default_factory=Counter)
    most_held: dict[str, tuple[Decimal, int]] = field(default_factory=dict)  # the peak: amount, calls
    refused: Counter[str] = field(default_factory=Counter)
    last_refusal: dict[str, str] = field(default_factory=dict)
    made: int = 0

    def call(self, event: dict[str, Any], now: float) -> bool:
        tenant = event["tenant_id"]
        provider, model, prompt = event["provider"], event["model"], event["input_tokens"]
        output_cap = max(MAX_OUTPUT_TOKENS, event["output_tokens"])
        estimate = estimate_cost(provider, model, prompt, output_cap) or Decimal(0)
        reservation = self.quota.reserve(
            tenant,
            estimate,
            event.get("feature"),
            event.get("user_id"),
            environment=event.get("environment"),
            tokens=prompt + output_cap,
        )
        if not reservation.allowed:
            self.refused[tenant] += 1
            self.last_refusal[tenant] = reservation.reason
            return False
        actual = estimate_cost(provider, model, prompt, event["output_tokens"], event.get("cache_read_tokens", 0))
        self.made += 1
        heapq.heappush(
            self.in_flight, _Call(now + event["latency_ms"] / 1000, self.made, event, reservation, actual or Decimal(0))
        )
        self.held[tenant] = self.held.get(tenant, Decimal(0)) + estimate
        self.calls_in_flight[tenant] += 1
        if self.held[tenant] > self.most_held.get(tenant, (Decimal(0), 0))[0]:
            self.most_held[tenant] = (self.held[tenant], self.calls_in_flight[tenant])
        return True

    def returned(self, now: float | None) -> int:
        """Record and commit the calls that have returned by ``now`` (all of them if None)."""
        finished = 0
        while self.in_flight and (now is None or self.in_flight[0].done_at <= now):
            call = heapq.heappop(self.in_flight)
            self.producer.record(call.event)  # stamped now: the call's end
            self.quota.commit(call.reservation, call.actual_cost)
            self._landed(call)
            finished += 1
        return finished

    def abandon(self) -> None:
        """Stopped mid-call (Ctrl-C): the calls in flight are cancelled, their reservations freed."""
        for call in self.in_flight:
            self.quota.release(call.reservation)
            self._landed(call)
        self.in_flight.clear()

    def _landed(self, call: _Call) -> None:
        self.held[call.event["tenant_id"]] -= call.reservation.amount
        self.calls_in_flight[call.event["tenant_id"]] -= 1


def _panel(
    sent: int,
    rate: float,
    elapsed: float,
    duration: float | None,
    spend: dict[str, Any],
    alerts: list[dict[str, Any]],
    services: Services,
) -> Group:
    head = f"{elapsed:5.0f}s" + (f" / {duration:.0f}s" if duration else " (Ctrl-C to stop)")
    table = Table(
        title=f"live spend this month — {sent:,} calls made, {rate:,.0f} calls/s, {head}",
        title_justify="left",
        expand=True,
    )
    for column in ("tenant", "spent", "budget", "reserved in flight", "reserve()"):
        table.add_column(column)
    for tenant, decision in spend.items():
        kind = "hard" if "hard" in decision.reason else "soft"
        budget = "" if decision.limit is None else f"{usd(decision.limit)} ({kind})"
        refused = services.refused[tenant]
        verdict = f"[bold red]refused {refused:,} calls[/]" if refused else "[green]allowed[/]"
        table.add_row(cell(tenant), usd(decision.spent), budget, usd(services.held[tenant]), verdict)
    # Alert messages carry tenant, feature and user names: printed literally (deploy/output.py).
    lines = [Text.assemble(cell(a["kind"], style="yellow"), " ", cell(usd_in_text(a["message"]))) for a in alerts[-6:]]
    recent = Text("\n").join(lines) if lines else Text("none yet", style="dim")
    refusal = services.last_refusal.get("globex")
    footer = Text(f"globex, last refusal: {refusal}", style="dim") if refusal else Text("")
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


# What a person should see first in the list of live alerts: budgets, the planted incidents, then spikes.
_ALERT_ORDER = (
    "budget.blocked",
    "budget.threshold",
    "anomaly.runaway_loop",
    "anomaly.cost_per_call_jump",
    "anomaly.daily_spend_spike",
    "anomaly.spend_spike",
    "anomaly.user_spike",
)


def _print_alerts(console: Console, alerts: list[dict[str, Any]], limit: int = 20) -> None:
    counts = Counter(a["kind"] for a in alerts)
    console.print("  by kind: " + ", ".join(f"{kind} × {n}" for kind, n in sorted(counts.items())))
    rank = {kind: n for n, kind in enumerate(_ALERT_ORDER)}
    for a in sorted(alerts, key=lambda a: rank.get(a["kind"], len(rank)))[:limit]:
        message = usd_in_text(a["message"])
        console.print(Text.assemble("  ", cell(f"{a['kind']:<28}", style="yellow"), " ", cell(message)))
    if len(alerts) > limit:
        console.print(f"  … and {len(alerts) - limit} more (tokenmeter alerts list)")
    if counts["anomaly.user_spike"] or counts["anomaly.spend_spike"]:
        console.print(
            "  [dim](the live part plays hundreds of calls a second against a history of a few "
            "thousand a day: the hourly and daily rules flag it, for tenants and busy users)[/]"
        )


def _start_dashboard(settings: Settings, port: int, console: Console) -> Any:
    if not port:
        return None
    from deploy.dashboard import start_in_background, url_of

    try:
        server = start_in_background(settings, "127.0.0.1", port)
    except OSError as exc:
        console.print(
            f"    [dim]no dashboard: port {port} is taken ({exc.strerror}); try tokenmeter dashboard --port N[/]"
        )
        return None
    console.print(f"    live dashboard while the demo runs: [bold]{url_of(server)}[/]")
    return server


def run_demo(
    settings: Settings, duration: float | None, rate: int, console: Console, dashboard_port: int = 8050
) -> Path:
    console.rule("[bold]tokenmeter demo")
    stack = LocalStack(settings)
    console.print("1/6 local stack (Kafka, Postgres, Redis) …")
    stack.up(progress=lambda m: console.print(f"    {m}", highlight=False))
    for change in ensure_topics(settings):
        if change.action != "unchanged":
            console.print(f"    topic {change.topic}: {change.action}")
    console.print("2/6 starting a worker (tokenmeter worker) …")
    log_dir = settings.home / "demo"
    log_dir.mkdir(parents=True, exist_ok=True)
    worker = WorkerProcess(settings, log_dir)
    worker.start(loglevel="warning")
    dashboard = _start_dashboard(settings, dashboard_port, console)
    try:
        console.print(
            f"3/6 history: {HISTORY_DAYS} days of the four tenants' traffic, oldest first, backfilled "
            "through the pipeline …"
        )
        backfill = backfill_history(settings, console, datetime.now(UTC))
        console.print(
            f"    {backfill.events:,} calls over {HISTORY_DAYS} days metered in {backfill.seconds:.0f}s; "
            f"anomalies the rules found in the history ({len(backfill.anomalies)}):"
        )
        for a in backfill.anomalies:
            day = _window_day(a)
            console.print(
                Text.assemble(
                    "    ",
                    cell(f"{day} ", style="dim"),
                    cell(f"{a['kind']:<28}", style="yellow"),
                    " ",
                    cell(usd_in_text(a["message"])),
                )
            )
        quota = QuotaClient(settings)
        budgets = _set_budgets(settings, quota, rate, duration)
        console.print(
            "4/6 budgets: "
            + "; ".join(f"{b.scope_label} ${b.limit}/{b.period}{' hard' if b.hard else ''}" for b in budgets)
        )
        console.print(
            f"5/6 traffic: {rate} calls/s from 4 tenants' services, each call reserve() → call → commit()"
            + (f" for {duration:.0f}s" if duration else " until Ctrl-C")
        )
        started_at = datetime.now(UTC)
        traffic = Traffic(time.monotonic())
        window: list[float] = []
        spend: dict[str, Any] = {}
        alerts: list[dict[str, Any]] = []
        last_refresh = 0.0
        with UsageProducer(settings) as producer, Live(console=console, refresh_per_second=4) as live:
            services = Services(quota, producer)
            try:
                for now in _paced_calls(rate, duration):
                    services.returned(now)
                    if services.call(traffic.call(now), now):
                        window.append(now)
                    if now - last_refresh >= 0.5:
                        last_refresh = now
                        window = [t for t in window if now - t <= 2.0]
                        spend = {tenant: quota.check(tenant) for tenant in TENANTS}
                        if int(now) % 2 == 0:
                            alerts = _alerts_since(settings, started_at)
                        live.update(
                            _panel(
                                services.made,
                                len(window) / 2.0,
                                now - traffic.started,
                                duration,
                                spend,
                                alerts,
                                services,
                            )
                        )
                services.returned(None)  # time is up: the calls in flight return
            except KeyboardInterrupt:
                console.print("stopping traffic …")
                services.abandon()
        console.print()
        console.print("6/6 waiting for the pipeline to catch up (tokenmeter lag --wait) …")
        caught_up = wait_for_sinks(settings, timeout=120)
        # Budget alerts come from stage 2 (Faust, consumer group = worker id) reading metering.rollups.
        caught_up = caught_up and wait_for_sinks(settings, 60, topic=settings.topic_rollups, group=settings.worker_id)
        if not caught_up:
            console.print("[yellow]the worker is still behind; the report may miss the last events[/]")
    finally:
        worker.stop()
        if dashboard is not None:
            dashboard.shutdown()
    alerts = _alerts_since(settings, started_at)
    console.print(f"\n[bold]{len(alerts)} alerts fired during the live part[/] (tokenmeter alerts list):")
    _print_alerts(console, alerts)
    _print_hard_budget(console, quota, budgets[0], services)
    with psycopg.connect(settings.database_url) as conn:
        report = build_report(conn, None, parse_period("month"))
    print_report(report, console)
    html_path = settings.home / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    console.rule()
    console.print(f"HTML report with charts: {html_path}")
    console.print(
        "The stack is still up. Try: tokenmeter dashboard · tokenmeter report --tenant initech · "
        "tokenmeter quota check --tenant globex · tokenmeter invoice --tenant acme --period "
        f"{started_at:%Y-%m} · tokenmeter alerts list · tokenmeter dev down"
    )
    return html_path


def _print_hard_budget(console: Console, quota: QuotaClient, budget: Budget, services: Services) -> None:
    """globex's hard budget, honestly: what it allowed, what was spent, and the bound on the overrun.

    A reservation is admitted only while spend + held + this estimate fit the limit, and a committed
    cost stays held until the pipeline has counted it; estimates cover the largest output a call may
    write. So the overrun can only come from calls in flight, and is at most what they had reserved."""
    spent = quota.check(budget.tenant_id).spent
    overrun = max(Decimal(0), spent - budget.limit)
    most, calls = services.most_held.get(budget.tenant_id, (Decimal(0), 0))
    within = overrun <= most
    console.print(
        f"\n[bold]{budget.tenant_id}'s hard budget[/]: limit {usd(budget.limit)}, spent {usd(spent)}, "
        f"overrun {usd(overrun)}; at most {usd(most)} was reserved by its calls in flight ({calls} calls); "
        f"{services.refused[budget.tenant_id]:,} calls refused by reserve() and not made — "
        + ("[green]overrun within the in-flight reservations[/]" if within else "[bold red]OVERRUN EXCEEDS THEM[/]")
    )
    console.print(f"    exact: limit={budget.limit} spent={spent} overrun={overrun} in_flight_max={most}", style="dim")
