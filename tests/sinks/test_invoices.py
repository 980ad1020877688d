"""Finalized invoices against the real Postgres: frozen forever, late usage billed once as an
adjustment on the next open invoice (DESIGN.md §4.3), exact under any rate card."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.events import validate_event
from schemas.records import PricedEvent
from sinks.invoices import InvoiceError, RateCard, finalize, invoice, set_rate_card
from sinks.postgres import write_batch
from streams.pricing import PriceBook


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def calls(tenant: str, name: str, at: datetime, count: int = 1, model: str = "gpt-4o") -> list[PricedEvent]:
    book = PriceBook()
    items = []
    for i in range(count):
        event = validate_event(
            {
                "event_id": f"{tenant}-{name}-{i}",
                "timestamp": at,
                "tenant_id": tenant,
                "provider": "openai",
                "model": model,
                "input_tokens": 1200 + i,
                "cache_read_tokens": 200,
                "output_tokens": 90 + i,
            }
        )
        items.append(PricedEvent(event, book.price(event)))
    return items


def cost(items: list[PricedEvent]) -> Decimal:
    return sum((i.price.total_cost for i in items), Decimal(0))


def test_late_usage_after_finalization_is_an_adjustment_on_the_next_invoice(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"inv-{unique}"
    june = calls(tenant, "june", datetime(2025, 6, 10, tzinfo=UTC), 3)
    write_batch(conn, june)
    with pytest.raises(InvoiceError, match="has not ended"):
        finalize(conn, tenant, "2025-06", now=datetime(2025, 6, 30, 23, tzinfo=UTC))
    frozen = finalize(conn, tenant, "2025-06", now=datetime(2025, 7, 3, tzinfo=UTC))
    assert frozen.status == "finalized" and frozen.total == cost(june) and frozen.calls == 3
    with pytest.raises(InvoiceError, match="already finalized"):
        finalize(conn, tenant, "2025-06", now=datetime(2025, 7, 4, tzinfo=UTC))

    late = calls(tenant, "late", datetime(2025, 6, 29, tzinfo=UTC), 2, model="gpt-4o-mini")
    july = calls(tenant, "july", datetime(2025, 7, 8, tzinfo=UTC), 4)
    write_batch(conn, late + july)
    again = invoice(conn, tenant, "2025-06")
    assert again.as_json() == frozen.as_json()  # a finalized invoice never changes

    set_rate_card(conn, RateCard(tenant, "cost_plus", Decimal("20")))
    open_july = invoice(conn, tenant, "2025-07")
    assert open_july.status == "open"
    assert [(a.usage_period, a.provider_model, a.calls) for a in open_july.adjustments] == [
        ("2025-06", "openai/gpt-4o-mini", 2)
    ]
    assert open_july.adjustments[0].amount == cost(late) * Decimal("1.2")  # billed under today's card, exactly
    assert open_july.total == (cost(july) + cost(late)) * Decimal("1.2") and open_july.calls == 6

    finalize(conn, tenant, "2025-07", now=datetime(2025, 8, 1, 0, 0, 1, tzinfo=UTC))
    assert invoice(conn, tenant, "2025-08").adjustments == []  # billed once, on July's invoice
    later = calls(tenant, "later", datetime(2025, 6, 30, 12, tzinfo=UTC))
    write_batch(conn, later + later)  # a duplicate too: counted once
    august = invoice(conn, tenant, "2025-08")
    assert [(a.usage_period, a.calls, a.amount) for a in august.adjustments] == [
        ("2025-06", 1, cost(later) * Decimal("1.2"))
    ]
    assert json.loads(json.dumps(august.as_json()))["adjustments"][0]["calls"] == 1  # counts stay integers
    assert invoice(conn, tenant, "2025-07").total == (cost(july) + cost(late)) * Decimal("1.2")

    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy",
            "invoice",
            "--tenant",
            tenant,
            "--period",
            "2025-08",
            "--finalize",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["status"] == "finalized" and document["lines"] == []
    assert Decimal(document["total"]) == cost(later) * Decimal("1.2")
    assert document["adjustments"][0]["usage_period"] == "2025-06"
    repeat = subprocess.run(
        [sys.executable, "-m", "deploy", "invoice", "--tenant", tenant, "--period", "2025-08", "--finalize"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert repeat.returncode != 0 and "already finalized" in repeat.stderr
