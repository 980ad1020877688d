"""Reconciliation of metered cost with the provider's own bill (issue #16, part 3).

The provider side is its cost data as its admin API returns it, one or more pages of day buckets:

* OpenAI ``GET /v1/organization/costs`` (``group_by=line_item``): buckets with ``start_time``/``end_time``
  in Unix seconds and ``results`` of ``{"amount": {"value": <number>, "currency": "usd"}, "line_item":
  "gpt-4o-2024-08-06, input", "project_id": …}``. The value is a JSON number in dollars.
* Anthropic ``GET /v1/organizations/cost_report`` (``group_by[]=description``): buckets with RFC 3339
  ``starting_at``/``ending_at`` and ``results`` of ``{"amount": "123.45", "currency": "USD", "model":
  "claude-sonnet-4-5-20250929", "token_type": …, "cost_type": …, "description": …, "workspace_id": …}``.
  The amount is a decimal string in the lowest currency unit: cents, so "123.45" is $1.2345.

Both are read exactly (numbers as ``Decimal``, never float). Provider model names are mapped to ours by
one rule applied to both sides (``canonical_model``): lower case, dated snapshots (``-2024-08-06``,
``-20250929``) and ``-latest`` dropped, a small alias table for display names. A provider line that names
no model (web search, code execution, storage) is *unmapped*: it is listed with its amount, never dropped,
and kept out of the per-model comparison. An export not grouped by line item / description is refused.

The comparison is per UTC day (the providers' buckets are UTC days) × canonical model:
``delta = provider − metered``; ``delta %`` is relative to the provider's amount (the bill is the
reference); with a provider amount of 0 it is undefined (``None``) unless metered is 0 too (0 %). A row is
flagged when ``|delta| ≥ min_delta`` and ``|delta %| > threshold`` (an undefined percentage exceeds any
threshold). Only days the export covers are compared, so a partial export never reads as missing spend.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
    localcontext,
)
from typing import TYPE_CHECKING, Any, Literal

from schemas.events import printable_problem
from schemas.records import Alert, money

if TYPE_CHECKING:  # the CLI imports this module at start-up; psycopg loads only when a command connects
    import psycopg

ProviderName = Literal["openai", "anthropic"]
PROVIDERS: tuple[ProviderName, ...] = ("openai", "anthropic")
ALERT_KIND = "reconcile.mismatch"
# A tenant id for alerts about all tenants together (``--all``): alerts need one, and ``*`` reads as "any".
ALL_TENANTS = "*"
# Far above any real day of one model (a trillion dollars): a larger amount is a broken export.
MAX_AMOUNT = Decimal(10) ** 12
# OpenAI writes float sums (0.30000000000000004); more places than this is not an amount of a bill.
MAX_DECIMAL_PLACES = 40
MAX_NAME_LENGTH = 500
ONE_DAY = timedelta(days=1)
# The label of a line that names nothing at all: the export was saved without grouping by model.
UNGROUPED: dict[ProviderName, str] = {
    "openai": "(all line items: export not grouped by line_item)",
    "anthropic": "(all costs: export not grouped by description)",
}
# Days a bucket or a range may name: before any model API, or a typo such as 20266, is a broken input.
MIN_DAY, MAX_DAY = date(2000, 1, 1), date(2100, 12, 31)
# Sums and differences of amounts keep every digit: an amount has at most 13 + 40 digits, the ledger's
# numeric(38, 12) 38, so 200 digits never round (the default context's 28 would, silently); Inexact is
# trapped so that a result that would be rounded raises instead.
_EXACT = Context(prec=200, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow, Inexact])
_SMALLEST = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)

# A model id as the APIs write them: lower case, digits, dots, dashes, colons (fine-tunes), slashes.
_MODEL_ID = re.compile(r"[a-z0-9][a-z0-9._:/-]*")
# Dated snapshots: OpenAI ``-2024-08-06``, Anthropic ``-20250929``; ``-latest`` aliases the newest one.
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
# Names that are not ids (display names in some OpenAI line items) or ids with another spelling of the
# same model. Keys are lower case; values are canonical model names. Add a line here when a provider's
# export names a model in a new way (the unmapped list in the output says which).
MODEL_ALIASES: dict[tuple[str, str], str] = {
    ("openai", "gpt-4o mini"): "gpt-4o-mini",
    ("openai", "gpt-4.1 mini"): "gpt-4.1-mini",
    ("openai", "gpt-4.1 nano"): "gpt-4.1-nano",
    ("openai", "o4 mini"): "o4-mini",
    ("openai", "o3 mini"): "o3-mini",
    ("openai", "chatgpt-4o"): "chatgpt-4o-latest",
    ("anthropic", "claude-sonnet-4-0"): "claude-sonnet-4",
    ("anthropic", "claude-opus-4-0"): "claude-opus-4",
    ("anthropic", "claude-3-7-sonnet"): "claude-3-7-sonnet",
    ("anthropic", "claude-3-5-sonnet"): "claude-3-5-sonnet",
    ("anthropic", "claude-3-5-haiku"): "claude-3-5-haiku",
}


class ExportError(ValueError):
    """The provider's export cannot be read: the message says where and why."""


