"""``tokenmeter dashboard``: a small local page that watches the pipeline work.

Standard library only (``http.server``), no build step: ``/`` is a static page whose script fetches
``/api/summary`` every few seconds and fills its tables with ``textContent`` (names come from usage
data, so they are never parsed as HTML). The summary is what the rest of the product already reads:

- spend per tenant today and this month, and budgets with the percentage used: the Redis values the
  quota checks decide on (``schemas.redis_keys``, ``producers.quota.decide``), each period in the
  tenant's time zone;
- the latest alerts, from Postgres (``tokenmeter.alerts``);
- the pipeline: what each stage has still to do (``streams.lag.measure_lag``) and how old the spend
  data is (``schemas.redis_keys.caught_up_ms``).

Money in the JSON is exact (decimal strings); the page shows it rounded as the tables do
(``deploy.output.usd``: cents) and keeps the exact amount in each cell's ``title``. One summary is built
at a time and reused for a second, so several open tabs cost the stores no more than one.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import redis

from deploy.output import usd, usd_in_text
from deploy.settings import Settings, redis_client
from producers.quota import decide
from schemas.periods import PERIODS
from schemas.records import ALERT_FIELDS
from schemas.redis_keys import (
    budget_pattern,
    caught_up_ms,
    freshness_key,
    parse_scope_key,
    spend_key,
    spend_pattern,
    spend_value,
)
from streams.lag import measure_lag

REFRESH_S = 3.0  # how often the page asks for a new summary
CACHE_S = 1.0  # a summary younger than this is served again
MAX_ROWS = 50  # tenants and budgets shown (the biggest first); the JSON says how many there are
ALERTS = 20


def money(value: Decimal) -> dict[str, str]:
    """Exact for machines, cents for people (``deploy.output.usd``): ``{"exact": "12.345678", "shown": "$12.35"}``."""
    exact = f"{value.normalize():f}" if value else "0"
    return {"exact": exact, "shown": usd(value)}


def _scan(client: redis.Redis, pattern: str) -> list[str]:
    """Every key matching ``pattern`` (on a cluster, ``scan_iter`` walks every primary)."""
    return sorted(k.decode() if isinstance(k, bytes) else str(k) for k in client.scan_iter(match=pattern, count=1000))


def _mget(client: redis.Redis, keys: list[str]) -> list[Any]:
    """Values of keys of many tenants: on a cluster they span slots, which one MGET cannot."""
    if isinstance(client, redis.RedisCluster):
        return client.mget_nonatomic(keys)
    return client.mget(keys)


def tenant_spend(client: redis.Redis, now: datetime) -> list[dict[str, Any]]:
    """Every tenant with spend this month (in its zone), biggest first: today and month-to-date."""
    month_keys, tenants = [], []
    for key in _scan(client, spend_pattern("tenant", "", "month")):
        scope = parse_scope_key(key)
        if scope is not None and scope.dimension == "tenant" and scope.rest == "month":
            month_keys.append(key)
            tenants.append(scope.tenant_id)
    if not tenants:
        return []
    day_keys = [spend_key(tenant, "tenant", "", "day") for tenant in tenants]
    values = _mget(client, month_keys + day_keys)
    rows = []
    for i, tenant in enumerate(tenants):
        try:
            month, today = spend_value(values[i], now), spend_value(values[len(tenants) + i], now)
        except (ValueError, ArithmeticError):
            continue  # a value no worker wrote: the quota check could not read it either
        if month or today:
            rows.append((tenant, today, month))
    rows.sort(key=lambda row: (-row[2], row[0]))
    return [{"tenant_id": t, "today": money(today), "month": money(month)} for t, today, month in rows]


def budgets(client: redis.Redis, now: datetime) -> list[dict[str, Any]]:
    """Every budget the quota checks see (``schemas.redis_keys.budget_key``), with its spend in its period;
    fullest first."""
    scopes = []
    for key in _scan(client, budget_pattern()):
        scope = parse_scope_key(key)
        if scope is None or scope.kind != "budget" or scope.rest:
            continue  # not a key this version writes
        scopes.append((key, scope.tenant_id, scope.dimension, scope.value))
    raw_budgets = _mget(client, [key for key, *_ in scopes]) if scopes else []
    spend_keys = [
        spend_key(tenant, dimension, value, period) for _, tenant, dimension, value in scopes for period in PERIODS
    ]
    raw_spend = _mget(client, spend_keys) if spend_keys else []
    rows = []
    for i, ((_, tenant, dimension, value), raw) in enumerate(zip(scopes, raw_budgets, strict=True)):
        if not raw:
            continue
        try:
            spend = {
                (dimension, value, period): spend_value(raw_spend[len(PERIODS) * i + j], now)
                for j, period in enumerate(PERIODS)
            }
            decision = decide(tenant, [(dimension, value)], [raw], spend)
            hard = bool(json.loads(raw).get("hard"))
        except (ValueError, KeyError, TypeError, ArithmeticError):
            continue  # a value no worker wrote: the quota check would not use it either
        if decision.limit is None:
            continue
        percent = decision.spent * 100 / decision.limit if decision.limit else Decimal(0)
        rows.append(
            {
                "tenant_id": tenant,
                "dimension": dimension,
                "value": value,
                "scope": decision.scope,
                "period": decision.period,
                "hard": hard,
                "limit": money(decision.limit),
                "spent": money(decision.spent),
                "percent": f"{percent.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}",
                "allowed": decision.allowed,
            }
        )
    rows.sort(key=lambda row: (-Decimal(str(row["percent"])), str(row["scope"])))
    return rows


def latest_alerts(conn: psycopg.Connection, limit: int = ALERTS) -> list[dict[str, Any]]:
    """The newest alerts first (``sinks.alerts.list_alerts`` lists the oldest first)."""
    columns = ", ".join(f'"{name}"' for name in ALERT_FIELDS)
    rows = conn.execute(
        f"SELECT {columns} FROM tokenmeter.alerts ORDER BY created_at DESC, alert_id LIMIT %s", (limit,)
    ).fetchall()
    alerts = []
    for row in rows:
        alert = dict(zip(ALERT_FIELDS, row, strict=True))
        when = alert["created_at"].astimezone(UTC).isoformat(timespec="seconds")
        alerts.append(
            {
                "created_at": when,
                "kind": alert["kind"],
                "tenant_id": alert["tenant_id"],
                "message": alert["message"],
                "message_shown": usd_in_text(alert["message"]),
            }
        )
    return alerts


def pipeline_lag(settings: Settings) -> dict[str, int]:
    """What each stage has still to do: usage events (stage 1), rollup batches (stage 2)."""
    return {
        "stage 1 (usage events to meter)": sum(p.lag for p in measure_lag(settings)),
        "stage 2 (rollup batches for alerts)": sum(
            p.lag for p in measure_lag(settings, settings.topic_rollups, group=settings.worker_id)
        ),
    }


def _section(errors: dict[str, str], name: str, build: Callable[[], Any], empty: Any) -> Any:
    """One part of the summary; a store that is down shows as an error beside the others."""
    try:
        return build()
    except Exception as exc:  # any store error: the page says so and keeps refreshing the rest
        errors[name] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        return empty


class Summary:
    """Builds ``/api/summary`` (one at a time, reused for ``CACHE_S``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_client(settings, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._lock = threading.Lock()
        self._built = 0.0
        self._last: dict[str, Any] = {}

    def get(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._built >= CACHE_S or not self._last:
                self._last = self.build()
                self._built = time.monotonic()
            return self._last

    def build(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        errors: dict[str, str] = {}
        tenants = _section(errors, "redis", lambda: tenant_spend(self.redis, now), [])
        scoped = _section(errors, "redis", lambda: budgets(self.redis, now), [])

        def alerts() -> list[dict[str, Any]]:
            with psycopg.connect(self.settings.database_url, connect_timeout=3) as conn:
                return latest_alerts(conn)

        def data_age() -> float | None:
            now_ms = int(now.timestamp() * 1000)
            beats: dict[bytes, bytes] = self.redis.hgetall(freshness_key(self.settings.worker_id))  # type: ignore[assignment]
            caught_up = caught_up_ms(beats, now_ms)
            return None if caught_up is None else round(max(0, now_ms - caught_up) / 1000, 1)

        return {
            "generated_at": now.isoformat(timespec="seconds"),
            "refresh_s": REFRESH_S,
            "tenants": tenants[:MAX_ROWS],
            "tenants_total": len(tenants),
            "budgets": scoped[:MAX_ROWS],
            "budgets_total": len(scoped),
            "alerts": _section(errors, "postgres", alerts, []),
            "lag": _section(errors, "kafka", lambda: pipeline_lag(self.settings), {}),
            "spend_data_age_s": _section(errors, "redis", data_age, None),
            "errors": errors,
        }


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenmeter dashboard</title>
<link rel="stylesheet" href="/dashboard.css">
<script src="/dashboard.js" defer></script>
</head>
<body>
<header><h1>tokenmeter</h1><span id="status">loading…</span></header>
<p id="errors" hidden></p>
<main>
<section><h2>Spend per tenant <small id="tenants-note"></small></h2>
<table><thead><tr><th>tenant</th><th class="num">today</th><th class="num">this month</th></tr></thead>
<tbody id="tenants"></tbody></table></section>
<section><h2>Budgets <small id="budgets-note"></small></h2>
<table><thead><tr><th>scope</th><th>period</th><th class="num">spent</th><th class="num">limit</th>
<th>used</th><th>quota</th></tr></thead><tbody id="budgets"></tbody></table></section>
<section><h2>Pipeline</h2><table><tbody id="lag"></tbody></table></section>
<section><h2>Latest alerts</h2>
<table><thead><tr><th>when (UTC)</th><th>kind</th><th>tenant</th><th>message</th></tr></thead>
<tbody id="alerts"></tbody></table></section>
</main>
<footer>Amounts are rounded to cents; hover for the exact value. JSON: <a href="/api/summary">/api/summary</a></footer>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5rem 1.5rem; color: #1d2433; background: #f6f7f9; }
header { display: flex; align-items: baseline; gap: 1rem; }
h1 { font-size: 1.4rem; margin: 1rem 0 0.5rem; }
h2 { font-size: 1rem; margin: 0 0 0.5rem; }
small { color: #667; font-weight: normal; }
main { display: grid; grid-template-columns: minmax(0, 1fr); gap: 1rem; }
@media (min-width: 1000px) { main { grid-template-columns: minmax(300px, 1fr) minmax(0, 2fr); } }
section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 0.75rem 1rem; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.2rem 0.5rem; border-bottom: 1px solid #eef0f4; vertical-align: top; }
th { font-weight: 600; color: #445; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
meter { width: 5rem; vertical-align: middle; }
.nowrap { white-space: nowrap; }
.blocked { color: #b3261e; font-weight: 600; }
.ok { color: #2e7d32; }
#status { color: #667; }
#errors { background: #fdecea; color: #b3261e; padding: 0.5rem 1rem; border-radius: 6px; }
footer { margin-top: 1rem; color: #667; }
"""

SCRIPT = """"use strict";
// Names come from usage data: every value goes in with textContent, never as HTML.
function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}
function moneyCell(amount) {
  const td = cell(amount.shown, "num");
  td.title = "$" + amount.exact + " (exact)";
  return td;
}
function row(cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}
function note(id, shown, total) {
  document.getElementById(id).textContent = total > shown ? "(" + shown + " of " + total + ")" : "";
}
function render(data) {
  const tenants = data.tenants.map(t => row([cell(t.tenant_id), moneyCell(t.today), moneyCell(t.month)]));
  if (!tenants.length) tenants.push(row([cell("no spend this month yet")]));
  document.getElementById("tenants").replaceChildren(...tenants);
  note("tenants-note", data.tenants.length, data.tenants_total);
  const budgets = data.budgets.map(b => {
    const used = document.createElement("td");
    const bar = document.createElement("meter");
    bar.min = 0; bar.max = 100; bar.low = 80; bar.high = 99.9; bar.optimum = 0;  // red once spent
    bar.value = Math.min(Number(b.percent), 100);
    used.className = "nowrap";
    used.append(bar, " " + b.percent + "%");
    const quota = b.allowed ? cell("allowed", "ok") : cell("BLOCKED", "blocked");
    return row([cell(b.scope), cell((b.hard ? "hard " : "soft ") + b.period, "nowrap"), moneyCell(b.spent),
                moneyCell(b.limit), used, quota]);
  });
  if (!budgets.length) budgets.push(row([cell("no budgets set")]));
  document.getElementById("budgets").replaceChildren(...budgets);
  note("budgets-note", data.budgets.length, data.budgets_total);
  const lag = Object.entries(data.lag).map(([stage, behind]) =>
    row([cell(stage), cell(behind.toLocaleString() + " behind", "num")]));
  const age = data.spend_data_age_s;
  lag.push(row([cell("spend data age (quota checks)"), cell(age === null ? "no worker yet" : age + " s", "num")]));
  document.getElementById("lag").replaceChildren(...lag);
  const alerts = data.alerts.map(a => {
    const message = cell(a.message_shown);
    if (a.message_shown !== a.message) message.title = a.message + " (exact)";
    return row([cell(a.created_at.slice(0, 19).replace("T", " "), "nowrap"), cell(a.kind), cell(a.tenant_id), message]);
  });
  if (!alerts.length) alerts.push(row([cell("none yet")]));
  document.getElementById("alerts").replaceChildren(...alerts);
  const errors = Object.entries(data.errors).map(([store, message]) => store + ": " + message);
  const box = document.getElementById("errors");
  box.textContent = errors.join(" · ");
  box.hidden = errors.length === 0;
  document.getElementById("status").textContent = "updated " + data.generated_at.slice(11, 19) + " UTC";
}
async function refresh() {
  let wait = 3000;
  try {
    const response = await fetch("/api/summary", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const data = await response.json();
    wait = data.refresh_s * 1000;
    render(data);
  } catch (error) {
    document.getElementById("status").textContent = "cannot reach the dashboard server (" + error.message + ")";
  }
  setTimeout(refresh, wait);
}
refresh();
"""

_SECURITY_HEADERS = {
    # Only this server's own script, style and JSON; no framing (clickjacking), no sniffing.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: str) -> str:
    """``[::1]:8050`` → ``::1``; ``localhost:8050`` → ``localhost``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def make_handler(summary: Summary, bound_host: str) -> type[BaseHTTPRequestHandler]:
    static = {
        "/": ("text/html; charset=utf-8", PAGE.encode()),
        "/dashboard.js": ("text/javascript; charset=utf-8", SCRIPT.encode()),
        "/dashboard.css": ("text/css; charset=utf-8", STYLE.encode()),
    }
    loopback_only = _is_loopback(bound_host)

    class Handler(BaseHTTPRequestHandler):
        server_version = "tokenmeter-dashboard"

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: a page refreshing every few seconds would fill the terminal."""

        def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in _SECURITY_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            # Served on loopback, answer only to loopback names: a web page elsewhere cannot read spend
            # through a DNS name rebound to 127.0.0.1.
            if loopback_only and _host_name(self.headers.get("Host", "")).lower() not in _LOOPBACK_NAMES:
                self._send(HTTPStatus.MISDIRECTED_REQUEST, "text/plain; charset=utf-8", b"unknown host\n")
                return
            path = self.path.split("?", 1)[0]
            if path == "/api/summary":
                body = json.dumps(summary.get()).encode()
                self._send(HTTPStatus.OK, "application/json", body)
            elif path in static:
                self._send(HTTPStatus.OK, *static[path])
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

        do_HEAD = do_GET

    return Handler


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 8050) -> ThreadingHTTPServer:
    """The dashboard server, bound (OSError if the port is taken); ``serve_forever`` runs it."""
    server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), make_handler(Summary(settings), host))
    server.daemon_threads = True
    return server


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    name = str(host)
    if name in ("0.0.0.0", "::"):
        name = "127.0.0.1"
    return f"http://{f'[{name}]' if ':' in name else name}:{port}/"


def start_in_background(settings: Settings, host: str = "127.0.0.1", port: int = 8050) -> ThreadingHTTPServer:
    """For the demo: serve on a daemon thread (stopped with ``shutdown()`` or at exit)."""
    server = make_server(settings, host, port)
    threading.Thread(target=server.serve_forever, name="tokenmeter-dashboard", daemon=True).start()
    return server
