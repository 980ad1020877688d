"""``tokenmeter credits grant|list|balance|void``: prepaid credits (wallets) of a tenant.

Grants and voids are appended to Postgres (never edited); balances are derived from them and the
usage ledger (``schemas/credits.py``). Workers mirror each prepaid balance to Redis within a second,
where ``QuotaClient.reserve`` refuses a call the balance cannot cover.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from deploy.cli_fx import amount_header, money
from deploy.output import cell, rounding_note, usd
from deploy.settings import get_settings
from schemas.credits import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    Allocation,
    GrantState,
    check_tenant,
    grant_amount,
    plain,
)
from schemas.periods import local_midnight, zone

if TYPE_CHECKING:
    import psycopg

    from sinks.invoices import Invoice

_FORMAT = click.option("--format", "fmt", type=click.Choice(["json", "table"]), default="table", show_default=True)


def _fail(message: str) -> NoReturn:
    click.secho(f"error: {message}", fg="red", err=True)
    sys.exit(1)


@contextmanager
def _database() -> Iterator[psycopg.Connection]:
    import psycopg  # here, not at the top: the rest of the command line starts without it

    try:
        with psycopg.connect(get_settings().database_url, connect_timeout=5, autocommit=True) as conn:
            yield conn
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach Postgres: {str(exc).strip()}")


def parse_instant(text: str, time_zone: str, option: str) -> datetime:
    """``YYYY-MM-DD`` (that day's midnight in the tenant's time zone) or an ISO 8601 time (in the tenant's
    zone unless it names one); ValueError naming ``option`` otherwise."""
    try:
        if len(text) == 10:
            return local_midnight(datetime.strptime(text, "%Y-%m-%d").date(), time_zone)
        at = datetime.fromisoformat(text)
        return (at if at.tzinfo else at.replace(tzinfo=zone(time_zone))).astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: a time at the calendar's very edge, e.g. 0001-01-01
        raise ValueError(f"{option}: {text[:40]!r} is not a date (YYYY-MM-DD) or an ISO 8601 time") from None


@click.group("credits")
def credits_group() -> None:
    """Prepaid credits (wallets): grant, list, balance, void.

    A tenant with a grant that is not voided is on prepaid terms: its spend draws the grants down
    (priority ascending, then earliest expiry, then oldest grant) and QuotaClient.reserve refuses a
    call whose estimated cost exceeds what is left.
    """


@credits_group.command("grant")
@click.option("--tenant", required=True, help="Tenant the credit is for.")
@click.option("--amount", required=True, help="USD of credit, e.g. 500 or 12.50 (up to 12 decimal places).")
@click.option("--expires", default=None, help="YYYY-MM-DD (midnight in the tenant's time zone) or ISO time.")
@click.option("--starts", default=None, help="Usage from this time on draws (default: now). Same forms.")
@click.option(
    "--priority",
    type=click.IntRange(0, MAX_PRIORITY),
    default=DEFAULT_PRIORITY,
    show_default=True,
    help="Lower is drawn first; ties: earliest expiry, then oldest grant.",
)
@click.option("--note", default="", help="Why the credit was given (shown on invoices).")
@_FORMAT
def grant_cmd(
    tenant: str, amount: str, expires: str | None, starts: str | None, priority: int, note: str, fmt: str
) -> None:
    """Give a tenant prepaid credit; workers apply it within a second."""
    from sinks.credits import record_grant
    from sinks.postgres import tenant_time_zone

    with _database() as conn:
        try:
            check_tenant(tenant)  # before it reaches Postgres (which refuses a NUL with its own error)
            time_zone = tenant_time_zone(conn, tenant)
            starts_at = datetime.now(UTC) if starts is None else parse_instant(starts, time_zone, "--starts")
            expires_at = None if expires is None else parse_instant(expires, time_zone, "--expires")
            given = record_grant(
                conn,
                tenant,
                grant_amount(amount),
                priority=priority,
                starts_at=starts_at,
                expires_at=expires_at,
                note=note,
            )
        except ValueError as exc:
            _fail(f"invalid grant: {exc}")
    if fmt == "json":
        click.echo(
            json.dumps({"grant_id": given.grant_id, "tenant_id": given.tenant_id, "amount": plain(given.amount)})
        )
        return
    until = f", expires {given.expires_at.isoformat()}" if given.expires_at else ""
    click.echo(f"grant {given.grant_id}: ${plain(given.amount)} of credit for {tenant} (priority {priority}{until})")


@credits_group.command("void")
@click.option("--grant", "grant_id", type=click.IntRange(1), required=True, help="Grant id (credits list).")
@click.option("--note", default="", help="Why it was voided.")
@_FORMAT
def void_cmd(grant_id: int, note: str, fmt: str) -> None:
    """End a grant now: later usage no longer draws from it; what it had left is recorded as voided."""
    from sinks.credits import CreditError, tenant_allocation, void_grant

    now = datetime.now(UTC)
    with _database() as conn:
        try:
            voided = void_grant(conn, grant_id, now, note)
        except (CreditError, ValueError) as exc:
            _fail(str(exc))
        state = tenant_allocation(conn, voided.tenant_id, now).states[grant_id]
    if fmt == "json":
        click.echo(json.dumps(state.as_json()))
        return
    click.echo(f"grant {grant_id} of {voided.tenant_id} voided; ${plain(state.voided)} of it was left")


def _allocations(tenant: str | None, now: datetime) -> list[Allocation]:
    from sinks.credits import grants_of, tenant_allocation

    if tenant is not None:
        try:
            check_tenant(tenant)
        except ValueError as exc:
            _fail(str(exc))
    with _database() as conn:
        tenants = sorted({g.tenant_id for g in grants_of(conn, tenant)})
        return [tenant_allocation(conn, t, now) for t in tenants]


def _grants_table(title: str, states: list[GrantState]) -> Table:
    table = Table(title=cell(title))
    columns = ("grant", "tenant", "prio", "expires", "status", "amount", "drawn", "left", "lapsed")
    for column in columns:
        table.add_column(column, justify="left" if column in ("tenant", "expires", "status") else "right")
    for s in states:
        g = s.grant
        expires = f"{g.expires_at:%Y-%m-%d %H:%M}".removesuffix(" 00:00") if g.expires_at else "never"
        ended = s.expired + s.voided
        row: list[Any] = [str(g.grant_id), cell(g.tenant_id), str(g.priority), expires, s.status]
        table.add_row(*row, usd(g.amount), usd(s.drawn), usd(s.remaining), usd(ended) if ended else "")
    return table


def _print(*renderables: Any) -> None:
    console = Console()
    for renderable in renderables:
        console.print(renderable)
    click.secho(rounding_note("json"), dim=True)


@credits_group.command("list")
@click.option("--tenant", default=None, help="One tenant (default: all).")
@_FORMAT
def list_cmd(tenant: str | None, fmt: str) -> None:
    """Every grant in draw order: what was drawn, what is left, and what lapsed (expired or voided unused)."""
    allocations = _allocations(tenant, datetime.now(UTC))
    states = [s for a in allocations for s in a.grants]
    if fmt == "json":
        click.echo(json.dumps([s.as_json() for s in states]))
        return
    _print(_grants_table("credit grants (draw order per tenant)", states))


@credits_group.command("balance")
@click.option("--tenant", required=True, help="Tenant id.")
@_FORMAT
def balance_cmd(tenant: str, fmt: str) -> None:
    """What a tenant's credits have left now (what QuotaClient compares estimates with)."""
    found = _allocations(tenant, datetime.now(UTC))
    if not found:
        document: dict[str, Any] = {"tenant_id": tenant, "prepaid": False, "balance": None, "grants": []}
    else:
        a = found[0]
        document = {
            "tenant_id": tenant,
            "prepaid": a.prepaid,
            "balance": plain(a.balance),
            "uncovered": plain(a.uncovered),  # usage no grant covered (billed as amount due)
            "grants": [s.as_json() for s in a.grants],
        }
    if fmt == "json":
        click.echo(json.dumps(document))
        return
    if not found:
        click.echo(f"{tenant} has no credits (postpaid)")
        return
    terms = "prepaid" if found[0].prepaid else "postpaid (every grant voided)"
    heading = f"{tenant}: balance {usd(Decimal(document['balance']))} ({terms})"
    _print(heading, _grants_table(f"grants of {tenant}", found[0].grants))


