"""Reconciliation with the provider's bill (``sinks.reconcile``): reading both export shapes exactly,
mapping provider model names, and the per day × model comparison. No server needed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from sinks.reconcile import (
    ExportError,
    MeteredCost,
    ProviderExport,
    ProviderLine,
    canonical_model,
    delta_percent,
    is_mismatch,
    load_json,
    merge_exports,
    mismatch_alerts,
    parse_anthropic_cost_report,
    parse_openai_costs,
    reconcile,
    reconciliation_json,
    reconciliation_rows,
)

SAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "samples" / "reconcile"
NOV2, NOV3, NOV4 = date(2026, 11, 2), date(2026, 11, 3), date(2026, 11, 4)


def load(text: str) -> Any:
    return load_json(text)


def openai_bucket(day: date, *results: dict[str, Any]) -> dict[str, Any]:
    start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
    return {"object": "bucket", "start_time": start, "end_time": start + 86400, "results": list(results)}


def openai_line(value: Any, line_item: str | None, currency: str = "usd") -> dict[str, Any]:
    return {
        "object": "organization.costs.result",
        "amount": {"value": value, "currency": currency},
        "line_item": line_item,
    }


def anthropic_line(amount: Any, model: str | None = "claude-sonnet-4-5-20250929", **extra: Any) -> dict[str, Any]:
    return {"amount": amount, "currency": "USD", "model": model, "description": None, **extra}


def anthropic_page(*buckets: tuple[str, str, list[dict[str, Any]]], has_more: bool = False) -> dict[str, Any]:
    return {
        "data": [{"starting_at": s, "ending_at": e, "results": r} for s, e, r in buckets],
        "has_more": has_more,
        "next_page": None,
    }


# ---------------------------------------------------------------- reading exports
def test_openai_sample_reads_every_line_exactly_across_pages() -> None:
    export = parse_openai_costs(load((SAMPLES / "openai_costs.json").read_text()))
    assert export.provider == "openai"
    assert export.days == {NOV2, NOV3}
    amounts = [(line.day, line.line_item, line.amount) for line in export.lines]
    assert (NOV3, "gpt-4o-2024-08-06, input", Decimal("1.36")) in amounts
    assert all(type(line.amount) is Decimal for line in export.lines)
    # Independent sum of the numbers written in the file: 1.00+0.40+0.30+0.30+0.05 and 1.36+1.14+0.30+0.30.
    assert sum(line.amount for line in export.lines) == Decimal("5.15")
    web = [line for line in export.lines if line.line_item == "web search tool calls"]
    assert web[0].model == "web search tool calls" and web[0].project == "proj_demo"


def test_openai_numbers_are_read_as_written_never_through_float() -> None:
    bucket = openai_bucket(NOV2, openai_line(load("0.1"), "gpt-4o, input"), openai_line(load("0.2"), "gpt-4o, output"))
    export = parse_openai_costs({"data": [bucket], "has_more": False})
    assert sum(line.amount for line in export.lines) == Decimal("0.3")  # 0.1 + 0.2 as floats is 0.30000000000000004
    # A decimal string and an integer are exact too; "result" is the field name in part of OpenAI's reference.
    bucket = {**openai_bucket(NOV2), "result": [openai_line("12.345678901234", "o3, input")]}
    del bucket["results"]
    assert parse_openai_costs({"data": [bucket]}).lines[0].amount == Decimal("12.345678901234")
    assert parse_openai_costs({"data": [openai_bucket(NOV2, openai_line(3, "o3"))]}).lines[0].amount == 3


def test_anthropic_amounts_are_cents_as_decimal_strings() -> None:
    export = parse_anthropic_cost_report(load((SAMPLES / "anthropic_cost_report.json").read_text()))
    assert export.days == {NOV2, NOV3}
    assert [line.amount for line in export.lines if line.day == NOV2] == [
        Decimal("1.50"),
        Decimal("0.75"),
        Decimal("0.20"),
    ]
    # The documentation's own example: "123.45" in USD is $1.2345; and "123.78912" is $1.2378912 exactly.
    page = anthropic_page(
        ("2025-08-01T00:00:00Z", "2025-08-02T00:00:00Z", [anthropic_line("123.45"), anthropic_line("123.78912")])
    )
    assert [line.amount for line in parse_anthropic_cost_report(page).lines] == [
        Decimal("1.2345"),
        Decimal("1.2378912"),
    ]


def test_anthropic_line_labels_say_what_the_cost_was() -> None:
    page = anthropic_page(
        (
            "2026-11-02T00:00:00Z",
            "2026-11-03T00:00:00Z",
            [
                anthropic_line("1", token_type="output_tokens", service_tier="batch"),
                anthropic_line("2", model=None, cost_type="code_execution"),
                anthropic_line("3", model=None),
            ],
        )
    )
    labels = [line.line_item for line in parse_anthropic_cost_report(page).lines]
    assert labels == [
        "claude-sonnet-4-5-20250929 output_tokens batch",
        "code_execution",
        "(all costs: export not grouped by description)",
    ]


def test_json_constants_are_not_amounts() -> None:
    with pytest.raises(ExportError, match="NaN is not an amount"):
        load_json('{"value": NaN}')
    assert load_json('{"value": 1e-3}') == {"value": Decimal("0.001")}


def test_a_saved_export_with_more_pages_to_come_is_refused() -> None:
    page = {"object": "page", "data": [openai_bucket(NOV2)], "has_more": True, "next_page": "page_x"}
    with pytest.raises(ExportError, match="has_more=true"):
        parse_openai_costs(page)
    # The same page followed by the last one is a whole export.
    last = {"object": "page", "data": [openai_bucket(NOV3, openai_line(load("1.5"), "gpt-4o"))], "has_more": False}
    assert parse_openai_costs([page, last]).days == {NOV2, NOV3}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "empty list"),
        ({"object": "page"}, "'data' list"),
        ({"data": ["x"]}, "bucket object"),
        ({"data": [{"start_time": "1793577600", "end_time": 1, "results": []}]}, "Unix seconds"),
        ({"data": [{"start_time": True, "end_time": 1, "results": []}]}, "Unix seconds"),
        ({"data": [{**openai_bucket(NOV2), "end_time": 1793577600 + 3600}]}, "not one day"),
        ({"data": [{**openai_bucket(NOV2), "start_time": 1793577600 + 60, "end_time": 1793664060}]}, "UTC midnight"),
        ({"data": [{**openai_bucket(NOV2), "results": None}]}, "'results' list"),
        ({"data": [openai_bucket(NOV2, "x")]}, "result object"),  # type: ignore[arg-type]
        ({"data": [openai_bucket(NOV2, {"line_item": "o3"})]}, "value and currency"),
        ({"data": [openai_bucket(NOV2, openai_line("ten", "o3"))]}, "not a decimal number"),
        ({"data": [openai_bucket(NOV2, openai_line(True, "o3"))]}, "expected a number"),
        ({"data": [openai_bucket(NOV2, openai_line([1], "o3"))]}, "expected a number"),
        ({"data": [openai_bucket(NOV2, openai_line(load("-0.5"), "o3"))]}, "negative amount"),
        ({"data": [openai_bucket(NOV2, openai_line(load("1e15"), "o3"))]}, "beyond any plausible"),
        ({"data": [openai_bucket(NOV2, openai_line(Decimal("NaN"), "o3"))]}, "finite"),
        ({"data": [openai_bucket(NOV2, openai_line(1, "o3", currency="eur"))]}, "not USD"),
        ({"data": [openai_bucket(NOV2, openai_line(1, "o3\x1b[31m"))]}, "control character U\\+001B"),
        ({"data": [openai_bucket(NOV2, openai_line(1, "x" * 501))]}, "longer than 500"),
        ({"data": [openai_bucket(NOV2, openai_line(1, 7))]}, "expected a string"),  # type: ignore[arg-type]
    ],
)
def test_malformed_openai_exports_say_where_and_why(document: Any, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        parse_openai_costs(document)


@pytest.mark.parametrize(
    ("result", "bucket", "message"),
    [
        (anthropic_line(123), None, "decimal string of cents"),
        (anthropic_line("1,5"), None, "not a decimal number"),
        (anthropic_line("-3"), None, "negative amount"),
        ({**anthropic_line("1"), "currency": "EUR"}, None, "not USD"),
        (anthropic_line("1", model="claude\x00"), None, "control character"),
        (anthropic_line("1"), ("2026-11-02T00:00:00", "2026-11-03T00:00:00Z"), "no time zone"),
        (anthropic_line("1"), ("yesterday", "2026-11-03T00:00:00Z"), "not an RFC 3339 time"),
        (anthropic_line("1"), ("2026-11-02T00:00:00Z", "2026-11-02T01:00:00Z"), "not one day"),
        (anthropic_line("1"), ("2026-11-02T05:00:00+05:00", "2026-11-03T05:00:00+05:00"), None),
    ],
)
def test_malformed_anthropic_exports_say_where_and_why(
    result: dict[str, Any], bucket: tuple[str, str] | None, message: str | None
) -> None:
    start, end = bucket or ("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z")
    page = anthropic_page((start, end, [result]))
    if message is None:  # midnight UTC written with another offset is the same bucket
        assert parse_anthropic_cost_report(page).days == {NOV2}
        return
    with pytest.raises(ExportError, match=message):
        parse_anthropic_cost_report(page)


# ---------------------------------------------------------------- mapping names
@pytest.mark.parametrize(
    ("provider", "name", "expected"),
    [
        ("openai", "gpt-4o-2024-08-06", "gpt-4o"),
        ("openai", "gpt-4o", "gpt-4o"),
        ("openai", "GPT-4o mini", "gpt-4o-mini"),
        ("openai", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("openai", "o3-2025-04-16", "o3"),
        ("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", "ft:gpt-4o-mini-2024-07-18:acme::abc123"),
        ("openai", "web search tool calls", None),
        ("openai", None, None),
        ("openai", "", None),
        ("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic", "claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("anthropic", "claude-sonnet-4-0", "claude-sonnet-4"),
        ("anthropic", "claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("anthropic", "Claude Sonnet 4.5 Usage - Input Tokens", None),
    ],
)
def test_provider_model_names_map_to_ours(provider: str, name: str | None, expected: str | None) -> None:
    assert canonical_model(provider, name) == expected


# ---------------------------------------------------------------- comparing
def export_of(*lines: ProviderLine, days: set[date] | None = None) -> ProviderExport:
    return ProviderExport("openai", frozenset(days or {line.day for line in lines}), lines)


def test_a_twelve_percent_gap_on_one_model_and_day_is_reported_exactly() -> None:
    export = parse_openai_costs(load((SAMPLES / "openai_costs.json").read_text()))
    metered = [
        MeteredCost(NOV2, "gpt-4o", Decimal("1.400000000000"), 4),
        MeteredCost(NOV2, "gpt-4o-mini", Decimal("0.600000000000"), 10),
        MeteredCost(NOV3, "gpt-4o", Decimal("2.200000000000"), 4),
        MeteredCost(NOV3, "gpt-4o-mini-2024-07-18", Decimal("0.35"), 6),  # dated names meet the undated ones
        MeteredCost(NOV3, "gpt-4o-mini", Decimal("0.25"), 4),
    ]
    result = reconcile(export, metered, NOV2, NOV3, "acme")
    assert [(r.day, r.model, r.flagged) for r in result.rows] == [
        (NOV2, "gpt-4o", False),
        (NOV2, "gpt-4o-mini", False),
        (NOV3, "gpt-4o", True),
        (NOV3, "gpt-4o-mini", False),
    ]
    gap = result.flagged[0]
    # Independently: the provider billed 1.36 + 1.14 = 2.50, we metered 2.20; 0.30 is 12 % of 2.50.
    assert gap.provider_cost == Decimal("2.50")
    assert gap.delta == Decimal("0.30")
    assert gap.delta_percent == Decimal("12.00")
    assert gap.provider_names == ("gpt-4o-2024-08-06, input", "gpt-4o-2024-08-06, output")
    mini = result.rows[3]
    assert (mini.calls, mini.metered_names) == (10, ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"))
    # The web search line is listed, with its amount, not compared and not dropped.
    assert [(u.day, u.line_item, u.amount) for u in result.unmapped] == [
        (NOV2, "web search tool calls", Decimal("0.05"))
    ]
    totals = reconciliation_json(result)["totals"]
    assert totals == {
        "provider_mapped": "5.1",
        "provider_unmapped": "0.05",
        "provider": "5.15",
        "metered": "4.8",  # 1.40 + 0.60 + 2.20 + 0.35 + 0.25
        "delta_mapped": "0.3",
    }


def test_delta_percent_is_relative_to_the_provider_and_defined_for_zero() -> None:
    assert delta_percent(Decimal("2.50"), Decimal("2.20")) == Decimal("12.00")
    assert delta_percent(Decimal("2.00"), Decimal("2.20")) == Decimal("-10.00")
    assert delta_percent(Decimal(3), Decimal(1)) == Decimal("66.67")  # rounded half up to 2 places
    assert delta_percent(Decimal(0), Decimal(0)) == Decimal("0.00")
    assert delta_percent(Decimal(0), Decimal("0.5")) is None  # metered spend the provider never billed


def test_flagging_needs_both_the_percentage_and_the_minimum_delta() -> None:
    five = Decimal(5)
    cent = Decimal("0.01")
    assert not is_mismatch(Decimal(100), Decimal(95), five, cent)  # exactly 5 %: not beyond it
    assert is_mismatch(Decimal(100), Decimal("94.99"), five, cent)
    assert is_mismatch(Decimal(100), Decimal("105.01"), five, cent)  # over-metering counts as much
    assert not is_mismatch(Decimal("0.001"), Decimal("0.002"), five, cent)  # 100 % of a tenth of a cent
    assert is_mismatch(Decimal("0.001"), Decimal("0.002"), five, Decimal(0))
    assert is_mismatch(Decimal(0), Decimal(1), five, cent)  # no provider cost at all
    assert not is_mismatch(Decimal(0), Decimal(0), five, cent)


def test_only_days_the_export_covers_inside_the_range_are_compared() -> None:
    export = export_of(ProviderLine(NOV3, "o3, input", "o3", Decimal(1)), days={NOV2, NOV3})
    metered = [
        MeteredCost(NOV2, "o3", Decimal(1), 1),  # covered by an empty bucket: the provider billed nothing
        MeteredCost(NOV3, "o3", Decimal(1), 1),
        MeteredCost(NOV4, "o3", Decimal(9), 9),  # after the export: not compared
    ]
    result = reconcile(export, metered, NOV2, NOV4, None)
    assert result.days == (NOV2, NOV3)
    assert [(r.day, r.provider_cost, r.metered_cost, r.delta_percent, r.flagged) for r in result.rows] == [
        (NOV2, Decimal(0), Decimal(1), None, True),
        (NOV3, Decimal(1), Decimal(1), Decimal("0.00"), False),
    ]
    narrowed = reconcile(export, metered, NOV3, NOV3, None)
    assert [r.day for r in narrowed.rows] == [NOV3]
    empty = reconcile(export, metered, NOV4, NOV4, None)
    assert empty.rows == () and "nothing compared" in empty.notes[0]
    with pytest.raises(ValueError, match="ends before"):
        reconcile(export, metered, NOV3, NOV2, None)


def test_a_project_keeps_only_its_lines() -> None:
    export = export_of(
        ProviderLine(NOV2, "o3", "o3", Decimal(2), project="proj_a"),
        ProviderLine(NOV2, "o3", "o3", Decimal(5), project="proj_b"),
    )
    result = reconcile(export, [MeteredCost(NOV2, "o3", Decimal(2), 3)], NOV2, NOV2, "acme", project="proj_a")
    assert [(r.provider_cost, r.flagged) for r in result.rows] == [(Decimal(2), False)]
    assert result.notes == ("1 lines of other projects/workspaces left out",)


def test_alerts_one_per_flagged_row_with_stable_ids() -> None:
    export = export_of(
        ProviderLine(NOV2, "o3, input", "o3", Decimal("2.50")),
        ProviderLine(NOV2, "gpt-4o, input", "gpt-4o", Decimal("1")),
    )
    metered = [MeteredCost(NOV2, "o3", Decimal("2.2"), 4), MeteredCost(NOV2, "gpt-4o", Decimal("1"), 1)]
    now = datetime(2026, 11, 5, tzinfo=UTC)
    first = mismatch_alerts(reconcile(export, metered, NOV2, NOV2, "acme"), now)
    again = mismatch_alerts(reconcile(export, metered, NOV2, NOV2, "acme"), datetime(2026, 11, 6, tzinfo=UTC))
    assert (
        [a.alert_id for a in first]
        == [a.alert_id for a in again]
        == ["reconcile.mismatch:openai:acme:2026-11-02:o3:2.50"]  # the provider's amount, in cents
    )
    alert = first[0]
    assert (alert.kind, alert.tenant_id, alert.period) == ("reconcile.mismatch", "acme", "2026-11-02")
    assert (alert.current, alert.baseline) == (Decimal("2.2"), Decimal("2.50"))
    assert alert.details["delta_percent"] == "12.00"
    assert alert.message == ("openai/o3 on 2026-11-02: provider billed $2.50, metered $2.20 (delta $0.30, 12.00 %)")
    everyone = mismatch_alerts(reconcile(export, metered, NOV2, NOV2, None), now)
    small = mismatch_alerts(
        reconcile(
            export_of(ProviderLine(NOV2, "o3", "o3", Decimal("0.0012"))), [], NOV2, NOV2, "a", min_delta=Decimal(0)
        ),
        now,
    )
    assert "billed $0.0012, metered $0.00 (delta $0.0012, 100.00 %)" in small[0].message
    assert everyone[0].tenant_id == "*" and everyone[0].alert_id.startswith("reconcile.mismatch:openai:*:")


def test_csv_rows_keep_amounts_as_numbers_and_list_unmapped_lines() -> None:
    export = export_of(
        ProviderLine(NOV2, "o3, input", "o3", Decimal("2.50")),
        ProviderLine(NOV2, "=HYPERLINK(1)", "=HYPERLINK(1)", Decimal("0.1")),
    )
    rows = reconciliation_rows(reconcile(export, [MeteredCost(NOV2, "o3", Decimal("2.2"), 4)], NOV2, NOV2, None))
    assert rows[1] == ["row", "2026-11-02", "o3", Decimal("2.50"), Decimal("2.2"), Decimal("0.30"), Decimal("12.00"), 1]
    assert rows[2] == ["unmapped", "2026-11-02", "=HYPERLINK(1)", Decimal("0.1"), None, None, None, 0]


def test_sums_and_deltas_keep_every_digit_beyond_28() -> None:
    # 31 significant digits each: the default decimal context (28) would round the sum and the delta.
    big, tiny = "123456789012.1234567890123456789", "0.0000000000000000001"
    bucket = openai_bucket(NOV2, openai_line(load(big), "o3, input"), openai_line(load(tiny), "o3, output"))
    metered = [MeteredCost(NOV2, "o3", Decimal("0.000000000001"), 1)]
    result = reconcile(parse_openai_costs({"data": [bucket]}), metered, NOV2, NOV2, None)
    expected = Fraction(Decimal(big)) + Fraction(Decimal(tiny))  # independent: rational arithmetic
    (row,) = result.rows
    assert Fraction(row.provider_cost) == expected and row.provider_cost == Decimal("123456789012.1234567890123456790")
    assert Fraction(row.delta) == expected - Fraction(1, 10**12)
    assert reconciliation_json(result)["totals"]["provider"] == "123456789012.123456789012345679"
    # Cents with 30 decimals become dollars with 32, exactly (scaleb rounds to the context's precision).
    page = anthropic_page(("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", [anthropic_line("1." + "3" * 30)]))
    assert parse_anthropic_cost_report(page).lines[0].amount == Decimal("0.01" + "3" * 30)


def test_a_tiny_provider_amount_gives_a_huge_percentage_not_a_crash() -> None:
    page = anthropic_page(("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", [anthropic_line("0." + "0" * 27 + "1")]))
    metered = [MeteredCost(NOV2, "claude-sonnet-4-5", Decimal(5), 1)]
    (row,) = reconcile(parse_anthropic_cost_report(page), metered, NOV2, NOV2, None).rows
    # (1e-30 − 5) / 1e-30 × 100, to 2 places: −499,999,999,999,999,999,999,999,999,999,900.
    assert row.provider_cost == Decimal("1e-30") and row.flagged
    assert row.delta_percent == Decimal("-499999999999999999999999999999900.00")
    assert Fraction(row.delta_percent) == (Fraction(1, 10**30) - 5) / Fraction(1, 10**30) * 100  # exact here


@pytest.mark.parametrize(
    ("bucket", "message"),
    [
        (openai_bucket(NOV2, openai_line(load("1e-41"), "o3")), "more than 40 decimal places"),
        (openai_bucket(date(1999, 12, 31)), "not between 2000-01-01 and 2100-12-31"),
        (openai_bucket(date(2101, 1, 1)), "not between"),
    ],
)
def test_amounts_and_days_beyond_any_bill_are_refused(bucket: dict[str, Any], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        parse_openai_costs({"data": [bucket]})
    # Trailing zeros are not places: 1.000… (50 zeros) is 1.
    line = openai_line(load("1." + "0" * 50), "o3")
    assert parse_openai_costs({"data": [openai_bucket(NOV2, line)]}).lines[0].amount == 1


def test_a_project_with_an_export_that_names_none_is_refused_not_flagged() -> None:
    # Not grouped by project: keeping "proj_a" would leave no line, and every metered cost would be flagged.
    export = export_of(ProviderLine(NOV2, "o3", "o3", Decimal(2)))
    with pytest.raises(ValueError, match="no line of the export names a project or workspace"):
        reconcile(export, [MeteredCost(NOV2, "o3", Decimal(2), 3)], NOV2, NOV2, "acme", project="proj_a")
    # An export with no line in the range compares nothing either way.
    assert reconcile(export, [], NOV3, NOV3, "acme", project="proj_a").rows == ()


def test_a_day_in_two_buckets_is_refused_as_a_page_saved_twice() -> None:
    page = {"data": [openai_bucket(NOV2, openai_line(load("1.5"), "o3"))], "has_more": False}
    with pytest.raises(ExportError, match="page 1 data\\[0\\]: a second bucket for 2026-11-02"):
        parse_openai_costs([page, page])  # 1.5 would have been billed twice
    twice = anthropic_page(
        ("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", []), ("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", [])
    )
    with pytest.raises(ExportError, match="a second bucket"):
        parse_anthropic_cost_report(twice)
    with pytest.raises(ExportError, match="page 1: a second bucket"):
        merge_exports([parse_openai_costs(page), parse_openai_costs(page)])
    assert merge_exports([parse_openai_costs(page)]).days == {NOV2}


def test_an_export_not_grouped_by_model_is_refused_not_flagged() -> None:
    # OpenAI's own example answer without group_by: one line of $0.06 naming nothing.
    ungrouped = parse_openai_costs({"data": [openai_bucket(NOV2, openai_line(load("0.06"), None))]})
    metered = [MeteredCost(NOV2, "gpt-4o", Decimal("0.06"), 2)]
    with pytest.raises(
        ValueError, match=r"not grouped by model: .* \(e.g. 0.06 USD on 2026-11-02\); .* group_by=line_item"
    ):
        reconcile(ungrouped, metered, NOV2, NOV2, None)
    page = anthropic_page(("2026-11-02T00:00:00Z", "2026-11-03T00:00:00Z", [anthropic_line("6", model=None)]))
    with pytest.raises(ValueError, match=r"group_by\[\]=description"):
        reconcile(parse_anthropic_cost_report(page), metered, NOV2, NOV2, None)
    # A grouped line that names no model (a tool) is listed as unmapped, and the rest compared.
    tool = parse_openai_costs({"data": [openai_bucket(NOV2, openai_line(load("0.06"), "web search tool calls"))]})
    result = reconcile(tool, metered, NOV2, NOV2, None)
    assert [u.amount for u in result.unmapped] == [Decimal("0.06")] and result.rows[0].metered_cost == Decimal("0.06")
    # One line naming nothing among named ones: listed as unmapped, the export is still compared.
    mixed = parse_openai_costs(
        {"data": [openai_bucket(NOV2, openai_line(load("0.06"), "gpt-4o, input"), openai_line(load("0.01"), None))]}
    )
    mixed_result = reconcile(mixed, metered, NOV2, NOV2, None)
    assert [u.amount for u in mixed_result.unmapped] == [Decimal("0.01")]
    assert [(r.provider_cost, r.flagged) for r in mixed_result.rows] == [(Decimal("0.06"), False)]


def test_a_mismatch_fires_again_only_when_the_providers_amount_changes_by_a_cent() -> None:
    metered = [MeteredCost(NOV2, "o3", Decimal("2.2"), 4)]
    now = datetime(2026, 11, 5, tzinfo=UTC)

    def ids(provider_amount: str, tenant: str | None = "acme") -> list[str]:
        export = export_of(ProviderLine(NOV2, "o3, input", "o3", Decimal(provider_amount)))
        return [a.alert_id for a in mismatch_alerts(reconcile(export, metered, NOV2, NOV2, tenant), now)]

    partial = ids("1.104")  # the provider's day not final yet: a false mismatch (−50 %)
    assert partial == ["reconcile.mismatch:openai:acme:2026-11-02:o3:1.10"]
    assert ids("1.1") == ids("1.1049999") == partial  # the same bill (to the cent): stored and sent once
    final = ids("2.5")  # the day settled, still 12 % apart: a new alert with the final numbers
    assert final == ["reconcile.mismatch:openai:acme:2026-11-02:o3:2.50"] and final != partial
    assert ids("2.2") == []  # settled and matching: nothing fires
    assert ids("2.505") == ["reconcile.mismatch:openai:acme:2026-11-02:o3:2.51"]  # half a cent rounds up
    assert ids("999999999999.995", None) == ["reconcile.mismatch:openai:*:2026-11-02:o3:1000000000000.00"]
    no_bill = mismatch_alerts(reconcile(export_of(days={NOV2}), metered, NOV2, NOV2, "acme"), now)
    assert [a.alert_id for a in no_bill] == ["reconcile.mismatch:openai:acme:2026-11-02:o3:0.00"]  # unbilled usage
