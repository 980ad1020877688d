"""The ``tokenmeter`` command line."""

from __future__ import annotations

import shlex
import sys
import time

import click

from deploy.settings import Settings, get_settings
from deploy.stack import LocalStack, StackError


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
def dev_up() -> None:
    """Start Kafka, Postgres and Redis (idempotent) and wait until each answers."""
    started = time.monotonic()
    try:
        statuses = LocalStack(_settings()).up(progress=click.echo)
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
def dev_status() -> None:
    """Report each service; exit 1 if any is down."""
    statuses = LocalStack(_settings()).status()
    for status in statuses:
        mark = click.style("up  ", fg="green") if status.running else click.style("down", fg="red")
        click.echo(f"{mark} {status.name:<9} {status.address:<40} {status.detail}")
    if not all(s.running for s in statuses):
        sys.exit(1)


@dev.command("env")
def dev_env() -> None:
    """Print export lines for the local stack's connection settings."""
    s = _settings()
    for name, value in (
        ("TOKENMETER_KAFKA_BOOTSTRAP", s.kafka_bootstrap),
        ("TOKENMETER_DATABASE_URL", s.database_url),
        ("TOKENMETER_REDIS_URL", s.redis_url),
    ):
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


def main() -> None:
    cli()
