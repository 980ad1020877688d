"""The ``tokenmeter`` command line."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from typing import Any, TextIO

import click
from rich.console import Console
from rich.table import Table

from deploy.output import cell, csv_safe, rounding_note, usd, usd_in_text
from deploy.settings import Settings, get_settings, kafka_config, redis_client
from deploy.stack import LocalStack, StackError

_stderr = Console(stderr=True)


def _settings() -> Settings:
    return get_settings()


def _fail(message: str) -> None:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """tokenmeter: metering for LLM/AI API spend.

    Settings come from TOKENMETER_* environment variables; `eval "$(tokenmeter dev env)"`
    points every command at the local stack.
    """


# ---------------------------------------------------------------- dev stack
@cli.group()
def dev() -> None:
    """The local single-node stack (Kafka, Postgres, Redis) under .tokenmeter/, no Docker."""


@dev.command("up")
@click.option(
    "--brokers",
    type=click.IntRange(1, 9),
    default=None,
    help="Kafka nodes (broker and controller each) when the stack is first created; 3 gives a quorum of 3, "
    "topics with 3 replicas and min.insync.replicas 2. Default: as created before, else 1.",
)
@click.option(
    "--secure/--plaintext",
    default=None,
    help="When the stack is first created: clients must authenticate with SASL/SCRAM-SHA-512 and ACLs apply "
    "(users and passwords in <home>/kafka/security.json; `dev env` prints the admin's). Default: as created "
    "before, else plaintext.",
)
def dev_up(brokers: int | None, secure: bool | None) -> None:
    """Start Kafka, Postgres and Redis and wait until each answers. Idempotent: run it again to restart
    whatever is down (e.g. one killed broker)."""
    started = time.monotonic()
    try:
        statuses = LocalStack(_settings()).up(progress=click.echo, brokers=brokers, secure=secure)
    except StackError as exc:
        _fail(str(exc))
    for status in statuses:
        click.echo(f"  {status.name:<9} {status.address:<40} {status.detail}")
    click.echo(f'stack up in {time.monotonic() - started:.1f} s; run `eval "$(tokenmeter dev env)"`')


@dev.command("down")
@click.option("--purge", is_flag=True, help="Also delete all data under the state folder.")
def dev_down(purge: bool) -> None:
    """Stop the local stack; data is kept unless --purge."""
    LocalStack(_settings()).down(purge=purge, progress=click.echo)


@dev.command("status")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def dev_status(fmt: str) -> None:
    """Report each service (every Kafka node, Postgres, Redis); exit 1 if any is down. JSON: a list of
    {name, pid, port, up, address, detail}, for scripts (e.g. to kill one broker)."""
    statuses = LocalStack(_settings()).status()
    if fmt == "json":
        rows = [
            {"name": s.name, "pid": s.pid, "port": s.port, "up": s.running, "address": s.address, "detail": s.detail}
            for s in statuses
        ]
        click.echo(json.dumps(rows, indent=2))
        sys.exit(0 if all(s.running for s in statuses) else 1)
    for status in statuses:
        mark = click.style("up  ", fg="green") if status.running else click.style("down", fg="red")
        click.echo(f"{mark} {status.name:<9} {status.address:<40} {status.detail}")
    if not all(s.running for s in statuses):
        sys.exit(1)


@dev.command("env")
def dev_env() -> None:
    """Print export lines for the local stack's connection settings."""
    s = _settings()
    lines = [
        ("TOKENMETER_KAFKA_BOOTSTRAP", s.kafka_bootstrap),
        ("TOKENMETER_DATABASE_URL", s.database_url),
        ("TOKENMETER_REDIS_URL", s.redis_url),
    ]
    if s.kafka_security_protocol != "PLAINTEXT":
        lines += [
            ("TOKENMETER_KAFKA_SECURITY_PROTOCOL", s.kafka_security_protocol),
            ("TOKENMETER_KAFKA_SASL_MECHANISM", s.kafka_sasl_mechanism),
            ("TOKENMETER_KAFKA_SASL_USERNAME", s.kafka_sasl_username),
            ("TOKENMETER_KAFKA_SASL_PASSWORD", s.kafka_sasl_password.get_secret_value()),
        ]
    for name, value in lines:
        click.echo(f"export {name}={shlex.quote(value)}")


# ---------------------------------------------------------------- topics and database
@cli.group()
def topics() -> None:
    """Kafka topics of the pipeline."""


@topics.command("ensure")
def topics_ensure() -> None:
    """Create the pipeline's topics idempotently (partitions, replication, cleanup policy from settings)."""
    from deploy.topics import ensure_topics

    try:
        changes = ensure_topics(_settings())
    except Exception as exc:
        _fail(f"could not ensure topics on {_settings().kafka_bootstrap}: {exc} (is the stack up?)")
    for change in changes:
        click.echo(f"{change.action:<18} {change.topic:<26} {change.detail}")


@cli.group()
def db() -> None:
    """The Postgres metering database."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply pending schema migrations."""
    import psycopg

    from sinks.migrate import MigrationError, migrate

    try:
        applied = migrate(_settings().database_url)
    except (psycopg.Error, MigrationError) as exc:
        _fail(f"migration failed: {exc}")
    click.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@cli.group()
def ledger() -> None:
    """The per-call ledger: one partition per UTC month of the calls' timestamps, old months archivable."""