# ---------------------------------------------------------------- invoices (called by `tokenmeter invoice`)
def invoice_credit_rows(bill: Invoice) -> list[dict[str, Any]]:
    """The CSV rows after an invoice's TOTAL: one per grant applied (a negative amount) and AMOUNT DUE,
    keyed by the invoice's CSV columns (``provider_model`` names the row); none without credits."""
    if not bill.credits:
        return []
    rows: list[dict[str, Any]] = []
    for c in bill.credits:
        label = f"CREDIT grant {c.grant_id}" + (f" ({c.note})" if c.note else "")
        rows.append({"provider_model": label, "amount": -bill.to_currency(c.applied), "amount_usd": -c.applied})
    rows.append({"provider_model": "AMOUNT DUE", "amount": bill.amount_due})
    return rows


def print_invoice_credits(bill: Invoice, console: Console | None = None) -> None:
    """Under an invoice's table: the credits applied per grant and the amount due."""
    if not bill.credits:
        return
    table = Table(title="prepaid credits applied")
    table.add_column("grant", justify="right")
    table.add_column("note")
    table.add_column(amount_header(bill.currency).replace("amount", "applied"), justify="right")
    for c in bill.credits:
        table.add_row(str(c.grant_id), cell(c.note), money(bill.to_currency(c.applied), bill.currency))
    table.add_row("", "AMOUNT DUE", money(bill.amount_due, bill.currency), style="bold")
    (console or Console()).print(table)