@dataclass(frozen=True)
class ProviderLine:
    """One cost line of one day of the provider's export, in USD."""

    day: date
    line_item: str  # as the provider wrote it (OpenAI line item, Anthropic description or model + token type)
    model: str | None  # the provider's model name, when the line names one
    amount: Decimal
    project: str | None = None  # OpenAI project_id / Anthropic workspace_id, when grouped by it


@dataclass(frozen=True)
class ProviderExport:
    provider: ProviderName
    days: frozenset[date]  # the UTC days the export has buckets for (with or without lines)
    lines: tuple[ProviderLine, ...]


@dataclass(frozen=True)
class MeteredCost:
    """Our ledger's cost of one UTC day and one model name as the events wrote it."""

    day: date
    model: str
    cost: Decimal
    calls: int
    unpriced_calls: int = 0


@dataclass(frozen=True)
class ReconciledRow:
    day: date
    model: str  # canonical
    provider_cost: Decimal
    metered_cost: Decimal
    delta: Decimal  # provider − metered
    delta_percent: Decimal | None  # of the provider's amount, 2 places; None when provider is 0 and metered is not
    flagged: bool
    calls: int
    unpriced_calls: int
    provider_names: tuple[str, ...]  # line items / models the provider used
    metered_names: tuple[str, ...]  # model names our events used


@dataclass(frozen=True)
class UnmappedLine:
    day: date
    line_item: str
    amount: Decimal
    reason: str


@dataclass(frozen=True)
class Reconciliation:
    provider: ProviderName
    tenant_id: str | None  # None: all tenants
    first_day: date
    last_day: date
    days: tuple[date, ...]  # compared: covered by the export and inside the range
    threshold_percent: Decimal
    min_delta: Decimal
    rows: tuple[ReconciledRow, ...]
    unmapped: tuple[UnmappedLine, ...]
    notes: tuple[str, ...] = field(default=())

    @property
    def flagged(self) -> tuple[ReconciledRow, ...]:
        return tuple(r for r in self.rows if r.flagged)


# ---------------------------------------------------------------- reading exports
def _no_constant(name: str) -> Any:
    raise ExportError(f"{name} is not an amount")


def load_json(text: str | bytes) -> Any:
    """JSON as the exports need it: numbers with a fraction or exponent as ``Decimal`` (exact, never
    float), ``NaN``/``Infinity`` refused. Raises ``ValueError`` (``ExportError`` among them)."""
    return json.loads(text, parse_float=Decimal, parse_constant=_no_constant)


def _where(path: str, problem: str) -> ExportError:
    return ExportError(f"{path}: {problem}")