@ledger.command("partitions")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)
def ledger_partitions_cmd(fmt: str) -> None:
    """The ledger's month partitions (attached; rows as Postgres estimates them) and the months
    detached for archive (rows counted when detached)."""
    import json

    import psycopg

    from sinks.postgres import ledger_partitions

    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            parts = ledger_partitions(conn)
    except psycopg.Error as exc:
        _fail(f"cannot read the metering database: {exc}".strip())
    if fmt == "json":
        click.echo(json.dumps([p.as_json() for p in parts]))
        return
    table = Table(title="ledger partitions (UTC months)")
    for column in ("month", "state", "table", "rows", "size"):
        table.add_column(column, justify="right" if column in ("rows", "size") else "left")
    for p in parts:
        size = "-" if p.bytes is None else f"{p.bytes / 2**20:,.1f} MiB"
        table.add_row(p.month, p.state, p.table, "?" if p.rows is None else f"{p.rows:,}", size)
    Console().print(table)


@ledger.command("detach")
@click.option("--month", required=True, help="The UTC month to archive, YYYY-MM.")
@click.option(
    "--force", is_flag=True, help="Detach even the current or previous month, or one with unfinalized invoices."
)
def ledger_detach(month: str, force: bool) -> None:
    """Detach one month of the ledger for archive: its calls move to the plain table
    tokenmeter_archive.ledger_YYYY_MM, to dump (pg_dump -t) and drop.

    Refused without --force while a tenant with usage in the month has no finalized invoice for it
    (`tokenmeter invoice --finalize`), and for the current and previous month (late events still
    arrive). Invoices and report totals and breakdowns do not change (they read the rollups); the
    month's top requests, conversations, latencies and whatif (they read calls) no longer see it, and
    a tenant with usage in it cannot change its time zone until it is attached again. Its event ids
    stay, so its events are never counted again; a late event for it lands in a new partition.
    """
    from datetime import UTC, datetime

    import psycopg

    from sinks.postgres import PartitionError, detach_month

    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5, autocommit=True) as conn:
            part = detach_month(conn, month, datetime.now(UTC), force=force)
    except PartitionError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(f"cannot detach {month}: {exc}".strip())
    click.echo(f"detached {month}: {part.rows:,} calls now in {part.table} (dump it, then drop it)")


