"""DESIGN.md §4.1 against the real stack: duplicates, out-of-order timestamps across a month boundary
and two SIGKILLs of the worker mid-stream; invoices still equal the sum over distinct events priced
independently with genai-prices."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import genai_prices

from deploy.bench.workload import UNPRICED, Model, to_json, usage_events
from deploy.isolation import WorkerProcess, committed_total, env_for, isolated, wait_for_commits
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import money
from streams.pricing import usage_of

MODELS = (
    Model("openai", "gpt-4o"),
    Model("openai", "gpt-4o-mini"),
    Model("anthropic", "claude-sonnet-4-5"),
    Model("openai", "o3"),
    Model("google", "gemini-2.5-flash"),
    UNPRICED,
)
TENANTS = ["alpha", "beta", "gamma"]


def workload(unique: str, distinct: int, duplicates: float, seed: int = 7) -> list[dict[str, object]]:
    """``distinct`` events over eight hours across the June/July boundary, about ``duplicates`` × as many
    producer retries (the same event again), all shuffled out of order."""
    events = usage_events(
        distinct,
        seed=seed,
        tenants=[f"{tenant}-{unique}" for tenant in TENANTS],
        users_per_tenant=40,
        models=MODELS,
        start=datetime(2025, 6, 30, 20, tzinfo=UTC),
        span=timedelta(hours=8),
        duplicates=duplicates,
        prefix=unique,
    )
    random.Random(seed).shuffle(events)  # out of order, each retry somewhere after or before its first copy
    return events


def expected_invoices(events: list[dict[str, object]]) -> dict[tuple[str, str], tuple[Decimal, int, int]]:
    """(tenant, YYYY-MM) → (total, calls, unpriced calls) over distinct events, priced by genai-prices."""
    totals: dict[tuple[str, str], list] = defaultdict(lambda: [Decimal(0), 0, 0])
    for data in {e["event_id"]: e for e in events}.values():
        event = validate_event(dict(data))
        row = totals[(event.tenant_id, event.timestamp.strftime("%Y-%m"))]
        row[1] += 1
        if event.provider == "acme-ai":
            row[2] += 1
            continue
        price = genai_prices.calc_price(
            usage_of(event), event.model, provider_id=event.provider, genai_request_timestamp=event.timestamp
        )
        row[0] += money(price.total_price)  # each ledger row holds its cost to 12 places
    return {k: (v[0], v[1], v[2]) for k, v in totals.items()}


def test_two_sigkills_mid_stream_leave_invoices_exact(
    stack: LocalStack, settings: Settings, unique: str, tmp_path: Path
) -> None:
    own = isolated(settings, unique, worker_batch_size=400)
    events = workload(unique, distinct=12_000, duplicates=0.125)
    assert len(events) - len({e["event_id"] for e in events}) > 1_000  # retries
    lines = tmp_path / "usage.jsonl"
    lines.write_text("".join(to_json(e) + "\n" for e in events))
    produced = subprocess.run(
        [sys.executable, "-m", "deploy", "produce", str(lines), "--quiet"],
        env=env_for(own),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert produced.returncode == 0, produced.stderr
    total = len(events)

    worker = WorkerProcess(own, tmp_path)
    try:
        kills = []
        for share in (0.2, 0.55):
            worker.start()
            done = wait_for_commits(own, int(total * share), timeout=120, worker=worker)
            worker.kill()
            kills.append(done)
        assert all(0 < done < total for done in kills), f"kills were not mid-stream: {kills} of {total}"
        worker.start()
        waited = subprocess.run(
            [sys.executable, "-m", "deploy", "lag", "--wait", "--timeout", "180"],
            env=env_for(own),
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert waited.returncode == 0, waited.stderr + worker.output()
        assert committed_total(own) == total

        for (tenant, period), (amount, calls, unpriced) in expected_invoices(events).items():
            bill = subprocess.run(
                [sys.executable, "-m", "deploy", "invoice", "--tenant", tenant, "--period", period, "--format", "json"],
                env=env_for(own),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert bill.returncode == 0, bill.stderr
            invoice = json.loads(bill.stdout)
            assert (Decimal(invoice["total"]), invoice["calls"], invoice["unpriced_calls"]) == (amount, calls, unpriced)
            assert amount > 0 and unpriced > 0
        # Faust's data folder lives under the stack's state folder, not as <worker id>-data in the current one.
        assert (own.home / "faust" / own.worker_id / "v1").is_dir()
        assert not (Path.cwd() / f"{own.worker_id}-data").exists()
    finally:
        worker.stop()
