"""``tokenmeter reconcile``: metered cost against the provider's bill, per UTC day × model.

The comparison itself is ``sinks.reconcile`` (pure functions); the provider's data comes from a saved
export (``--file``) or its admin API (``--fetch``, ``deploy.provider_costs``). Flagged rows become
``reconcile.mismatch`` alerts, stored once in Postgres (webhooks deliver them from there) and published
on the alerts topic.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from deploy.output import cell, csv_safe, rounding_note, usd
from deploy.provider_costs import FetchError
from deploy.settings import Settings, get_settings, kafka_config
from schemas.records import Alert
from sinks.reconcile import (
    MAX_DAY,
    MIN_DAY,
    PROVIDERS,
    ExportError,
    ProviderExport,
    ProviderName,
    Reconciliation,
    reconciliation_json,
    reconciliation_rows,
)

MAX_EXPORT_BYTES = 256 * 1024 * 1024
DEFAULT_FETCH_DAYS = 7
# --fetch ends its default range this many days before today (UTC): providers keep revising a day's cost
# data for a while after it ends, and a partial yesterday would read as missing spend and be alerted.
DEFAULT_FETCH_LAG_DAYS = 2
EXIT_FLAGGED = 1
EXIT_BAD_INPUT = 2


def _bad_input(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(EXIT_BAD_INPUT)


def _day(_ctx: click.Context, param: click.Parameter, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a day (YYYY-MM-DD)", param=param) from None
    if not MIN_DAY <= day <= MAX_DAY:
        raise click.BadParameter(f"{value!r} is not between {MIN_DAY} and {MAX_DAY}", param=param)
    return day


def _decimal_option(_ctx: click.Context, param: click.Parameter, value: str) -> Decimal:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise click.BadParameter(f"{value!r} is not a number", param=param) from None
    if not number.is_finite() or number < 0 or number > 10**9:
        raise click.BadParameter(f"{value!r} must be between 0 and 1e9", param=param)
    if number != number.quantize(Decimal("1e-12"), context=Context(prec=40)):  # compared exactly
        raise click.BadParameter(f"{value!r} has more than 12 decimal places", param=param)
    return number


def default_fetch_range(today: date, first: date | None, last: date | None) -> tuple[date, date]:
    """The UTC days ``--fetch`` compares when --from or --to is not given: the DEFAULT_FETCH_DAYS days
    ending DEFAULT_FETCH_LAG_DAYS before ``today`` (with today the 10th: the 2nd to the 8th), or the
    DEFAULT_FETCH_DAYS days ending at --to. UsageError when a given --from is after that default end."""
    end = last or today - timedelta(days=DEFAULT_FETCH_LAG_DAYS)
    start = first or end - timedelta(days=DEFAULT_FETCH_DAYS - 1)
    if end < start:
        raise click.UsageError(
            f"--from {start} is after the default --to ({end}: cost data of the last {DEFAULT_FETCH_LAG_DAYS}"
            " days may not be final); give --to as well"
        )
    return start, end


def read_export_file(provider: ProviderName, path: Path) -> ProviderExport:
    """A saved export: one page or a JSON array of pages, numbers read exactly."""
    from sinks.reconcile import load_json, parse_export

    try:
        with path.open("rb") as file:  # read at most the limit: a FIFO or /dev/zero has no size to check first
            data = file.read(MAX_EXPORT_BYTES + 1)
        if len(data) > MAX_EXPORT_BYTES:
            raise ExportError(f"{path} is larger than {MAX_EXPORT_BYTES // 2**20} MiB")
        document = load_json(data)
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ExportError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, a 5,000-digit integer
        raise ExportError(f"{path} is not valid JSON: {exc}") from None
    return parse_export(provider, document)


def fetch_export(
    settings: Settings, provider: ProviderName, first_day: date, last_day: date, project: str | None
) -> ProviderExport:
    from deploy.provider_costs import fetch_pages
    from sinks.reconcile import merge_exports, parse_export

    if provider == "openai":
        key, base = settings.openai_admin_key, settings.openai_admin_base_url
    else:
        key, base = settings.anthropic_admin_key, settings.anthropic_admin_base_url
    pages = fetch_pages(provider, base, key.get_secret_value(), first_day, last_day, project)
    # Each page is complete in itself (its has_more is the server's, already followed).
    return merge_exports([parse_export(provider, {**page, "has_more": False}) for page in pages])


def publish_alerts(settings: Settings, alerts: list[Alert]) -> str | None:
    """The new alerts on the alerts topic; an error message if Kafka did not take them."""
    from confluent_kafka import KafkaException, Producer

    from producers.kafka_logging import logged
    from schemas import codec

    write = codec.record_writer("alert")
    try:
        producer = Producer(kafka_config(settings, **{"enable.idempotence": True}, **logged()))
        for alert in alerts:
            producer.produce(settings.topic_alerts_anomaly, key=alert.tenant_id.encode(), value=write(alert.to_avro()))
        left = producer.flush(15)
    except (KafkaException, BufferError) as exc:
        return str(exc)
    return f"{left} alerts not acknowledged" if left else None


def print_reconciliation(result: dict[str, Any], console: Console) -> None:
    who = result["tenant_id"] if result["tenant_id"] is not None else "all tenants"
    console.rule(cell(f"reconcile {result['provider']} — {who}, {result['from']} .. {result['to']} (UTC days)"))
    table = Table(show_edge=False)
    for column in ("day", "model", "provider", "metered", "delta", "delta %", ""):
        table.add_column(column, justify="left" if column in ("day", "model", "") else "right")
    for row in result["rows"]:
        percent = "n/a" if row["delta_percent"] is None else row["delta_percent"]
        table.add_row(
            row["day"],
            cell(row["model"]),
            usd(row["provider_cost"]),
            usd(row["metered_cost"]),
            usd(row["delta"]),
            percent,
            cell("MISMATCH", style="bold red") if row["flagged"] else "",
        )
    console.print(table)
    totals = result["totals"]
    console.print(
        f"provider {usd(totals['provider'])} (of which unmapped {usd(totals['provider_unmapped'])}), metered"
        f" {usd(totals['metered'])}; {result['flagged']} of {len(result['rows'])} day × model rows beyond"
        f" {result['threshold_percent']} % (and at least ${result['min_delta']})"
    )
    if result["unmapped"]:
        unmapped = Table(title="provider lines not mapped to a model (not compared)", title_justify="left")
        for column in ("day", "line item", "amount", "why"):
            unmapped.add_column(column, overflow="fold")
        for line in result["unmapped"]:
            unmapped.add_row(line["day"], cell(line["line_item"]), usd(line["amount"]), cell(line["reason"]))
        console.print(unmapped)
    for note in result["notes"]:
        console.print(cell(f"note: {note}", style="yellow"))
    console.print(cell(rounding_note("json", "csv"), style="dim"))


def render(result: Reconciliation, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(reconciliation_json(result), indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer).writerows([csv_safe(value) for value in row] for row in reconciliation_rows(result))
        return buffer.getvalue()
    buffer = io.StringIO()
    print_reconciliation(reconciliation_json(result), Console(file=buffer, width=140))
    return buffer.getvalue()


@click.command("reconcile")
@click.option("--provider", type=click.Choice(PROVIDERS), required=True, help="Whose bill to compare with.")
@click.option(
    "--file",
    "export_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Saved JSON of the provider's cost endpoint: one page or a JSON array of pages.",
)
@click.option(
    "--fetch",
    is_flag=True,
    help=(
        "Fetch it with the admin key in TOKENMETER_<PROVIDER>_ADMIN_KEY. Default range: the 7 UTC days ending"
        " two days ago, since providers may still revise yesterday's costs (a partial day reads as a mismatch)."
    ),
)
@click.option(
    "--from", "first", callback=_day, default=None, help="First UTC day (default: the export's first; --fetch: above)."
)
@click.option(
    "--to",
    "last",
    callback=_day,
    default=None,
    help="Last UTC day, inclusive (default: the export's last; --fetch: two days ago).",
)
@click.option("--tenant", default=None, help="Compare one tenant's metered cost (see README on what that means).")
@click.option("--all", "all_tenants", is_flag=True, help="Compare all tenants together (the default).")
@click.option("--project", default=None, help="Only the provider lines of this OpenAI project / Anthropic workspace.")
@click.option(
    "--threshold", default="5", show_default=True, callback=_decimal_option, help="Flag |delta %| above this."
)
@click.option(
    "--min-delta",
    default="0.01",
    show_default=True,
    callback=_decimal_option,
    help="…and |delta| of at least this (USD).",
)
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="Write to a file.")
@click.option("--no-alerts", is_flag=True, help="Do not store or send reconcile.mismatch alerts.")
def reconcile_cmd(
    provider: ProviderName,
    export_file: Path | None,
    fetch: bool,
    first: date | None,
    last: date | None,
    tenant: str | None,
    all_tenants: bool,
    project: str | None,
    threshold: Decimal,
    min_delta: Decimal,
    fmt: str,
    output: str | None,
    no_alerts: bool,
) -> None:
    """Metered cost vs the provider's own cost data, per UTC day × model: provider, metered, delta
    (provider − metered) and delta % (of the provider's amount), flagging rows beyond --threshold.
    Provider lines that name no model are listed as unmapped, never dropped. A flagged row is a
    reconcile.mismatch alert, stored and sent once per day, model and provider amount (to the cent): it
    fires again only when the provider's figure for that day changes.

    Exit status: 0 when no row is flagged, 1 when some row is flagged, 2 on bad input or when the
    export, the provider API or Postgres cannot be read.
    """
    import psycopg

    from schemas.events import printable_problem
    from sinks.alerts import store_alerts
    from sinks.reconcile import metered_costs, mismatch_alerts, reconcile

    if (export_file is None) == (not fetch):
        raise click.UsageError("give --file EXPORT or --fetch (one of them)")
    if tenant is not None and all_tenants:
        raise click.UsageError("give --tenant T or --all, not both")
    for name, value in (("--tenant", tenant), ("--project", project)):
        problem = printable_problem(value) if value is not None else None
        if problem or (value is not None and not 0 < len(value) <= 200):
            raise click.BadParameter(problem or "must be 1 to 200 characters", param_hint=name)
    if first is not None and last is not None and last < first:
        raise click.UsageError("--to is before --from")
    settings = get_settings()
    try:
        if fetch:
            first, last = default_fetch_range(datetime.now(UTC).date(), first, last)
            export = fetch_export(settings, provider, first, last, project)
        else:
            assert export_file is not None
            export = read_export_file(provider, export_file)
            if not export.days:
                raise ExportError(f"{export_file} has no day buckets")
            first = first or min(export.days)
            last = last or max(export.days)
    except ExportError as exc:
        _bad_input(f"the {provider} export: {exc}")
    except FetchError as exc:
        _bad_input(str(exc))
    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as conn:
            metered = metered_costs(conn, provider, first, last, tenant)
            result = reconcile(export, metered, first, last, tenant, threshold, min_delta, project)
            alerts = [] if no_alerts else mismatch_alerts(result, datetime.now(UTC))
            new = store_alerts(conn, alerts) if alerts else set()
    except (ValueError, ArithmeticError) as exc:  # e.g. --project with an export not grouped by project
        _bad_input(str(exc))
    except psycopg.OperationalError as exc:
        _bad_input(f"cannot reach Postgres: {exc}")
    except psycopg.errors.InsufficientPrivilege as exc:  # storing alerts needs INSERT on tokenmeter.alerts
        _bad_input(f"Postgres: {exc} (--no-alerts compares without storing alerts)")
    except psycopg.Error as exc:  # e.g. a database without the migrations (tokenmeter db migrate)
        _bad_input(f"Postgres: {exc}")
    fresh = [a for a in alerts if a.alert_id in new]
    if fresh:
        problem = publish_alerts(settings, fresh)
        if problem:
            click.secho(
                f"warning: alerts stored but not published on the alerts topic: {problem}", fg="yellow", err=True
            )
    if fmt == "table" and output is None:
        print_reconciliation(reconciliation_json(result), Console())
    else:
        text = render(result, fmt)
        if output is None:
            click.echo(text, nl=False)
        else:
            try:
                Path(output).write_text(text, encoding="utf-8")
            except OSError as exc:
                _bad_input(f"cannot write {output}: {exc.strerror or exc}")
            click.echo(f"wrote {output}", err=True)
    if alerts:
        click.echo(f"{len(fresh)} new reconcile.mismatch alerts ({len(alerts) - len(fresh)} already stored)", err=True)
    sys.exit(EXIT_FLAGGED if result.flagged else 0)