# ---------------------------------------------------------------- producing events
@cli.command("produce")
@click.argument("source", type=click.File("r", encoding="utf-8", errors="replace"))
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def produce(source: TextIO, quiet: bool) -> None:
    """Publish JSON-lines usage events from SOURCE (a file or - for stdin) to the raw topic.

    Each line is validated like a library call; rejected lines are reported with their line number and
    reason, and the exit status is 1 if any line was rejected.
    """
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from producers.jsonlines import produce_lines
    from producers.producer import UsageProducer

    settings = _settings()
    total = None
    if source is not sys.stdin and hasattr(source, "name"):
        with contextlib.suppress(OSError):
            total = os.path.getsize(source.name)
    columns = (TextColumn("producing"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[lines]} lines"))
    with (
        Progress(*columns, TimeRemainingColumn(), disable=quiet or not sys.stderr.isatty(), console=_stderr) as bar,
        UsageProducer(settings) as producer,
    ):
        task = bar.add_task("produce", total=total, lines=0)

        def advance(number: int, size: int) -> None:
            bar.update(task, advance=size, lines=number)

        report = produce_lines(source, producer, advance)
        stats = producer.close()
    for number, reason in report.rejected[:1000]:
        click.echo(f"line {number}: {reason}", err=True)
    if len(report.rejected) > 1000:
        click.echo(f"... and {len(report.rejected) - 1000} more rejected lines", err=True)
    click.echo(
        f"accepted {report.accepted}, rejected {len(report.rejected)}; delivered {stats.delivered} to "
        f"{settings.topic_raw}"
        + (f", spooled {stats.spooled} (Kafka unreachable)" if stats.spooled else "")
        + (f", replayed {stats.replayed} from the spool" if stats.replayed else "")
    )
    if report.rejected or stats.dropped:
        sys.exit(1)


# ---------------------------------------------------------------- invoices
@cli.command("worker")
@click.option("--loglevel", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning"]))
def worker(loglevel: str) -> None:
    """Run the stream worker in the foreground: usage.raw → validate, de-duplicate, price → sinks.

    Safe to kill at any time (even with SIGKILL): a restarted worker replays what was not committed
    and the sinks absorb the replay. Run several to share the partitions of usage.raw. Prometheus
    metrics of both stages at http://TOKENMETER_METRICS_HOST:TOKENMETER_METRICS_PORT/metrics
    (127.0.0.1:9464 by default), with /healthz and /readyz beside them.

    Creates missing topics first (TOKENMETER_WORKER_CREATE_TOPICS=false: exit 1 naming the topic).
    Exits 3 when a stage dies or makes no progress for TOKENMETER_WORKER_STALL_TIMEOUT_S (120) while
    it has work: restart it (systemd, Kubernetes); nothing is lost.
    """
    import shutil
    import tempfile

    # Both stages write their metrics to files in one folder (prometheus_client's multiprocess mode),
    # which must be named before prometheus_client is first imported: it picks its storage then.
    metrics_folder = tempfile.mkdtemp(prefix="tokenmeter-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_folder
    try:
        from deploy.topics import TopicsMissing, verify_topics

        settings = _settings()
        try:
            for change in verify_topics(settings, create=settings.worker_create_topics):
                click.echo(f"topic {change.topic}: {change.action} {change.detail}".rstrip(), err=True)
        except TopicsMissing as exc:
            _fail(str(exc))
        _require_migrated(settings)
        from deploy.topics import cluster_replication
        from streams.app import run_worker

        settings = settings.model_copy(update={"topic_replication": cluster_replication(settings)})
        run_worker(settings, loglevel=loglevel)
    finally:
        shutil.rmtree(metrics_folder, ignore_errors=True)


def _require_migrated(settings: Settings) -> None:
    """A database without this version's migrations would fail every batch ("relation … does not exist")
    until the stall timeout: say so at once instead. Postgres down is not this: the worker waits for it."""
    import psycopg

    from sinks.migrate import pending_migrations

    try:
        missing = pending_migrations(settings.database_url)
    except psycopg.OperationalError as exc:
        click.echo(f"Postgres is not reachable yet ({str(exc).strip()[:200]}); the worker waits for it", err=True)
        return
    if missing:
        _fail(f"the database lacks {len(missing)} migration(s) ({', '.join(missing)}): run `tokenmeter db migrate`")


@cli.command("lag")
@click.option("--wait", is_flag=True, help="Exit 0 once everything produced before this call reached the sinks.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait with --wait before exit 1.")
def lag_cmd(wait: bool, timeout: float) -> None:
    """How far the worker is behind usage.raw, per partition (committed offsets only move after the
    batch is in Postgres and Redis)."""
    from streams.lag import measure_lag, wait_for_sinks
    from streams.meter import meter_group

    settings = _settings()
    try:
        if wait:
            last: list[int] = []

            def report(behind: int) -> None:
                if not last or last[-1] != behind:
                    click.echo(f"{behind:,} events not yet in the sinks", err=True)
                last.append(behind)

            if not wait_for_sinks(settings, timeout, on_progress=report):
                _fail(f"still behind after {timeout:.0f}s; is `tokenmeter worker` running?")
            click.echo("caught up: everything produced before the call is in Postgres and Redis")
            return
        lags = measure_lag(settings)
    except RuntimeError as exc:
        _fail(str(exc))
    table = Table(title=cell(f"worker (consumer group {meter_group(settings)}) on {settings.topic_raw}"))
    for column in ("partition", "committed", "end", "lag"):
        table.add_column(column, justify="right")
    for p in lags:
        table.add_row(str(p.partition), "-" if p.committed < 0 else f"{p.committed:,}", f"{p.end:,}", f"{p.lag:,}")
    table.add_row("total", "", "", f"{sum(p.lag for p in lags):,}", style="bold")
    Console().print(table)


@cli.group()
def quota() -> None:
    """Ask whether a tenant / feature / user may make another model call."""


@quota.command("check")
@click.option("--tenant", required=True)
@click.option("--feature", default=None)
@click.option("--user", default=None)
@click.option("--environment", default=None)
@click.option("--team", default=None, help="The call's team.")
@click.option("--api-key", "api_key", default=None, help="The id of the call's API key (never the key itself).")
@click.option("--model", default=None, help="The call's model as provider/model, e.g. openai/gpt-4o.")
@click.option("--tag", "tags", multiple=True, help="A tag of the call as name=value (repeatable).")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)
def quota_check(
    tenant: str,
    feature: str | None,
    user: str | None,
    environment: str | None,
    team: str | None,
    api_key: str | None,
    model: str | None,
    tags: tuple[str, ...],
    fmt: str,
) -> None:
    """One Redis round trip: every scope of the call (tenant, feature, user, environment, team, API key,
    model, tags) at once; allowed or not, and which scope refused (refused_by in JSON)."""
    import json

    import redis

    from producers.quota import QuotaClient

    call_tags = dict(_tag_option(tag) for tag in tags)
    try:
        decision = QuotaClient(_settings()).check(
            tenant,
            feature=feature,
            user_id=user,
            environment=environment,
            team=team,
            api_key=api_key,
            model=model,
            tags=call_tags,
        )
    except redis.RedisError as exc:
        _fail(f"cannot reach Redis at {_settings().redis_url}: {exc} (is `tokenmeter dev up` running?)")
    if fmt == "json":
        click.echo(json.dumps(decision.as_json()))
        return
    verdict = click.style("allowed", fg="green") if decision.allowed else click.style("blocked", fg="red")
    click.echo(f"{verdict}: {usd_in_text(decision.reason)}")
    click.echo(
        f"scope {decision.scope}, {decision.period}: spent {usd(decision.spent)}"
        + ("" if decision.limit is None else f" of {usd(decision.limit)} (remaining {usd(decision.remaining or 0)})")
    )
    click.secho(rounding_note("json"), dim=True)


@cli.group()
def budget() -> None:
    """Budgets per tenant, feature, user, environment, team, API key, model or tag (config.budgets topic)."""


def _scope_options(command: Any) -> Any:
    """--tenant and at most one of --feature / --user / --environment / --team / --api-key / --model /
    --tag: the scope of a budget or limit (a level of the tenant's budget hierarchy)."""
    for option in reversed(
        [
            click.option("--tenant", required=True, help="The tenant."),
            click.option("--feature", default=None, help="One feature of the tenant."),
            click.option("--user", default=None, help="One user of the tenant."),
            click.option("--environment", default=None, help="One environment (prod, staging…) of the tenant."),
            click.option("--team", default=None, help="One team of the tenant."),
            click.option("--api-key", "api_key", default=None, help="One API key id (never the key itself)."),
            click.option("--model", default=None, help="One model, as provider/model (e.g. openai/gpt-4o)."),
            click.option("--tag", default=None, help="One tag value, as name=value (split at the first '=')."),
        ]
    ):
        command = option(command)
    return command


_SCOPE_OPTIONS = ("feature", "user", "environment", "team", "api_key", "model", "tag")


def _tag_option(text: str) -> tuple[str, str]:
    """``name=value`` of --tag, split at the first '=' (a value may hold '='; a name with one is given
    through the config topic or the library instead)."""
    name, equals, value = text.partition("=")
    if not equals or not name or not value:
        _fail(f"--tag takes name=value with both parts non-empty, got {text!r}")
    return name, value


def _budget_scope(**options: str | None) -> tuple[str, str]:
    """The (dimension, value) of the scope options given: the tenant itself if none."""
    from schemas.redis_keys import tag_dimension

    given = [(name, value) for name, value in options.items() if value]
    if len(given) > 1:
        _fail("give at most one of " + ", ".join("--" + name.replace("_", "-") for name in _SCOPE_OPTIONS))
    if not given:
        return ("tenant", "")
    name, value = given[0]
    assert value is not None
    if name == "tag":
        return (tag_dimension(_tag_option(value)[0]), _tag_option(value)[1])
    return (name, value)


def _send_config(topic: str, key: str, value: bytes | None) -> None:
    from confluent_kafka import Producer

    from producers.kafka_logging import logged

    producer = Producer(kafka_config(_settings(), **{"enable.idempotence": True}, **logged()))
    producer.produce(topic, key=key.encode(), value=value)
    if producer.flush(15) != 0:
        _fail(f"could not write to {topic} at {_settings().kafka_bootstrap} (is the stack up?)")


@budget.command("set")
@_scope_options
@click.option("--limit", "limit_usd", required=True, help="USD per period, e.g. 10 or 2500.50.")
@click.option("--period", type=click.Choice(["day", "week", "month"]), default="month", show_default=True)
@click.option("--hard", is_flag=True, help="Block calls (quota check says not allowed) once the limit is spent.")
@click.option("--thresholds", default="50,80,100", show_default=True, help="Alert at these percentages.")
@click.option(
    "--on-stale",
    "on_stale",
    type=click.Choice(["allow", "allow_reserved", "block"]),
    default="allow",
    show_default=True,
    help="A hard budget while the spend data is stale (pipeline behind): decide on the "
    "data as it is, let only reserve() calls through, or block every call.",
)
def budget_set(
    tenant: str,
    limit_usd: str,
    period: str,
    hard: bool,
    thresholds: str,
    on_stale: str,
    **scope: str | None,
) -> None:
    """Set (or replace) the budget of a scope; workers apply it within a second."""
    from streams.budgets import MAX_BUDGET, Budget
    from streams.config_topic import config_amount

    dimension, value = _budget_scope(**scope)
    try:  # the same rules as a record read back from config.budgets, so the workers never skip it
        limit = config_amount(limit_usd, "--limit", positive=True, below=MAX_BUDGET)
        try:
            levels = tuple(sorted({int(t) for t in thresholds.split(",")}))
        except ValueError:
            raise ValueError(f"--thresholds: {thresholds!r} is not whole percentages like 50,80,100") from None
        new = Budget(tenant, dimension, value, period, limit, hard, levels, on_stale)
    except ValueError as exc:
        _fail(f"invalid budget: {exc}")
    _send_config(_settings().topic_budgets, new.key, new.to_json())
    kind = "hard" if hard else "soft"
    stale = f"; while spend data is stale: {on_stale}" if hard else ""
    click.echo(
        f"{kind} {period} budget of ${limit} for {new.scope_label}; alerts at {', '.join(map(str, levels))}%{stale}"
    )


@budget.command("delete")
@_scope_options
def budget_delete(tenant: str, **scope: str | None) -> None:
    """Remove the budget of a scope."""
    from streams.budgets import budget_id

    dimension, value = _budget_scope(**scope)
    _send_config(_settings().topic_budgets, budget_id(tenant, dimension, value), None)
    click.echo("deleted")


def _current_budgets() -> list[Any]:
    from streams.budgets import Budget, parse_config_record
    from streams.config_topic import ConfigFollower

    found: dict[str, Budget] = {}

    def apply(key: str, value: bytes | None) -> None:
        record = parse_config_record(key, value)
        if isinstance(record.item, Budget):
            found[key] = record.item
        elif record.kind == "budget":
            found.pop(key, None)

    follower = ConfigFollower(kafka_config(_settings()), _settings().topic_budgets, apply)
    follower.catch_up(3.0)
    follower.close()
    return sorted(found.values(), key=lambda b: (b.tenant_id, b.dimension, b.value))


@budget.command("list")
@click.option("--tenant", default=None)
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)
def budget_list(tenant: str | None, fmt: str) -> None:
    """The budgets in force."""
    import json

    budgets = [b for b in _current_budgets() if tenant is None or b.tenant_id == tenant]
    if fmt == "json":
        click.echo(json.dumps([json.loads(b.to_json()) for b in budgets]))
        return
    table = Table(title="budgets")
    for column in ("scope", "period", "limit", "hard", "thresholds"):
        table.add_column(column, justify="right" if column == "limit" else "left")
    for b in budgets:
        thresholds = ",".join(map(str, b.thresholds))
        table.add_row(cell(b.scope_label), cell(b.period), usd(b.limit), "yes" if b.hard else "no", thresholds)
    Console().print(table)
    click.secho(rounding_note("json"), dim=True)


@cli.group("limit")
def rate_limit() -> None:
    """Rate limits per tenant, feature, user, environment, team, API key, model or tag (QuotaClient.reserve)."""


@rate_limit.command("set")
@_scope_options
@click.option("--calls-per-minute", type=int, default=None)
@click.option("--tokens-per-minute", type=int, default=None)
@click.option("--calls-per-day", type=int, default=None)
def rate_limit_set(
    tenant: str,
    calls_per_minute: int | None,
    tokens_per_minute: int | None,
    calls_per_day: int | None,
    **scope: str | None,
) -> None:
    """Set (or replace) the rate limits of a scope; workers apply them within a second."""
    from streams.budgets import RateLimit

    dimension, value = _budget_scope(**scope)
    try:
        limit = RateLimit(tenant, dimension, value, calls_per_minute, tokens_per_minute, calls_per_day)
    except ValueError as exc:
        _fail(f"invalid rate limit: {exc}")
    _send_config(_settings().topic_budgets, limit.key, limit.to_json())
    click.echo(f"rate limits set for {tenant if dimension == 'tenant' else f'{tenant}/{dimension}={value}'}")


@rate_limit.command("delete")
@_scope_options
def rate_limit_delete(tenant: str, **scope: str | None) -> None:
    """Remove the rate limits of a scope."""
    from streams.budgets import RATE_LIMIT_PREFIX, budget_id

    dimension, value = _budget_scope(**scope)
    _send_config(_settings().topic_budgets, RATE_LIMIT_PREFIX + budget_id(tenant, dimension, value), None)
    click.echo("deleted")


@cli.group()
def alerts() -> None:
    """Alerts the worker fired (budget thresholds, anomalies)."""


@alerts.command("list")
@click.option("--tenant", default=None)
@click.option("--limit", "max_rows", default=200, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)
def alerts_list(tenant: str | None, max_rows: int, fmt: str) -> None:
    """Stored alerts, oldest first."""
    import json

    import psycopg

    from sinks.alerts import list_alerts

    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            rows = list_alerts(conn, tenant, max_rows)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach Postgres: {exc}")
    if fmt == "json":
        click.echo(json.dumps(rows))
        return
    table = Table(title="alerts")
    for column in ("when", "kind", "tenant", "message"):
        table.add_column(column, overflow="fold")
    for a in rows:
        message = usd_in_text(a["message"])  # a budget alert carries the spend at the ledger's precision
        table.add_row(cell(a["created_at"][:19]), cell(a["kind"]), cell(a["tenant_id"]), cell(message))
    Console().print(table)
    click.secho(rounding_note("json"), dim=True)


@cli.command("report")
@click.option("--tenant", default=None, help="One tenant (default: all tenants).")
@click.option(
    "--period", default="month", show_default=True, help="today, week, month, YYYY-MM or YYYY-MM-DD..YYYY-MM-DD (UTC)."
)
@click.option(
    "--format", "fmt", type=click.Choice(["table", "json", "csv", "html"]), default="table", show_default=True
)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--top", default=10, show_default=True, help="How many top requests and conversations.")
@click.option("--trace", "trace_id", default=None, help="Only this trace: its calls in order and what it cost.")
@click.option("--session", "session_id", default=None, help="Only this session (conversation): its calls and cost.")
def report_cmd(
    tenant: str | None,
    period: str,
    fmt: str,
    output: str | None,
    top: int,
    trace_id: str | None,
    session_id: str | None,
) -> None:
    """What was spent, on which models, by which features and users (the four questions); with --trace or
    --session, what one agent run, request or conversation cost, call by call (any period)."""
    import csv
    import io
    import json
    from pathlib import Path

    import psycopg

    from deploy.report_render import print_report, render_html
    from sinks.postgres import tenant_time_zone
    from sinks.reports import build_report, parse_period, report_rows

    if trace_id is not None or session_id is not None:
        _trace_cmd(trace_id, session_id, tenant, fmt, output)
        return
    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            # One tenant's report uses its calendar; a report across tenants uses UTC days.
            chosen = parse_period(period, time_zone=tenant_time_zone(conn, tenant) if tenant else "UTC")
            report = build_report(conn, tenant, chosen, top=top)
    except ValueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach Postgres: {exc}")
    if fmt == "table" and output is None:
        print_report(report)
        return
    if fmt == "table":
        buffer = io.StringIO()
        print_report(report, Console(file=buffer, width=140))
        text = buffer.getvalue()
    elif fmt == "json":
        text = json.dumps(report, indent=2) + "\n"
    elif fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([csv_safe(value) for value in row] for row in report_rows(report))
        text = buffer.getvalue()
    else:
        text = render_html(report)
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


def _trace_cmd(trace_id: str | None, session_id: str | None, tenant: str | None, fmt: str, output: str | None) -> None:
    import csv
    import io
    import json
    from pathlib import Path

    import psycopg

    from deploy.report_render import print_trace
    from sinks.reports import trace_report

    if fmt == "html":
        _fail("--trace and --session print table, json or csv")
    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            report = trace_report(conn, trace_id=trace_id, session_id=session_id, tenant_id=tenant)
    except ValueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach Postgres: {exc}")
    if fmt == "table" and output is None:
        print_trace(report)
        sys.exit(0 if report["calls"] else 1)
    if fmt == "table":
        buffer = io.StringIO()
        print_trace(report, Console(file=buffer, width=160))
        text = buffer.getvalue()
    elif fmt == "json":
        text = json.dumps(report, indent=2) + "\n"
    else:
        columns = [
            "timestamp",
            "event_id",
            "tenant_id",
            "model",
            "feature",
            "user_id",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "latency_ms",
            "price_status",
            "cost",
        ]
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(columns)
        writer.writerows([csv_safe(call[c]) for c in columns] for call in report["calls"])
        text = buffer.getvalue()
    if output is None:
        click.echo(text, nl=False)
    else:
        Path(output).write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)
    if not report["calls"]:
        sys.exit(1)


