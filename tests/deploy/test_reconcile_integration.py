"""``tokenmeter reconcile`` end to end: the shipped sample usage goes through the real pipeline (a worker
on the test stack), then is reconciled with the shipped provider exports, from the file and fetched from
a local fixture server. Expected amounts are computed here from genai-prices and the export's own
numbers, never from the project's aggregates."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price

from deploy.isolation import env_for
from deploy.settings import Settings
from deploy.stack import LocalStack
from producers.producer import UsageProducer
from schemas import codec
from streams.lag import wait_for_sinks
from tests.deploy.cost_api_server import ADMIN_KEY, SAMPLES, CostApi, sample_pages, serve
from tests.helpers import read_all, worker_running

# How the sample exports name models, written out by hand for this test (the mapping under test is
# sinks.reconcile.canonical_model).
PROVIDER_MODEL = {
    "gpt-4o-2024-08-06": "gpt-4o",
    "gpt-4o-mini-2024-07-18": "gpt-4o-mini",
    "claude-sonnet-4-5-20250929": "claude-sonnet-4-5",
}
NOV3 = "2026-11-03"


@pytest.fixture(scope="module")
def running(stack: LocalStack, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with worker_running(settings, tmp_path_factory.mktemp("worker")) as (own, _worker):
        yield own


@pytest.fixture(scope="module")
def tenant(running: Settings, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh tenant with the sample usage, metered by the worker."""
    name = f"recon-{uuid.uuid4().hex[:8]}"
    with UsageProducer(running.model_copy(update={"spool_dir": tmp_path_factory.mktemp("spool")})) as producer:
        for event in sample_events(name):
            producer.record(event)
    assert wait_for_sinks(running, timeout=180)
    return name


def sample_events(tenant: str) -> list[dict[str, Any]]:
    lines = (SAMPLES / "usage.jsonl").read_text().splitlines()
    return [
        {**event, "tenant_id": tenant, "event_id": f"{tenant}-{event['event_id']}"} for event in map(json.loads, lines)
    ]


def expected_metered(tenant: str, provider: str) -> dict[tuple[str, str], Decimal]:
    """Each sample event priced by genai-prices at its own time, summed per UTC day and model."""
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for event in sample_events(tenant):
        if event["provider"] != provider:
            continue
        when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        price = calc_price(
            Usage(input_tokens=event["input_tokens"], output_tokens=event["output_tokens"]),
            model_ref=event["model"],
            provider_id=provider,
            genai_request_timestamp=when,
        )
        totals[(when.astimezone(UTC).date().isoformat(), event["model"])] += price.total_price
    return dict(totals)


def expected_provider(provider: str) -> tuple[dict[tuple[str, str], Decimal], list[tuple[str, Decimal]]]:
    """The sample export's lines summed per day and model, and the lines naming no model we know."""
    name = "openai_costs.json" if provider == "openai" else "anthropic_cost_report.json"
    document = json.loads((SAMPLES / name).read_text(), parse_float=Decimal)
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    other: list[tuple[str, Decimal]] = []
    for page in document if isinstance(document, list) else [document]:
        for bucket in page["data"]:
            if provider == "openai":
                day = datetime.fromtimestamp(bucket["start_time"], UTC).date().isoformat()
            else:
                day = bucket["starting_at"][:10]
            for result in bucket["results"]:
                if provider == "openai":
                    amount, named = result["amount"]["value"], result["line_item"].split(",")[0]
                else:
                    amount, named = Decimal(result["amount"]) / 100, result["model"]
                if named in PROVIDER_MODEL:
                    totals[(day, PROVIDER_MODEL[named])] += amount
                else:
                    other.append((day, amount))
    return dict(totals), other


