"""The worker (``tokenmeter worker``): one Faust app running both stages of the pipeline.

Stage 1, ``streams/meter.py``: usage.raw in batches → validate, de-duplicate, price → Postgres
(ledger + rollups), Redis (spend per scope), usage.priced, usage.dlq and metering.rollups (absolute
window totals). It runs in a child process (started and restarted by a Faust task, killed with the
worker), so the two stages use both cores.

Stage 2, the Faust agent below: metering.rollups (hour, day, ISO week and month windows per tenant and
per tenant × feature / model / user / environment of the live scopes, ``streams/live.py``) → the
windowed ``rollups`` table (day windows, kept 8 days: the anomaly rules' history), and the alerts that
follow: budget thresholds → ``alerts.budget``; unknown models and the anomaly rules of
``streams/anomaly.py`` → ``alerts.anomaly``; each alert once, keyed in Postgres by its deterministic id
(recent ids are remembered in memory to save Postgres the lookup).

Exactly once, end to end: stage 1 commits a batch's offsets only after Postgres, Redis and Kafka
hold its results. Postgres de-duplicates by ``event_id`` (``tokenmeter.ledger_ids``' primary key, forever), and
every other output carries absolute values read back from Postgres in the same transaction, so a
replay after a crash rewrites the same numbers instead of adding them again. Stage 2's table holds
those absolute values too, so it cannot double count either. We do not use Faust's
``processing_guarantee="exactly_once"``: it would not cover Postgres or Redis, and its open issues
(robinhood/faust#340 lost table counts after kill -9, faust-streaming#517 duplicates despite it,
#440 crash on start) are about exactly the failures this design must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import ssl
import sys
import time
from collections.abc import Callable, Collection, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import faust
import psycopg
import redis
from aiokafka.partitioner import murmur2

from deploy.settings import Settings, faust_brokers, get_settings, kafka_config, redis_client
from schemas import codec
from schemas.periods import local_date, local_midnight, period_end
from schemas.records import Alert, Rollup, money
from schemas.redis_keys import budget_key, rate_limit_key, stale_calls_field, stale_calls_key
from sinks.alerts import store_alerts, top_contributors
from sinks.retry import with_backoff
from sinks.summaries import summarize_pending
from sinks.webhooks import deliver_pending
from streams import heap, metrics
from streams.anomaly import Finding, Window, cost_per_call_jump, daily_spend_spike, spend_spike, user_spike
from streams.budgets import Budget, ConfigRecord, budget_alerts, overrun_alerts, parse_config_record
from streams.config_topic import ConfigFollower
from streams.credits import CreditFollower
from streams.health import Health
from streams.lag import measure_lag
from streams.meter import SESSION_TIMEOUT_S, optional, run_stage_one
from streams.pipeline import RecentIds

log = logging.getLogger("tokenmeter.worker")

# The windows the worker's table keeps, and how long after they end (Postgres keeps everything): the
# anomaly rules read the 7 days before a window; budgets and the rest use the absolute values that
# arrive with each batch, so no other window needs keeping. Keys of other granularities (from older
# versions) count as expired.
TABLE_RETENTION = {"day": timedelta(days=8)}
# TABLE_WRITE_INTERVAL (``worker_table_write_interval_s``, 5 s): how often the day windows' newest values go to
# the table (its changelog). Every batch used to write each day window it touched: ~2,000 table writes per
# 10,000 events in the bench (a user's day window per batch), ~4 of stage 2's 8 µs of CPU per event and ~2 of
# the broker's 6. The rules read the newest values meanwhile (``UnwrittenWindows``). They are also written when
# partitions are handed over, when the worker stops and before the supervisor makes it exit; a worker killed
# outright (SIGKILL, out of memory) loses at most that long of day-window updates, which the window's next
# batch writes again (values are absolute). A window with no later batch (its day over, its scope quiet) keeps
# the older value: the anomaly rules' baseline, which bills nothing, is then short by those seconds of that
# scope and day.
# Alert ids this process has stored lately, so a threshold that stays crossed batch after batch is not
# sent to Postgres each time; Postgres is what keeps each alert once, so forgetting one costs a lookup.
RECENT_ALERTS = 100_000
_WINDOW_LENGTH = {
    "minute": timedelta(minutes=1),
    "hour": timedelta(hours=1),
    "day": timedelta(days=1),
    "week": timedelta(days=7),
    "month": timedelta(days=31),
}
_SEP = "\x1f"  # cannot occur in ids (control characters are not sent by services; if one is, keys stay distinct)


def window_key(tenant_id: str, granularity: str, start: datetime, dimension: str, value: str) -> str:
    """The ``rollups`` table key of one window of one scope."""
    return _SEP.join((tenant_id, granularity, start.isoformat(), dimension, value))


def tenant_partition(tenant_id: str, partitions: int) -> int:
    """The metering.rollups partition of a tenant's messages: Kafka's default partitioner (murmur2 of the
    key, as stage 1's producer is configured) of the tenant id."""
    return (murmur2(tenant_id.encode()) & 0x7FFFFFFF) % partitions


class TenantTable(faust.Table):
    """A table whose keys live in the changelog partition that carries their tenant's rollup messages.

    Faust assigns changelog partition p to the worker that consumes metering.rollups partition p, so a
    worker holds every window of the tenants it is sent, whatever rebalances happen: the anomaly rules
    always see a tenant's whole history. (``use_partitioner`` would hash the window key instead and
    spread one tenant over every worker; Faust's default needs a current event, which a timer has not.)
    """

    def partition_for_key(self, key: Any) -> int:
        assert self.partitions, "set by make_app"
        return tenant_partition(str(key).split(_SEP, 1)[0], self.partitions)


class UnwrittenWindows:
    """The newest value of each day window not written to the table yet; the table is written from here every
    ``worker_table_write_interval_s`` (``take``), and lookups see these values first (``value``)."""

    def __init__(self) -> None:
        self._windows: dict[str, Rollup] = {}

    def __len__(self) -> int:
        return len(self._windows)

    def note(self, latest: dict[str, Rollup]) -> None:
        """A batch's windows (absolute values: a later one of a key replaces an earlier one)."""
        for key, r in latest.items():
            if r.granularity in TABLE_RETENTION:
                self._windows[key] = r

    def value(self, key: str) -> dict[str, Any] | None:
        r = self._windows.get(key)
        return None if r is None else table_value(r)

    def take(self, wanted: Callable[[str], bool]) -> dict[str, Rollup]:
        """Remove and return the windows whose keys ``wanted`` selects."""
        taken = {key: r for key, r in self._windows.items() if wanted(key)}
        for key in taken:
            del self._windows[key]
        return taken


def table_key(r: Rollup) -> str:
    return window_key(r.tenant_id, r.granularity, r.window_start, r.dimension, r.dimension_value)


def table_value(r: Rollup) -> dict[str, Any]:
    return {
        "calls": r.calls,
        "unpriced_calls": r.unpriced_calls,
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cache_read_tokens": r.cache_read_tokens,
        "cache_write_tokens": r.cache_write_tokens,
        "cost": str(r.cost),
    }


def expired(key: str, now: datetime) -> bool:
    """Whether the window of a table key ended longer ago than its retention; a key that does not parse
    (written by an older version, or corrupt) counts as expired, so it can never stop the timer."""
    try:
        _tenant, granularity, start, *_ = key.split(_SEP)
        if granularity not in TABLE_RETENTION:
            return True  # a granularity the table no longer keeps
        ends = datetime.fromisoformat(start) + _WINDOW_LENGTH[granularity]
        return ends + TABLE_RETENTION[granularity] < now
    except (ValueError, KeyError, TypeError, OverflowError):
        log.warning("dropping an unreadable rollups table key %r", key[:200])
        return True


def unpriced_model_alerts(rollups: Iterable[Rollup], now: datetime) -> list[Alert]:
    """An alert per (tenant, unknown model, month) seen with unpriced calls; the id is deterministic."""
    alerts = []
    for r in rollups:
        if r.granularity != "month" or r.dimension != "model" or r.unpriced_calls == 0:
            continue
        period = local_date(r.window_start, r.time_zone).strftime("%Y-%m")
        alerts.append(
            Alert(
                alert_id=f"anomaly.unpriced_model:{r.tenant_id}:{r.dimension_value}:{period}",
                kind="anomaly.unpriced_model",
                tenant_id=r.tenant_id,
                scope={"model": r.dimension_value},
                period=period,
                message=f"{r.dimension_value} has no price: its calls are counted as unpriced, not billed",
                details={"unpriced_calls": str(r.unpriced_calls)},
                created_at=now,
            )
        )
    return alerts


class AlertSink:
    """Stores alerts in Postgres (with the top contributors for budget alerts), retried until it can;
    delivers them to the configured webhooks (``sinks/webhooks.py``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.database_url, autocommit=True, connect_timeout=5)
        return self._conn

    def _drop(self) -> None:
        self._conn = None

    def store(self, alerts: list[Alert]) -> set[str]:
        """Store the alerts; return the ids that are new (Postgres keeps each id once)."""
        return with_backoff(
            lambda: self._store(alerts),
            (psycopg.OperationalError,),
            "Postgres (alerts)",
            on_failure=self._drop,
            first_delay=0.5,
        )

    def _store(self, alerts: list[Alert]) -> set[str]:
        conn = self._connection()
        for alert in alerts:
            if alert.is_budget:  # the details travel with the alert (topic copy, webhooks)
                granularity = alert.period.split(":", 1)[0]
                window = datetime.fromisoformat(alert.details["window_start"])
                alert.details.update(top_contributors(conn, alert.tenant_id, granularity, window))
        return store_alerts(conn, alerts)

    def deliver(self) -> None:
        try:
            with psycopg.connect(self.settings.database_url, connect_timeout=5) as conn:
                deliver_pending(conn, self.settings.webhook_urls)
        except psycopg.OperationalError as exc:
            log.warning("cannot deliver alerts now: %s", exc)


SUMMARY_CHUNK_BATCHES = 100  # ledger batches folded per transaction by the worker's summarizer
SUMMARY_MAX_DEFERRAL_S = 300.0  # folding waits for a busy stage 1 at most this long after the queue was last empty


def defer_summaries(stage_one_behind: int, batch_size: int, since_drained_s: float) -> bool:
    """Whether the summarizer should leave Postgres to stage 1 for now: stage 1 has more than a batch waiting
    (a burst, a backlog after an outage) and the queue was emptied less than ``SUMMARY_MAX_DEFERRAL_S`` ago.
    Reports stay exact meanwhile (they read batches not yet folded from the ledger); under load that never
    eases, folding goes on anyway, paced, so report queries do not slow down for good."""
    return stage_one_behind > batch_size and since_drained_s < SUMMARY_MAX_DEFERRAL_S


class ReportSummarizer:
    """Folds the ledger's newly written batches into the report summaries (``sinks/summaries.py``). It bills
    nothing, so it runs beside billing, never in its way: a failure is logged and the next run tries again;
    reports stay exact meanwhile (they read the rows of batches not yet summarized from the ledger)."""

    def __init__(self, settings: Settings, stage_one_behind: Callable[[], int] = lambda: 0) -> None:
        self.settings = settings
        self.stage_one_behind = stage_one_behind
        self._conn: psycopg.Connection | None = None
        self._drained = time.monotonic()  # when the queue was last found empty

    def run(self) -> int:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.settings.database_url, autocommit=True, connect_timeout=5)
        done, started = 0, time.monotonic()
        try:
            # Until the queue is empty (a backlog after an outage, or many small batches), within about one
            # interval, so a run never delays the next by much. Paced: after each chunk it rests twice as
            # long as the chunk took, so folding never holds a Postgres core for long while stage 1's batches
            # wait on the same server (measured: unpaced, a 30 s run raised p99 quota visibility by ~1 s).
            while time.monotonic() - started < self.settings.report_summary_interval_s:
                behind = self.stage_one_behind()
                if defer_summaries(behind, self.settings.worker_batch_size, time.monotonic() - self._drained):
                    log.info("report summaries wait: stage 1 has %d messages to do", behind)
                    break
                chunk_started = time.monotonic()
                folded = summarize_pending(self._conn, max_batches=SUMMARY_CHUNK_BATCHES)
                done += folded
                metrics.REPORT_BATCHES_SUMMARIZED.inc(folded)
                if folded == 0:
                    self._drained = time.monotonic()
                    break
                time.sleep(2 * (time.monotonic() - chunk_started))
        except psycopg.Error:
            self._conn.close()
            raise
        return done


def _apply_budget(budgets: dict[str, Budget], key: str, record: ConfigRecord) -> None:
    if record.kind == "rate_limit":
        return
    if isinstance(record.item, Budget):
        budgets[key] = record.item
    else:
        budgets.pop(key, None)


def _apply_budget_if_valid(budgets: dict[str, Budget], key: str, value: bytes | None) -> None:
    try:
        record = parse_config_record(key, value)
    except Exception:  # rejected (logged and counted once) by the follower that runs on: budget_follower
        return
    _apply_budget(budgets, key, record)


def read_budgets(settings: Settings, budgets: dict[str, Budget]) -> bool:
    """Fill ``budgets`` from config.budgets read to its end (Redis not involved: stage 2 needs the budgets
    before it judges any window, and Redis being down must not hold that up); False if it could not be
    read within the stall timeout."""
    follower = ConfigFollower(
        kafka_config(settings),
        settings.topic_budgets,
        lambda key, value: _apply_budget_if_valid(budgets, key, value),
    )
    try:
        return follower.read_to_end(settings.worker_stall_timeout_s)
    finally:
        follower.close()


def budget_follower(settings: Settings, budgets: dict[str, Budget]) -> ConfigFollower:
    """Keeps ``budgets`` and the Redis budget and rate-limit keys (read by QuotaClient) equal to
    config.budgets."""
    client = redis_client(settings, socket_timeout=5.0)

    def apply(key: str, value: bytes | None) -> None:
        record = parse_config_record(key, value)
        _apply_budget(budgets, key, record)
        redis_key = rate_limit_key(*record.scope) if record.kind == "rate_limit" else budget_key(*record.scope)
        if record.item is None:
            client.delete(redis_key)
        else:
            client.set(redis_key, record.item.redis_json())

    return ConfigFollower(kafka_config(settings), settings.topic_budgets, apply)


_RULES: dict[tuple[str, str], Callable[[Window, list[Window]], Finding | None]] = {
    ("hour", "tenant"): spend_spike,
    ("day", "tenant"): daily_spend_spike,
    ("hour", "feature"): cost_per_call_jump,
    ("hour", "user"): user_spike,
}


def anomaly_alerts(
    latest: Iterable[Rollup], lookup: Callable[[str], dict[str, Any] | None], now: datetime
) -> list[Alert]:
    """Run the anomaly rules on this batch's hour/day windows against the previous 7 days from the
    table (``lookup(table_key)``); one alert per rule, scope and window."""
    alerts = []
    for r in latest:
        rule = _RULES.get((r.granularity, r.dimension))
        if rule is None:
            continue
        day = local_date(r.window_start, r.time_zone)  # the tenant's calendar day of this window
        history = []
        for back in range(1, 8):
            start = local_midnight(day - timedelta(days=back), r.time_zone)
            key = window_key(r.tenant_id, "day", start, r.dimension, r.dimension_value)
            value = lookup(key) or {}
            history.append(Window(Decimal(value.get("cost", "0")), int(value.get("calls", 0))))
        finding = rule(Window(r.cost, r.calls), history)
        if finding is None:
            continue
        alerts.append(
            Alert(
                alert_id=f"anomaly.{finding.rule}:{r.tenant_id}:{r.dimension}:{r.dimension_value}:"
                f"{r.window_start.isoformat()}",
                kind=f"anomaly.{finding.rule}",
                tenant_id=r.tenant_id,
                scope={"dimension": r.dimension, "value": r.dimension_value},
                period=f"{r.granularity}:{r.window_start.isoformat()}",
                current=money(finding.current),
                baseline=money(finding.baseline),
                message=f"{r.scope_label}: {finding.message}",
                details={"ratio": str(finding.ratio), "rule": finding.rule},
                created_at=now,
            )
        )
    return alerts


def faust_credentials(settings: Settings) -> Any:
    """The same security for Faust (aiokafka): ``None`` for PLAINTEXT, else a Faust credentials object."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context: ssl.SSLContext | None = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_ca_location) if settings.kafka_ssl_ca_location else None
        )
        if settings.kafka_ssl_certificate_location:
            context.load_cert_chain(
                str(settings.kafka_ssl_certificate_location),
                str(settings.kafka_ssl_key_location) if settings.kafka_ssl_key_location else None,
                settings.kafka_ssl_key_password.get_secret_value() or None,
            )
        if settings.kafka_client_properties.get("ssl.endpoint.identification.algorithm") == "none":
            context.check_hostname = False
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password.get_secret_value(),
        mechanism=settings.kafka_sasl_mechanism,
        ssl_context=context,
    )