@cli.command("demo")
@click.option("--duration", default=60.0, show_default=True, help="Seconds of traffic.")
@click.option("--rate", default=600, show_default=True, help="Model calls per second across all services.")
@click.option("--keep-running", is_flag=True, help="Keep traffic flowing until Ctrl-C.")
@click.option(
    "--dashboard-port",
    default=8050,
    show_default=True,
    help="Serve the live dashboard on 127.0.0.1 at this port during the demo (0: none).",
)
def demo(duration: float, rate: int, keep_running: bool, dashboard_port: int) -> None:
    """The main job, from nothing: stack, worker, history, budgets, live traffic, alerts, report."""
    from deploy.demo import run_demo

    try:
        run_demo(_settings(), None if keep_running else duration, rate, Console(), dashboard_port=dashboard_port)
    except StackError as exc:
        _fail(str(exc))


@cli.command("dashboard")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback: only you).")
@click.option("--port", default=8050, show_default=True, help="TCP port (0: any free port).")
def dashboard(host: str, port: int) -> None:
    """A local page that refreshes spend per tenant, budgets, alerts and the pipeline's lag."""
    from deploy.dashboard import make_server, url_of

    try:
        server = make_server(_settings(), host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another with --port")
    click.echo(f"tokenmeter dashboard at {url_of(server)} (refreshes every few seconds; Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@cli.command("otlp")
@click.option("--host", default=None, help="Address to listen on [default: TOKENMETER_OTLP_HOST, 127.0.0.1].")
@click.option("--port", type=int, default=None, help="TCP port, 0: any free one [default: TOKENMETER_OTLP_PORT, 4318].")
@click.option("--loglevel", default="warning", show_default=True, type=click.Choice(["debug", "info", "warning"]))
def otlp(host: str | None, port: int | None, loglevel: str) -> None:
    """Meter OpenTelemetry GenAI spans: an OTLP/HTTP receiver for POST /v1/traces (protobuf or JSON, gzip).

    Spans carrying gen_ai.usage.* tokens become usage events (event id from trace and span id, so a retried
    export counts once) published through the producer library, spool included. Spans with usage but no
    tenant (TOKENMETER_OTLP_TENANT_ATTRIBUTES, default tenant.id on the span or its resource) or otherwise
    invalid go to usage.dlq with the reason, and count as rejected in the response. Roll-up spans that repeat
    their children's usage are not counted (TOKENMETER_OTLP_COUNT_RULE: leaf or operation). Point exporters
    at it with OTEL_EXPORTER_OTLP_ENDPOINT=http://HOST:PORT. SIGTERM or Ctrl-C stops after delivering (or
    spooling) what was received. README: "Sending usage over OpenTelemetry".
    """
    import logging

    from deploy.otlp import serve

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = _settings()
    host, port = host or settings.otlp_host, settings.otlp_port if port is None else port
    try:
        serve(settings, host, port, click.echo)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another with --port")


@cli.group()
def tenant() -> None:
    """Tenant settings: the time zone of its calendar (days, weeks, months)."""


@tenant.command("set")
@click.option("--tenant", "tenant_id", required=True)
@click.option("--timezone", "time_zone", required=True, help="IANA zone, e.g. Europe/Berlin, America/New_York, UTC.")
def tenant_set(tenant_id: str, time_zone: str) -> None:
    """Set a tenant's time zone: its budgets reset, invoices close and reports group at its midnight.

    The tenant's rollups are rebuilt from the ledger in the new zone at once (the pipeline waits a
    moment meanwhile) and its Redis spend is rewritten; budget thresholds already alerted in the
    old calendar may alert once more in the new one.
    """
    import psycopg

    from schemas.periods import PERIODS, zone
    from schemas.redis_keys import spend_key
    from sinks.postgres import set_time_zone
    from sinks.redis import write_spend

    try:
        zone(time_zone)
    except ValueError as exc:
        _fail(str(exc))
    settings = _settings()
    started = time.monotonic()
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            rollups = set_time_zone(conn, tenant_id, time_zone)
    except psycopg.Error as exc:
        _fail(f"cannot set the time zone: {exc}".strip())
    client = redis_client(settings, socket_timeout=5.0)
    # Clear, then write afresh: spend of the old calendar's open day can belong to a day of the new
    # calendar that has ended, which write_spend skips, so its old value would otherwise stay.
    stale = {spend_key(r.tenant_id, r.dimension, r.dimension_value, p) for r in rollups for p in PERIODS}
    stale |= {spend_key(tenant_id, "tenant", "", p) for p in PERIODS}
    client.delete(*stale)
    write_spend(client, rollups)
    click.echo(f"{tenant_id}: time zone {time_zone}; rollups rebuilt in {time.monotonic() - started:.1f} s")


@tenant.command("show")
@click.option("--tenant", "tenant_id", required=True)
def tenant_show(tenant_id: str) -> None:
    """Print a tenant's time zone (UTC unless set)."""
    import psycopg

    from sinks.postgres import tenant_time_zone

    with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
        click.echo(f"{tenant_id}: time zone {tenant_time_zone(conn, tenant_id)}")


@cli.group()
def ratecard() -> None:
    """How a tenant is billed: at cost, cost plus a markup, or custom per-token rates."""


@ratecard.command("set")
@click.option("--tenant", required=True)
@click.option("--pass-through", "pass_through", is_flag=True, help="Bill what the calls cost.")
@click.option("--markup", default=None, help="Cost plus this percentage, e.g. 20.")
@click.option(
    "--rates",
    "rates_file",
    type=click.File("r"),
    default=None,
    help='JSON: {"openai/gpt-4o": {"input_mtok": "3", "output_mtok": "12"}, …}; other models at cost.',
)
@click.option(
    "--currency",
    default=None,
    help="Bill in this ISO 4217 currency (e.g. EUR), from USD at the month's `tokenmeter fx` rate;"
    " default: the card's current one (USD for a new card). Alone, it changes only the currency.",
)
def ratecard_set(
    tenant: str, pass_through: bool, markup: str | None, rates_file: TextIO | None, currency: str | None
) -> None:
    """Set a tenant's rate card (applies to every invoice made from now on)."""
    import json
    from dataclasses import replace
    from decimal import Decimal, InvalidOperation

    import psycopg

    from schemas.currencies import CurrencyError, currency_code
    from sinks.invoices import InvoiceError, RateCard, rate_card, set_rate_card

    only_currency = currency is not None and not (pass_through or markup is not None or rates_file is not None)
    if not only_currency and sum((pass_through, markup is not None, rates_file is not None)) != 1:
        _fail("give exactly one of --pass-through, --markup, --rates (or only --currency)")
    try:
        code = None if currency is None else currency_code(currency)
    except CurrencyError as exc:
        _fail(str(exc))
    try:
        if markup is not None:
            card = RateCard(tenant, "cost_plus", Decimal(markup))
        elif rates_file is not None:
            raw = json.load(rates_file)
            card = RateCard(
                tenant, "custom", rates={m: {k: Decimal(str(v)) for k, v in r.items()} for m, r in raw.items()}
            )
        else:
            card = RateCard(tenant)
    except (InvalidOperation, ValueError, AttributeError) as exc:
        _fail(f"invalid rate card: {exc}")
    with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
        try:
            current = rate_card(conn, tenant)
        except InvoiceError as exc:  # a card broken by hand: a whole new card with its currency replaces it
            if only_currency or code is None:
                _fail(str(exc))
            current = card
        card = replace(current if only_currency else card, currency=code or current.currency)
        set_rate_card(conn, card)
    click.echo(
        f"{tenant}: {card.mode}"
        + (f" +{card.markup_percent.normalize():f}%" if card.mode == "cost_plus" else "")
        + (f", billed in {card.currency}" if card.currency != "USD" else "")
    )


@cli.command("whatif")
@click.option("--tenant", required=True)
@click.option("--period", default="month", show_default=True, help="today, week, month, YYYY-MM or FROM..TO.")
@click.option("--from", "from_model", required=True, help="provider/model used, e.g. openai/gpt-4o")
@click.option("--to", "to_model", required=True, help="provider/model to compare, e.g. openai/gpt-4o-mini")
@click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)
def whatif_cmd(tenant: str, period: str, from_model: str, to_model: str, fmt: str) -> None:
    """What the period would have cost had another model served the same calls (same tokens)."""
    import json

    import psycopg

    from sinks.postgres import tenant_time_zone
    from sinks.reports import parse_period, whatif
    from streams.pricing import PriceBook

    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            chosen = parse_period(period, time_zone=tenant_time_zone(conn, tenant))
            result = whatif(conn, PriceBook(), tenant, chosen, from_model, to_model)
    except ValueError as exc:
        _fail(str(exc))
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach Postgres: {exc}")
    if fmt == "json":
        click.echo(json.dumps(result))
        return
    click.echo(
        f"{tenant}, {result['period']}: {result['calls']:,} calls of {from_model} cost {usd(result['actual_cost'])};"
    )
    click.echo(
        f"with {to_model} they would have cost {usd(result['whatif_cost'])} "
        f"(difference {usd(result['difference'])}, ratio {result['ratio']})"
    )
    click.secho(rounding_note("json"), dim=True)


@cli.command("invoice")
@click.option("--tenant", required=True, help="Tenant id to bill.")
@click.option("--period", required=True, help="Billing month, YYYY-MM (in the tenant's time zone).")
@click.option("--format", "fmt", type=click.Choice(["json", "csv", "table"]), default="table", show_default=True)
@click.option(
    "--finalize", is_flag=True, help="Freeze this ended month's invoice; its late usage goes on the next open invoice."
)
def invoice_cmd(tenant: str, period: str, fmt: str, finalize: bool) -> None:
    """A tenant's invoice for one month, from the Postgres metering tables, under its rate card.

    An open invoice also carries adjustment lines: usage of earlier, finalized months that arrived
    after they were finalized (late events), billed now instead of changing a finalized invoice.
    """
    import csv
    import json
    from datetime import UTC, datetime

    import psycopg

    from deploy.cli_credits import invoice_credit_rows, print_invoice_credits
    from deploy.cli_fx import amount_header, fx_csv_columns, fx_note
    from deploy.output import invoice_rounding_note, summing_column
    from sinks import invoices

    try:
        with psycopg.connect(_settings().database_url, connect_timeout=5) as conn:
            if finalize:
                bill = invoices.finalize(conn, tenant, period, datetime.now(UTC))
                click.echo(f"finalized {tenant} {period}: total {bill.total} {bill.currency}", err=True)
            else:
                bill = invoices.invoice(conn, tenant, period)
    except invoices.InvoiceError as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(f"cannot read the metering database: {exc}".strip())
    document = bill.as_json()
    if fmt == "json":
        click.echo(json.dumps(document, indent=2))
    elif fmt == "csv":
        columns = [
            "provider_model",
            "usage_period",
            "calls",
            "unpriced_calls",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cost",
            "amount",
            "amount_usd",
            *fx_csv_columns(bill),
        ]
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        # From the typed lines, not the JSON document: numbers stay numbers, names are neutralised (csv_safe).
        for line in bill.lines + bill.adjustments:
            row = {**vars(line), **fx_csv_columns(bill)}
            writer.writerow([csv_safe(row[column]) for column in columns])
        total: dict[str, Any] = {"provider_model": "TOTAL", "calls": bill.calls, "amount": bill.total}
        total |= {"amount_usd": bill.total_usd, **fx_csv_columns(bill)}
        writer.writerow([csv_safe(total.get(column)) for column in columns])
        for credit in invoice_credit_rows(bill):  # prepaid credits applied, then the amount due
            writer.writerow([csv_safe(credit.get(column)) for column in columns])
    else:
        title = f"Invoice {bill.tenant_id} {bill.period} ({bill.currency}, {bill.status}, {bill.time_zone})"
        table = Table(title=cell(title))
        for column in (
            "provider/model",
            "usage of",
            "calls",
            "input tok",
            "output tok",
            "cache read",
            "cache write",
            amount_header(bill.currency),
            *(["amount USD"] if bill.fx else []),
        ):
            table.add_column(column, justify="left" if column in ("provider/model", "usage of") else "right")
        rows = bill.lines + bill.adjustments
        # Shown lines add up to the shown total (largest remainder), in each amount column; JSON and CSV are exact.
        shown = [summing_column([line.amount for line in rows], bill.currency)]
        if bill.fx:
            shown.append(summing_column([line.amount_usd or line.amount for line in rows], "USD"))
        for index, line in enumerate(rows):
            counts = [line.calls, line.input_tokens, line.output_tokens]
            counts += [line.cache_read_tokens, line.cache_write_tokens]
            usage_of = line.usage_period + (" (adjustment)" if line.usage_period != bill.period else "")
            amounts = [column.lines[index] for column in shown]
            table.add_row(cell(line.provider_model), cell(usage_of), *(f"{n:,}" for n in counts), *amounts)
        totals = [column.total for column in shown]
        table.add_row("TOTAL", "", f"{bill.calls:,}", "", "", "", "", *totals, style="bold")
        Console().print(table)
        print_invoice_credits(bill)
        click.secho(rounding_note("json", "csv"), dim=True)
        click.secho(invoice_rounding_note(bill.currency), dim=True)
        if note := fx_note(bill):
            click.echo(note)
        if bill.unpriced_calls:
            click.secho(f"{bill.unpriced_calls} unpriced calls (unknown models) are not in the total", fg="yellow")


# ---------------------------------------------------------------- benchmarks
@cli.command("bench")
@click.option("--events", default=100_000, show_default=True, help="Usage events in the pipeline workload.")
@click.option("--record-calls", default=20_000, show_default=True, help="record() calls per latency mode.")
@click.option(
    "--report-rows",
    default=0,
    show_default=True,
    help="Also time reports and an invoice over a scratch ledger of this many rows (e.g. 1000000).",
)
@click.option("--no-pipeline", is_flag=True, help="Skip the record() and pipeline measurements.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line of figures last.")
def bench(events: int, record_calls: int, report_rows: int, no_pipeline: bool, as_json: bool) -> None:
    """Measure the targets of DESIGN.md §7 against the running stack, in one run.

    The library's record() latency (busy callers, back to back, idle callers), then an isolated
    pipeline (own topics and worker, your data untouched): end-to-end events/s, produce-to-quota
    latency under background traffic, the bare consume+decode ceiling and naive per-call INSERTs.
    With --report-rows, report and invoice times over a scratch ledger of that many rows.
    """
    import json
    from dataclasses import asdict

    settings = _settings()
    summary: dict[str, Any] = {}
    if not no_pipeline:
        summary.update(_bench_pipeline(settings, events, record_calls))
    if report_rows:
        from deploy.bench.reports import run_report_bench

        reports = asdict(run_report_bench(settings, report_rows, say=lambda m: click.echo(m, err=True)))
        for key, value in reports.items():
            click.echo(f"{key:>28}: {value:,}", err=True)
        summary["report_bench"] = reports
    if as_json:
        click.echo(json.dumps(summary))


def _bench_pipeline(settings: Settings, events: int, record_calls: int) -> dict[str, Any]:
    import tempfile
    from dataclasses import asdict
    from pathlib import Path

    from deploy.bench.pipeline import run_pipeline_bench
    from deploy.bench.producer import record_latency

    figures = {}
    for rate, idle in ((None, False), (5000, False), (1000, False), (5000, True)):
        result = record_latency(settings, record_calls, rate, idle=idle)
        figures[result.mode] = asdict(result)
        click.echo(
            f"record() {result.mode:>15}: p50 {result.p50_us:5.1f} us  p99 {result.p99_us:5.1f} us  "
            f"max {result.max_us:.0f} us",
            err=True,
        )
    busy = [f for f in figures.values() if not f["mode"].startswith("idle")]
    with tempfile.TemporaryDirectory(prefix="tokenmeter-bench-") as work_dir:
        pipeline = run_pipeline_bench(settings, events, Path(work_dir), say=lambda m: click.echo(m, err=True))
    summary = {
        **asdict(pipeline),
        # The headline is the worst caller that is running (see record_latency on idle callers).
        "record_p50_us": max(f["p50_us"] for f in busy),
        "record_p99_us": max(f["p99_us"] for f in busy),
        "record_p99_us_idle_caller": figures["idle 5000/s"]["p99_us"],
        "record_latency": figures,
        # The yardsticks (#15): the pipeline against the baselines measured in this same run.
        "pipeline_vs_naive_postgres": round(pipeline.pipeline_events_per_s / pipeline.naive_postgres_events_per_s, 2),
        "pipeline_vs_naive_durable_postgres": round(
            pipeline.pipeline_events_per_s / pipeline.naive_durable_postgres_events_per_s, 2
        ),
        "pipeline_vs_bare_consume": round(pipeline.pipeline_events_per_s / pipeline.bare_consume_events_per_s, 3),
    }
    for key in (
        "pipeline_events_per_s",
        "bare_consume_events_per_s",
        "naive_postgres_events_per_s",
        "pipeline_vs_naive_postgres",
        "naive_durable_postgres_events_per_s",
        "pipeline_vs_naive_durable_postgres",
        "p99_event_to_quota_ms",
        "quota_check_p99_us",
        "p99_budget_alert_ms",
    ):
        click.echo(f"{key:>28}: {summary[key]:,}", err=True)
    return summary


from deploy.cli_reconcile import reconcile_cmd  # noqa: E402  (registered last: it imports nothing from here)

cli.add_command(reconcile_cmd)


from deploy.cli_fx import fx  # noqa: E402  (registered last, like reconcile)

cli.add_command(fx)


from deploy.cli_credits import credits_group  # noqa: E402  (registered last, like reconcile)

cli.add_command(credits_group)


def main() -> None:
    cli()