def run_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy", *args],
        env={**env_for(settings), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def reconcile_json(settings: Settings, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    done = run_cli(settings, "reconcile", *args, "--format", "json", **env)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def check_against_independent_figures(result: dict[str, Any], tenant: str, provider: str) -> None:
    metered = expected_metered(tenant, provider)
    billed, unmapped = expected_provider(provider)
    rows = {(r["day"], r["model"]): r for r in result["rows"]}
    assert set(rows) == set(metered) | set(billed)
    for key, row in rows.items():
        assert Decimal(row["metered_cost"]) == metered.get(key, 0), key
        assert Decimal(row["provider_cost"]) == billed.get(key, 0), key
        assert Decimal(row["delta"]) == billed.get(key, 0) - metered.get(key, 0), key
    assert [(u["day"], Decimal(u["amount"])) for u in result["unmapped"]] == unmapped


def test_the_twelve_percent_gap_is_found_from_the_file_and_from_the_api(running: Settings, tenant: str) -> None:
    sample = str(SAMPLES / "openai_costs.json")
    status, from_file = reconcile_json(running, "--provider", "openai", "--file", sample, "--tenant", tenant)
    assert status == 1  # something is flagged
    check_against_independent_figures(from_file, tenant, "openai")
    flagged = [r for r in from_file["rows"] if r["flagged"]]
    assert [(r["day"], r["model"], r["delta_percent"]) for r in flagged] == [(NOV3, "gpt-4o", "12.00")]
    # Independently: 2.50 billed; 4 calls x (120,000 x $2.50/M + 25,000 x $10/M) = 2.20 metered.
    assert (Decimal(flagged[0]["provider_cost"]), Decimal(flagged[0]["metered_cost"])) == (
        Decimal("2.5"),
        Decimal("2.2"),
    )
    assert [u["line_item"] for u in from_file["unmapped"]] == ["web search tool calls"]

    keys = {"TOKENMETER_OPENAI_ADMIN_KEY": ADMIN_KEY}
    with serve(CostApi({"openai": sample_pages("openai")})) as api:
        keys["TOKENMETER_OPENAI_ADMIN_BASE_URL"] = api.url
        fetch = ("--provider", "openai", "--fetch", "--from", "2026-11-02", "--to", NOV3, "--tenant", tenant)
        status, fetched = reconcile_json(running, *fetch, **keys)
        assert status == 1
        assert fetched["rows"] == from_file["rows"] and fetched["unmapped"] == from_file["unmapped"]
        assert len(api.seen) == 2  # both pages
        table = run_cli(running, "reconcile", *fetch, **keys)
    assert table.returncode == 1 and "MISMATCH" in table.stdout and "web search tool calls" in table.stdout

    # One alert for the flagged day x model, stored once and published once, however often it is reconciled.
    listed = json.loads(run_cli(running, "alerts", "list", "--tenant", tenant, "--format", "json").stdout)
    mine = [a for a in listed if a["kind"] == "reconcile.mismatch"]
    assert [a["alert_id"] for a in mine] == [f"reconcile.mismatch:openai:{tenant}:{NOV3}:gpt-4o:2.50"]
    assert (Decimal(mine[0]["current"]), Decimal(mine[0]["baseline"])) == (Decimal("2.2"), Decimal("2.5"))
    published = [codec.decode("alert", v) for v in read_all(running, running.topic_alerts_anomaly, timeout=10)]
    ours = [a["alert_id"] for a in published if a["tenant_id"] == tenant and a["kind"] == "reconcile.mismatch"]
    assert ours == [mine[0]["alert_id"]]


def test_anthropic_export_matches_and_lists_its_web_search_cost(running: Settings, tenant: str) -> None:
    sample = str(SAMPLES / "anthropic_cost_report.json")
    status, result = reconcile_json(running, "--provider", "anthropic", "--file", sample, "--tenant", tenant)
    assert status == 0  # nothing flagged
    check_against_independent_figures(result, tenant, "anthropic")
    assert [(u["line_item"], u["amount"]) for u in result["unmapped"]] == [("Web Search Usage", "0.2")]
    csv_out = run_cli(
        running, "reconcile", "--provider", "anthropic", "--file", sample, "--tenant", tenant, "--format", "csv"
    )
    assert csv_out.returncode == 0
    assert (
        csv_out.stdout.splitlines()[0]
        == "kind,day,model_or_line_item,provider_cost,metered_cost,delta,delta_percent,flagged"
    )