def stage_one_names(processes: int) -> list[str]:
    """The names stage 1's processes go by in /healthz, /readyz and the logs."""
    return ["stage 1 (metering)"] + [f"stage 1 (metering) #{n}" for n in range(2, processes + 1)]


def make_app(
    settings: Settings | None = None, health: Health | None = None, budgets: dict[str, Budget] | None = None
) -> faust.App:
    """The worker's Faust app. ``budgets``: as read before it starts (``read_budgets``); followed from there."""
    settings = settings or get_settings()
    health = health or Health(settings.worker_stall_timeout_s)
    meter_names = stage_one_names(settings.worker_meter_processes)
    meter_statuses = [health.stage(name) for name in meter_names]
    windows_status = health.stage("stage 2 (budgets and alerts)")
    for name in meter_names:
        health.processes[name] = None  # not running until the supervisor starts it
    app = faust.App(
        settings.worker_id,
        broker=faust_brokers(settings),
        broker_credentials=faust_credentials(settings),
        datadir=settings.faust_datadir,
        store="memory://",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication or 1,  # resolved from the cluster by the CLI
        processing_guarantee="at_least_once",
        broker_commit_interval=1.0,
        # A SIGKILLed worker holds its partitions until its session times out: keep that short.
        broker_session_timeout=SESSION_TIMEOUT_S,
        broker_heartbeat_interval=2.0,
        web_enabled=False,
        producer_compression_type="lz4",
        consumer_auto_offset_reset="earliest",
        # Topics are created by `tokenmeter topics ensure` / the worker's start-up check (deploy/topics.py):
        # Faust's own creation asks the node metadata names as controller and crashes the worker when that
        # broker is down. No leader election either: no task here runs on the leader only.
        topic_allow_declare=False,
        topic_disable_leader=True,
    )
    rollups_topic = app.topic(settings.topic_rollups, key_serializer="raw", value_serializer="raw")
    anomaly_topic = app.topic(settings.topic_alerts_anomaly, key_serializer="raw", value_serializer="raw")
    budget_topic = app.topic(settings.topic_alerts_budget, key_serializer="raw", value_serializer="raw")
    # Keys in their tenant's partition (TenantTable). No defaults: a Faust table with a default writes one to
    # its changelog on every missed lookup.
    rollups = TenantTable(app, name="rollups", partitions=settings.topic_partitions, beacon=app.tables.beacon)
    app.tables.add(rollups)
    alerted = RecentIds(RECENT_ALERTS)

    unwritten = UnwrittenWindows()

    def window(key: str) -> dict[str, Any] | None:
        newest = unwritten.value(key)
        if newest is not None:
            return newest
        return rollups[key] if key in rollups else None  # noqa: SIM401 (.get would write a default)

    budgets = {} if budgets is None else budgets
    budget_config = budget_follower(settings, budgets)
    quota_redis = redis_client(settings, socket_timeout=2.0)

    def stale_calls(budget: Budget, r: Rollup) -> int:
        """Calls quota clients let through on stale data in this budget's window (``producers/quota.py``)."""
        end_ms = int(period_end(budget.period, r.window_start, r.time_zone).timestamp() * 1000)
        try:
            raw = quota_redis.hget(
                stale_calls_key(r.tenant_id, r.dimension, r.dimension_value), stale_calls_field(budget.period, end_ms)
            )
        except redis.RedisError:
            return 0
        return int(raw or 0)

    alert_sink = AlertSink(settings)

    @app.task
    async def supervise() -> None:
        """Run stage 1's processes; every second, check both stages. A dead or stuck stage makes the worker
        exit non-zero with the reason (``streams/health.py``); the process manager restarts it."""
        spawn = multiprocessing.get_context("spawn")
        processes = []
        for number, (name, status) in enumerate(zip(meter_names, meter_statuses, strict=True), 1):
            process = spawn.Process(
                target=run_stage_one, args=(settings, status, os.getpid()), name=f"tokenmeter-stage-1-{number}"
            )
            status.restart_clock()
            process.start()
            health.processes[name] = process
            processes.append(process)
        try:
            while True:
                await asyncio.sleep(1.0)
                health.loop_tick = time.time()
                reason = health.stuck()
                if reason is not None:
                    health.fatal = reason
                    log.critical(
                        "stopping the worker: %s; exit status 3 (restart it; offsets not committed "
                        "are replayed, nothing is lost)",
                        reason,
                    )
                    for handler in logging.getLogger().handlers:
                        handler.flush()
                    sys.stderr.flush()
                    with contextlib.suppress(Exception):  # bounded: stage 2 may be the stuck one
                        write_unwritten(lambda _key: True)
                        await asyncio.wait_for(app.producer.flush(), 2.0)
                    await asyncio.sleep(0.2)
                    os._exit(3)  # stage 1 dies with us (PR_SET_PDEATHSIG); uncommitted work is replayed
        finally:  # cancelled when the worker stops: let stage 1 finish its batches and close
            for name in meter_names:
                health.processes.pop(name, None)
            for process in processes:
                if process.is_alive():
                    process.terminate()
            for process in processes:
                await asyncio.to_thread(process.join, 30)

    @app.timer(interval=5.0)
    async def measure_windows_lag() -> None:
        """Stage 2's progress: behind = what its consumer group has not committed on metering.rollups."""

        def behind() -> int:  # this worker's partitions only: another worker's backlog is not its stall
            own = {tp.partition for tp in app.consumer.assignment() if tp.topic == settings.topic_rollups}
            lags = measure_lag(settings, settings.topic_rollups, group=settings.worker_id)
            return sum(p.lag for p in lags if p.partition in own)

        lag = await asyncio.to_thread(optional, "stage 2 lag", behind, -1)
        if lag >= 0:
            windows_status.alive(lag)

    @app.task
    async def load_budgets() -> None:
        await asyncio.to_thread(optional, "budgets", lambda: budget_config.catch_up(1.0), 0)

    @app.timer(interval=1.0)
    async def follow_budgets() -> None:
        await asyncio.to_thread(optional, "budgets", lambda: budget_config.catch_up(0.1), 0)

    @app.timer(interval=1.0)
    async def deliver_webhooks() -> None:
        if settings.webhook_urls:
            await asyncio.to_thread(optional, "webhooks", alert_sink.deliver, None)

    summarizer = ReportSummarizer(settings, lambda: sum(status.behind for status in meter_statuses))

    @app.timer(interval=settings.report_summary_interval_s)
    async def summarize_reports() -> None:
        await asyncio.to_thread(optional, "report summaries", summarizer.run, 0)

    @app.timer(interval=60.0)
    async def expire_windows() -> None:
        """Delete ended windows of the partitions this worker owns (a copy of another worker's partition,
        left from before a rebalance, is not this worker's to delete)."""
        now = datetime.now(UTC)
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.topic_rollups}
        for key in [k for k in list(rollups.keys()) if expired(k, now)]:
            if rollups.partition_for_key(key) in owned:
                del rollups[key]

    def read_batch(batch: list[bytes]) -> dict[str, Rollup]:
        """The newest absolute value of every window in the batch; undecodable messages are skipped."""
        latest: dict[str, Rollup] = {}
        for value in batch:
            try:
                decoded = codec.decode("rollup_batch", value)
                rollups_of_batch = [Rollup.from_avro(record, decoded["time_zone"]) for record in decoded["rollups"]]
            except Exception as exc:
                log.error("skipping an unreadable rollup batch (%d bytes): %s", len(value or b""), exc)
                metrics.OPTIONAL_FAILURES.labels(stage="windows decode").inc()
                continue
            for r in rollups_of_batch:
                latest[table_key(r)] = r  # absolute values: the last one of a key is its newest
        return latest

    def alerts_of(latest: dict[str, Rollup], now: datetime) -> list[Alert]:
        """Every rule on its own: one that fails is logged and counted, the others still fire."""
        none: list[Alert] = []
        fired = [
            *optional("unpriced model alerts", lambda: unpriced_model_alerts(latest.values(), now), none),
            *optional("budget alerts", lambda: budget_alerts(budgets, latest.values(), now), none),
            *optional("overrun alerts", lambda: overrun_alerts(budgets, latest.values(), now, stale_calls), none),
            *optional("anomaly rules", lambda: anomaly_alerts(latest.values(), window, now), none),
        ]
        return [alert for alert in fired if alert.alert_id not in alerted]

    async def send_alerts(fresh: list[Alert]) -> None:
        # Stored first: Postgres keeps each alert_id once, whatever a crash or a lost table entry repeats;
        # only the ids new there are published and counted.
        new = await asyncio.to_thread(alert_sink.store, fresh)
        for alert in fresh:
            if alert.alert_id not in new:
                alerted.add(alert.alert_id)
                continue
            topic = budget_topic if alert.is_budget else anomaly_topic
            try:
                value = codec.encode("alert", alert.to_avro())
            except Exception:
                log.exception("alert %s cannot be encoded; kept in Postgres only", alert.alert_id)
                metrics.OPTIONAL_FAILURES.labels(stage="alert encoding").inc()
                alerted.add(alert.alert_id)
                continue
            await topic.send(key=alert.tenant_id.encode(), value=value)
            alerted.add(alert.alert_id)
            metrics.ALERTS.labels(kind=alert.kind).inc()
            metrics.EVENTS_OUT.labels(stage="windows", output="alerts").inc()
            log.warning("alert %s: %s", alert.kind, alert.message)

    def write_unwritten(wanted: Callable[[str], bool]) -> None:
        """The unwritten day windows ``wanted`` selects to the table (the anomaly rules' history). A window the
        table refuses is logged, counted and left out (its next batch writes it again): one bad key never holds
        up the others, and budgets are judged all the same."""
        refused: list[BaseException] = []
        for key, r in unwritten.take(wanted).items():
            try:
                rollups[key] = table_value(r)
            except Exception as exc:
                refused.append(exc)
        if refused:
            log.warning("stage 2 left %d windows out of its table (%r)", len(refused), refused[0])
            metrics.OPTIONAL_FAILURES.labels(stage="windows table").inc(len(refused))

    def held(key: str, partitions: Collection[int]) -> bool:
        return rollups.partition_for_key(key) in partitions

    @app.timer(interval=settings.worker_table_write_interval_s)
    async def write_windows() -> None:
        # Not while partitions move or the table recovers: the agent is paused then, and a write could land
        # under a value the recovery replays, or over one another worker wrote meanwhile.
        if not len(unwritten) or app.rebalancing or app.in_recovery:
            return
        owned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == settings.topic_rollups}
        write_unwritten(lambda key: held(key, owned))
        gone = unwritten.take(lambda _key: True)  # partitions that moved without a handover (written there)
        if gone:
            log.info("%d unwritten windows of partitions this worker no longer holds were dropped", len(gone))

    @app.on_partitions_revoked.connect
    async def write_before_handover(_sender: Any, /, *args: Any, signal: Any, **_kwargs: Any) -> None:
        """Called with the revoked partitions once Faust has drained the consumer and flushed the producer, before
        the rebalance goes on: the next owner recovers the table from the changelog, with these windows in it."""
        revoked: Iterable[Any] = args[0] if args else ()
        partitions = {tp.partition for tp in revoked if tp.topic == settings.topic_rollups}
        if not partitions or not len(unwritten):
            return
        try:
            write_unwritten(lambda key: held(key, partitions))
            await app.producer.flush()
        except Exception:  # never in the way of the rebalance: the windows' next batches write them again
            log.exception("stage 2 could not write its windows before handing partitions over")
            metrics.OPTIONAL_FAILURES.labels(stage="windows table").inc()

    @app.on_before_shutdown.connect
    async def write_before_stopping(_sender: Any, /, *_args: Any, signal: Any, **_kwargs: Any) -> None:
        """Faust flushes the producer right after this."""
        try:
            write_unwritten(lambda _key: True)
        except Exception:
            log.exception("stage 2 could not write its windows before stopping")
            metrics.OPTIONAL_FAILURES.labels(stage="windows table").inc()

    @app.agent(rollups_topic)
    async def windows(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(100, within=0.1):
            metrics.EVENTS_IN.labels(stage="windows").inc(len(batch))
            latest = read_batch(batch)
            unwritten.note(latest)
            for attempt in range(3):
                try:
                    fresh = alerts_of(latest, datetime.now(UTC))
                    if fresh:
                        await send_alerts(fresh)
                    break
                except Exception as exc:
                    windows_status.failed(f"{type(exc).__name__}: {str(exc)[:300]}")
                    if attempt < 2:
                        log.warning("stage 2 could not send this batch's alerts (%r); trying again", exc)
                        await asyncio.sleep(1.0)
                        continue
                    # Values are absolute: the next batch of the same windows re-evaluates every threshold,
                    # so skipping this one delays an alert at worst; stopping here would stop them all.
                    log.exception("stage 2 skipped the alerts of %d rollup messages", len(batch))
                    metrics.OPTIONAL_FAILURES.labels(stage="windows").inc()
            windows_status.progressed(windows_status.behind)

    credit_follower = CreditFollower(settings)

    @app.timer(interval=1.0)
    async def follow_credits() -> None:
        """Prepaid balances to Redis and their alerts (``streams/credits.py``); alerts go the usual way."""
        reached = await asyncio.to_thread(optional, "credits", lambda: credit_follower.tick(datetime.now(UTC)), [])
        fresh = [alert for alert in reached if alert.alert_id not in alerted]
        try:
            if fresh:
                await send_alerts(fresh)
        except Exception:
            # Not confirmed: the follower offers them again next round (a used-up tenant makes no new usage).
            log.exception("storing %d credit alerts failed; offered again next round", len(fresh))
            metrics.OPTIONAL_FAILURES.labels(stage="credit alerts").inc()
            return
        credit_follower.confirm(alert.alert_id for alert in reached)

    return app


def run_worker(settings: Settings | None = None, loglevel: str = "warning") -> None:
    """Run the worker in the foreground; the caller has verified the topics (``deploy.topics``)."""
    settings = settings or get_settings()
    health = Health(settings.worker_stall_timeout_s, topics_ok=True)
    from streams.health import serve

    budgets: dict[str, Budget] = {}
    # The app first: the endpoints never show a worker without its stages (they are listed, not started, while
    # the budgets are read below).
    app = make_app(settings, health, budgets)
    serve(health, settings.metrics_host, settings.metrics_port)
    # Before Faust starts: a window judged before its budget is read is not judged again once its scope stops
    # spending. A broker just down can hold the read up for a while (its partitions' leaders move); one that
    # never ends is a stuck worker: it exits and is restarted.
    if not read_budgets(settings, budgets):
        log.critical(
            "%s not read to its end within %.0fs; the worker exits with status 3 (restart it)",
            settings.topic_budgets,
            settings.worker_stall_timeout_s,
        )
        logging.shutdown()
        sys.exit(3)
    heap.settle()
    # Faust warns on every changelog burst ("producer buffer full"); it is flow control, not a fault.
    logging.getLogger("faust.transport.producer").setLevel(logging.ERROR)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