def _text(value: object, path: str, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _where(path, f"expected a string, got {type(value).__name__}")
    if len(value) > MAX_NAME_LENGTH:
        raise _where(path, f"longer than {MAX_NAME_LENGTH} characters")
    problem = printable_problem(value)
    if problem:
        raise _where(path, problem)
    return value


def _amount(value: Decimal, path: str) -> Decimal:
    if not value.is_finite():
        raise _where(path, "the amount is not a finite number")
    if value < 0:
        raise _where(path, f"negative amount {value}: credits and refunds are not usage and are not reconciled")
    if value > MAX_AMOUNT:
        raise _where(path, f"amount {value} is beyond any plausible day of one line item")
    with localcontext(_EXACT):
        try:
            value.quantize(_SMALLEST)  # exact when the amount has at most MAX_DECIMAL_PLACES places
        except Inexact:
            raise _where(path, f"amount has more than {MAX_DECIMAL_PLACES} decimal places") from None
    return value


def _decimal(value: object, path: str) -> Decimal:
    """A JSON number (read as Decimal or int) or a decimal string, exactly."""
    if isinstance(value, bool) or not isinstance(value, Decimal | int | str):
        raise _where(path, f"expected a number, got {type(value).__name__}")
    if isinstance(value, str):
        if not re.fullmatch(r"-?\d{1,30}(\.\d{1,30})?", value.strip()):
            raise _where(path, f"{value[:40]!r} is not a decimal number")
        return Decimal(value.strip())
    return Decimal(value)


def _currency(value: object, path: str) -> None:
    if not isinstance(value, str) or value.lower() != "usd":
        raise _where(path, f"currency {value!r} is not USD (tokenmeter meters in USD)")


def _day_of(start: datetime, end: datetime, path: str) -> date:
    """The UTC day of a one-day bucket (both times carry a zone: Unix seconds or checked RFC 3339)."""
    start_utc = start.astimezone(UTC)
    if start_utc.time() != time():
        raise _where(path, f"bucket starts at {start.isoformat()}, not at a UTC midnight (use bucket_width=1d)")
    if end - start != ONE_DAY:
        raise _where(path, f"bucket is {end - start} long, not one day (use bucket_width=1d)")
    if not MIN_DAY <= start_utc.date() <= MAX_DAY:
        raise _where(path, f"bucket day {start_utc.date()} is not between {MIN_DAY} and {MAX_DAY}")
    return start_utc.date()


def _unix(value: object, path: str) -> datetime:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 253_402_300_800:
        raise _where(path, f"expected Unix seconds, got {value!r}")
    return datetime.fromtimestamp(value, UTC)


def _rfc3339(value: object, path: str) -> datetime:
    text = _text(value, path, optional=False)
    assert text is not None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _where(path, f"{text[:40]!r} is not an RFC 3339 time") from None
    if parsed.utcoffset() is None:
        raise _where(path, f"{text[:40]!r} has no time zone")
    return parsed


def _pages(document: object) -> list[dict[str, Any]]:
    """A saved export: one page object, or a JSON array of the pages of one paginated listing."""
    candidates: list[Any] = document if isinstance(document, list) else [document]
    if not candidates:
        raise ExportError("the export is an empty list: expected one page or a list of pages")
    pages: list[dict[str, Any]] = []
    for number, page in enumerate(candidates):
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise ExportError(f"page {number}: expected an object with a 'data' list of buckets")
        pages.append(page)
    last = pages[-1]
    if last.get("has_more") is True:
        raise ExportError(
            "the last page says has_more=true: save every page (a JSON array of the pages, following next_page)"
            " or use --fetch"
        )
    return pages


def _results(bucket: dict[str, Any], path: str) -> list[Any]:
    # The OpenAI reference lists the field as ``result`` in one place and ``results`` in its examples.
    results = bucket.get("results", bucket.get("result"))
    if not isinstance(results, list):
        raise _where(path, "expected a 'results' list")
    return results


def _buckets(pages: list[dict[str, Any]]) -> Iterable[tuple[str, dict[str, Any]]]:
    for number, page in enumerate(pages):
        for index, bucket in enumerate(page["data"]):
            path = f"page {number} data[{index}]"
            if not isinstance(bucket, dict):
                raise _where(path, "expected a bucket object")
            yield path, bucket


def _add_day(days: set[date], day: date, path: str) -> None:
    """A day has one bucket: a second one is a page saved (or pasted) twice, and would count twice."""
    if day in days:
        raise _where(path, f"a second bucket for {day} (a page saved twice?): its costs would count twice")
    days.add(day)


def parse_openai_costs(document: object) -> ProviderExport:
    """Lines of OpenAI ``/v1/organization/costs`` pages (JSON already read with ``parse_float=Decimal``)."""
    days: set[date] = set()
    lines: list[ProviderLine] = []
    for path, bucket in _buckets(_pages(document)):
        start, end = (
            _unix(bucket.get("start_time"), f"{path}.start_time"),
            _unix(bucket.get("end_time"), f"{path}.end_time"),
        )
        day = _day_of(start, end, path)
        _add_day(days, day, path)
        for index, result in enumerate(_results(bucket, path)):
            where = f"{path}.results[{index}]"
            if not isinstance(result, dict):
                raise _where(where, "expected a result object")
            amount = result.get("amount")
            if not isinstance(amount, dict):
                raise _where(f"{where}.amount", "expected an object with value and currency")
            _currency(amount.get("currency"), f"{where}.amount.currency")
            value = _amount(_decimal(amount.get("value"), f"{where}.amount.value"), f"{where}.amount.value")
            line_item = _text(result.get("line_item"), f"{where}.line_item")
            project = _text(result.get("project_id"), f"{where}.project_id")
            model = line_item.rsplit(",", 1)[0].strip() if line_item and "," in line_item else line_item
            label = line_item if line_item is not None else UNGROUPED["openai"]
            lines.append(ProviderLine(day, label, model, value, project))
    return ProviderExport("openai", frozenset(days), tuple(lines))


def parse_anthropic_cost_report(document: object) -> ProviderExport:
    """Lines of Anthropic ``/v1/organizations/cost_report`` pages; amounts are cents as decimal strings."""
    days: set[date] = set()
    lines: list[ProviderLine] = []
    for path, bucket in _buckets(_pages(document)):
        start = _rfc3339(bucket.get("starting_at"), f"{path}.starting_at")
        day = _day_of(start, _rfc3339(bucket.get("ending_at"), f"{path}.ending_at"), path)
        _add_day(days, day, path)
        for index, result in enumerate(_results(bucket, path)):
            where = f"{path}.results[{index}]"
            if not isinstance(result, dict):
                raise _where(where, "expected a result object")
            _currency(result.get("currency"), f"{where}.currency")
            amount = result.get("amount")
            if not isinstance(amount, str):
                raise _where(f"{where}.amount", f"expected a decimal string of cents, got {type(amount).__name__}")
            cents = _decimal(amount, f"{where}.amount")
            with localcontext(_EXACT):  # scaleb rounds to the context's precision: 200 digits never do
                dollars = _amount(cents.scaleb(-2), f"{where}.amount")
            model = _text(result.get("model"), f"{where}.model")
            names = [
                _text(result.get(key), f"{where}.{key}") for key in ("model", "token_type", "cost_type", "service_tier")
            ]
            description = _text(result.get("description"), f"{where}.description")
            label = description or " ".join(n for n in names if n) or UNGROUPED["anthropic"]
            project = _text(result.get("workspace_id"), f"{where}.workspace_id")
            lines.append(ProviderLine(day, label, model, dollars, project))
    return ProviderExport("anthropic", frozenset(days), tuple(lines))


def parse_export(provider: ProviderName, document: object) -> ProviderExport:
    if provider == "openai":
        return parse_openai_costs(document)
    return parse_anthropic_cost_report(document)


def merge_exports(exports: Sequence[ProviderExport]) -> ProviderExport:
    """Pages fetched one by one, as one export (a day in two pages is refused, as in one document)."""
    days: set[date] = set()
    lines: list[ProviderLine] = []
    for number, export in enumerate(exports):
        for day in sorted(export.days):
            _add_day(days, day, f"page {number}")
        lines += export.lines
    return ProviderExport(exports[0].provider, frozenset(days), tuple(lines))


# ---------------------------------------------------------------- mapping names
def canonical_model(provider: str, name: str | None) -> str | None:
    """The model both sides are compared under, or None when ``name`` is not a model id we can read."""
    if not name:
        return None
    key = name.strip().lower()
    key = MODEL_ALIASES.get((provider, key), key)
    if not _MODEL_ID.fullmatch(key):
        return None
    key = _SNAPSHOT_SUFFIX.sub("", key)
    return MODEL_ALIASES.get((provider, key), key)


def _unmapped_reason(line: ProviderLine) -> str:
    if line.model is None:
        return "names no model (not a token cost)"
    return (
        f"{line.model[:80]!r} is not a model id (a tool, storage or other non-token cost?);"
        " if it is a model, add its name to sinks.reconcile.MODEL_ALIASES"
    )


# ---------------------------------------------------------------- comparing
def delta_percent(provider_cost: Decimal, metered_cost: Decimal) -> Decimal | None:
    """(provider − metered) / provider × 100 to 2 places; 0 when both are 0, None when only provider is 0."""
    if provider_cost == 0:
        return Decimal("0.00") if metered_cost == 0 else None
    with localcontext(_EXACT) as context:
        context.traps[Inexact] = False  # the division is the one rounding (to 200 digits, then to 2 places)
        return ((provider_cost - metered_cost) * 100 / provider_cost).quantize(Decimal("0.01"), ROUND_HALF_UP)


def is_mismatch(provider_cost: Decimal, metered_cost: Decimal, threshold_percent: Decimal, min_delta: Decimal) -> bool:
    """``|delta %| > threshold`` and ``|delta| ≥ min_delta``, compared without dividing (exact)."""
    with localcontext(_EXACT):
        delta = abs(provider_cost - metered_cost)
        if delta == 0 or delta < min_delta:
            return False
        return delta * 100 > threshold_percent * abs(provider_cost)


def reconcile(
    export: ProviderExport,
    metered: Sequence[MeteredCost],
    first_day: date,
    last_day: date,
    tenant_id: str | None,
    threshold_percent: Decimal = Decimal(5),
    min_delta: Decimal = Decimal("0.01"),
    project: str | None = None,
) -> Reconciliation:
    """Provider lines against metered costs per UTC day × canonical model, over the days of
    ``first_day..last_day`` (inclusive) that the export covers. ``project`` keeps only the provider
    lines of that OpenAI project / Anthropic workspace. Every sum and difference is exact."""
    if last_day < first_day:
        raise ValueError("the range ends before it starts")
    if threshold_percent < 0 or min_delta < 0:
        raise ValueError("the threshold and the minimum delta cannot be negative")
    with localcontext(_EXACT):
        return _reconcile(export, metered, first_day, last_day, tenant_id, threshold_percent, min_delta, project)


def _reconcile(
    export: ProviderExport,
    metered: Sequence[MeteredCost],
    first_day: date,
    last_day: date,
    tenant_id: str | None,
    threshold_percent: Decimal,
    min_delta: Decimal,
    project: str | None,
) -> Reconciliation:
    days = tuple(sorted(d for d in export.days if first_day <= d <= last_day))
    wanted = set(days)
    in_range = [line for line in export.lines if line.day in wanted]
    if in_range and all(line.line_item == UNGROUPED[export.provider] for line in in_range):
        # Compared as it is, every metered cost would read as unbilled (and be alerted, once for good).
        grouping = "group_by=line_item" if export.provider == "openai" else "group_by[]=description"
        raise ValueError(
            f"the export is not grouped by model: no line of it names a line item or description (e.g."
            f" {_money_text(in_range[0].amount)} USD on {in_range[0].day}); save or fetch it with {grouping}"
        )
    if project is not None and in_range and not any(line.project for line in in_range):
        # Kept, no line would be left and every metered cost would read as unbilled (and be alerted).
        raise ValueError(
            f"--project {project!r}: no line of the export names a project or workspace; save or fetch it"
            " grouped by project_id (OpenAI) or workspace_id (Anthropic; its default workspace has none)"
        )
    provider: dict[tuple[date, str], Decimal] = {}
    provider_names: dict[tuple[date, str], set[str]] = {}
    unmapped: list[UnmappedLine] = []
    notes: list[str] = []
    skipped_projects = 0
    for line in in_range:
        if project is not None and line.project != project:
            skipped_projects += 1
            continue
        model = canonical_model(export.provider, line.model)
        if model is None:
            unmapped.append(UnmappedLine(line.day, line.line_item, line.amount, _unmapped_reason(line)))
            continue
        key = (line.day, model)
        provider[key] = provider.get(key, Decimal(0)) + line.amount
        provider_names.setdefault(key, set()).add(line.line_item)
    if skipped_projects:
        notes.append(f"{skipped_projects} lines of other projects/workspaces left out")
    own: dict[tuple[date, str], list[MeteredCost]] = {}
    for cost in metered:
        if cost.day in wanted:
            model = canonical_model(export.provider, cost.model) or cost.model
            own.setdefault((cost.day, model), []).append(cost)
    rows = []
    for key in sorted(provider.keys() | own.keys()):
        provider_cost = provider.get(key, Decimal(0))
        mine = own.get(key, [])
        metered_cost = sum((c.cost for c in mine), Decimal(0))
        rows.append(
            ReconciledRow(
                day=key[0],
                model=key[1],
                provider_cost=provider_cost,
                metered_cost=metered_cost,
                delta=provider_cost - metered_cost,
                delta_percent=delta_percent(provider_cost, metered_cost),
                flagged=is_mismatch(provider_cost, metered_cost, threshold_percent, min_delta),
                calls=sum(c.calls for c in mine),
                unpriced_calls=sum(c.unpriced_calls for c in mine),
                provider_names=tuple(sorted(provider_names.get(key, ()))),
                metered_names=tuple(sorted({c.model for c in mine})),
            )
        )
    if not days:
        notes.append("the export has no day inside the range: nothing compared")
    if any(r.unpriced_calls for r in rows):
        notes.append("some metered calls are unpriced (unknown model): they count $0 on our side")
    return Reconciliation(
        provider=export.provider,
        tenant_id=tenant_id,
        first_day=first_day,
        last_day=last_day,
        days=days,
        threshold_percent=threshold_percent,
        min_delta=min_delta,
        rows=tuple(rows),
        unmapped=tuple(sorted(unmapped, key=lambda u: (u.day, u.line_item))),
        notes=tuple(notes),
    )


# ---------------------------------------------------------------- metered side
def metered_costs(
    conn: psycopg.Connection, provider: ProviderName, first_day: date, last_day: date, tenant_id: str | None
) -> list[MeteredCost]:
    """Our cost per UTC day and model name, from the ledger (the day rollups follow each tenant's own
    calendar; the providers bill UTC days)."""
    start = datetime.combine(first_day, time(), UTC)
    end = datetime.combine(last_day + ONE_DAY, time(), UTC)
    where = "AND tenant_id = %(tenant)s" if tenant_id is not None else ""
    rows = conn.execute(
        "SELECT (ts AT TIME ZONE 'UTC')::date, model, sum(total_cost), count(*),"
        " count(*) FILTER (WHERE price_status <> 'priced') FROM tokenmeter.ledger"
        f" WHERE ts >= %(start)s AND ts < %(end)s AND lower(provider) = %(provider)s {where}"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        {"start": start, "end": end, "provider": provider, "tenant": tenant_id},
    ).fetchall()
    return [
        MeteredCost(day, model, Decimal(cost), int(calls), int(unpriced)) for day, model, cost, calls, unpriced in rows
    ]


# ---------------------------------------------------------------- output
def _money_text(value: Decimal) -> str:
    """Exact, shortest plain notation (``normalize`` rounds to the context's precision: this one's is 200)."""
    with localcontext(_EXACT):
        return f"{value.normalize():f}" if value else "0"


def reconciliation_json(result: Reconciliation) -> dict[str, Any]:
    """The JSON form: money as exact decimal strings, percentages with 2 places."""
    with localcontext(_EXACT):
        return _reconciliation_json(result)


def _reconciliation_json(result: Reconciliation) -> dict[str, Any]:
    provider_total = sum((r.provider_cost for r in result.rows), Decimal(0))
    metered_total = sum((r.metered_cost for r in result.rows), Decimal(0))
    unmapped_total = sum((u.amount for u in result.unmapped), Decimal(0))
    return {
        "provider": result.provider,
        "tenant_id": result.tenant_id,
        "scope": "one tenant" if result.tenant_id is not None else "all tenants",
        "from": result.first_day.isoformat(),
        "to": result.last_day.isoformat(),
        "days_compared": [d.isoformat() for d in result.days],
        "currency": "USD",
        "threshold_percent": _money_text(result.threshold_percent),
        "min_delta": _money_text(result.min_delta),
        "rows": [
            {
                "day": r.day.isoformat(),
                "model": r.model,
                "provider_cost": _money_text(r.provider_cost),
                "metered_cost": _money_text(r.metered_cost),
                "delta": _money_text(r.delta),
                "delta_percent": None if r.delta_percent is None else f"{r.delta_percent:f}",
                "flagged": r.flagged,
                "calls": r.calls,
                "unpriced_calls": r.unpriced_calls,
                "provider_line_items": list(r.provider_names),
                "metered_models": list(r.metered_names),
            }
            for r in result.rows
        ],
        "unmapped": [
            {"day": u.day.isoformat(), "line_item": u.line_item, "amount": _money_text(u.amount), "reason": u.reason}
            for u in result.unmapped
        ],
        "totals": {
            "provider_mapped": _money_text(provider_total),
            "provider_unmapped": _money_text(unmapped_total),
            "provider": _money_text(provider_total + unmapped_total),
            "metered": _money_text(metered_total),
            "delta_mapped": _money_text(provider_total - metered_total),
        },
        "flagged": len(result.flagged),
        "notes": list(result.notes),
    }


CSV_HEADER = ["kind", "day", "model_or_line_item", "provider_cost", "metered_cost", "delta", "delta_percent", "flagged"]


def reconciliation_rows(result: Reconciliation) -> list[list[str | int | Decimal | None]]:
    """Flat CSV rows: ``row`` lines (day × model) then ``unmapped`` provider lines. Amounts stay Decimal."""
    rows: list[list[str | int | Decimal | None]] = [list(CSV_HEADER)]
    for r in result.rows:
        rows.append(
            [
                "row",
                r.day.isoformat(),
                r.model,
                r.provider_cost,
                r.metered_cost,
                r.delta,
                r.delta_percent,
                int(r.flagged),
            ]
        )
    for u in result.unmapped:
        rows.append(["unmapped", u.day.isoformat(), u.line_item, u.amount, None, None, None, 0])
    return rows


def _dollars(value: Decimal) -> str:
    """An amount in a message: at least cents (``$2.50``), more places only when it has them."""
    with localcontext(_EXACT):
        whole, _, places = f"{abs(value).normalize():f}".partition(".")
    return f"{'-' if value < 0 else ''}${whole}.{places.ljust(2, '0')}"


def mismatch_alert_id(provider: str, tenant: str, day: date, model: str, provider_cost: Decimal) -> str:
    """The id of a ``reconcile.mismatch`` alert: provider, tenant scope, day, model and the provider's
    amount in cents (half up). Reconciling the same day against the same bill again gives the same id, so
    it is stored and sent once; when the provider's figure for the day changes by a cent or more (its cost
    data for a recent day was not final yet) and the row is still flagged, the id changes and it fires
    again with the new numbers, instead of the first, possibly false, alert using the day up for good."""
    cents = provider_cost.quantize(Decimal("0.01"), ROUND_HALF_UP, Context(prec=60))  # rounds: not _EXACT
    return f"{ALERT_KIND}:{provider}:{tenant}:{day.isoformat()}:{model}:{cents:f}"


def mismatch_alerts(result: Reconciliation, now: datetime) -> list[Alert]:
    """One ``reconcile.mismatch`` alert per flagged day × model, with an id (``mismatch_alert_id``) that
    is stable while the provider's amount for that day and model stays the same."""
    tenant = result.tenant_id if result.tenant_id is not None else ALL_TENANTS
    alerts = []
    for r in result.flagged:
        percent = "n/a (no provider cost)" if r.delta_percent is None else f"{r.delta_percent:f} %"
        alerts.append(
            Alert(
                alert_id=mismatch_alert_id(result.provider, tenant, r.day, r.model, r.provider_cost),
                kind=ALERT_KIND,
                tenant_id=tenant,
                scope={"provider": result.provider, "model": r.model},
                period=r.day.isoformat(),
                threshold_percent=None,
                current=money(r.metered_cost),
                baseline=money(r.provider_cost),
                message=(
                    f"{result.provider}/{r.model} on {r.day.isoformat()}:"
                    f" provider billed {_dollars(r.provider_cost)}, metered {_dollars(r.metered_cost)}"
                    f" (delta {_dollars(r.delta)}, {percent})"
                ),
                details={
                    "delta": _money_text(r.delta),
                    "delta_percent": "" if r.delta_percent is None else f"{r.delta_percent:f}",
                    "threshold_percent": _money_text(result.threshold_percent),
                    "provider_line_items": ", ".join(r.provider_names)[:1000],
                },
                created_at=now,
            )
        )
    return alerts
