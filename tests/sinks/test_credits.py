"""Prepaid credits against the real Postgres and Redis: grants drawn down by ledger usage in the
documented order (checked against an independent call-by-call simulation), the worker's Redis mirror
and balance alerts, and invoices with credits applied and amount due, frozen on finalization."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import pytest
import redis
from click.testing import CliRunner
from prometheus_client import REGISTRY

from deploy.cli import cli
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.credits import Grant
from schemas.records import PricedEvent, money
from schemas.redis_keys import credit_balance, credits_key, freshness_key
from sinks.alerts import store_alerts
from sinks.credits import CreditError, grants_of, record_grant, tenant_allocation, void_grant
from sinks.invoices import finalize, invoice
from sinks.postgres import write_batch
from sinks.redis import write_freshness
from streams.credits import CreditFollower
from tests.schemas.test_credits import simulate
from tests.sinks.test_invoices import calls


@pytest.fixture
def conn(stack: LocalStack, settings: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(settings.database_url, autocommit=True) as connection:
        yield connection


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def costs(items: list[PricedEvent]) -> list[tuple[datetime, Decimal]]:
    """Each call's cost as the ledger keeps it (12 places), from the price results, not from Postgres."""
    return [(i.event.timestamp, money(i.price.total_cost)) for i in items]


def give(conn: psycopg.Connection, tenant: str, amount: str, priority: int, starts: str, expires: str | None) -> Grant:
    return record_grant(
        conn,
        tenant,
        Decimal(amount),
        priority=priority,
        starts_at=at(starts),
        expires_at=None if expires is None else at(expires),
        note=f"{amount} at priority {priority}",
    )


def test_ledger_usage_draws_grants_in_the_documented_order_exactly(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"cred-{unique}"
    # Each call costs ~$0.0039; grants are sized in calls, so the order is visible.
    low = give(conn, tenant, "0.01", 5, "2025-06-01", None)  # priority 5: after the priority-1 grants
    late = give(conn, tenant, "0.03", 1, "2025-06-01", "2025-06-20")
    soon = give(conn, tenant, "0.005", 1, "2025-06-01", "2025-06-10")  # priority 1, expires first: drawn first
    future = give(conn, tenant, "1", 0, "2025-07-01", None)  # starts later: June usage cannot touch it
    items = calls(tenant, "a", at("2025-05-31T23:00:00"), 2)  # before every grant: not drawn
    items += calls(tenant, "b", at("2025-06-02"), 4) + calls(tenant, "c", at("2025-06-10"), 3)
    items += calls(tenant, "d", at("2025-06-25"), 5)
    write_batch(conn, items)
    now = at("2025-06-28")
    grants = [low, late, soon, future]
    allocation = tenant_allocation(conn, tenant, now)
    drawn, uncovered = simulate(grants, [c for c in costs(items) if c[0] >= at("2025-06-01")])
    assert {s.grant.grant_id: s.drawn for s in allocation.grants} == drawn
    assert allocation.uncovered == uncovered
    assert [s.grant.grant_id for s in allocation.grants] == [
        future.grant_id,
        soon.grant_id,
        late.grant_id,
        low.grant_id,
    ]
    state = allocation.states
    assert state[soon.grant_id].drawn == Decimal("0.005") and state[soon.grant_id].status == "expired"
    assert state[soon.grant_id].expired == 0  # used up before it expired
    # "late" expired on the 20th with what the calls of the 10th did not take; the 25th drew "low" only
    assert state[late.grant_id].expired == Decimal("0.03") - drawn[late.grant_id] > 0
    assert state[low.grant_id].status in ("active", "used_up") and state[future.grant_id].status == "pending"
    assert allocation.balance == Decimal("0.01") - drawn[low.grant_id]
    assert uncovered > 0  # the 25th's calls cost more than "low" had: the rest is billed as amount due


def test_the_worker_mirrors_the_balance_and_alerts_once_per_grant(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    own = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/14"})
    client = redis.Redis.from_url(own.redis_url)
    tenant = f"mirror-{unique}"
    now = datetime.now(UTC)
    start = (now - timedelta(hours=1)).isoformat()[:19]
    small = give(conn, tenant, "0.005", 0, start, None)
    big = give(conn, tenant, "0.05", 1, start, None)
    items = calls(tenant, "x", now - timedelta(minutes=30), 11)  # ~$0.043: small used up, big at ~24 %
    write_batch(conn, items)
    now_ms = int(now.timestamp() * 1000)
    write_freshness(client, freshness_key(own.worker_id), "test-stage-1", now_ms - 500, now_ms)
    follower = CreditFollower(own)
    alerts = follower.tick(now)
    drawn, _ = simulate([small, big], costs(items))
    expected = Decimal("0.055") - sum(drawn.values())
    mirrored = credit_balance(client.get(credits_key(tenant)))
    assert mirrored == (expected.scaleb(9).to_integral_value(rounding="ROUND_FLOOR").scaleb(-9), now_ms - 500)
    mine = sorted(a.alert_id for a in alerts if a.tenant_id == tenant)
    big_left = (Decimal("0.05") - drawn[big.grant_id]) * 100 / Decimal("0.05")
    want = [f"credits:{small.grant_id}:{level}" for level in (0, 20, 5)]
    want += [f"credits:{big.grant_id}:{level}" for level in (20, 5) if big_left <= level]
    assert mine == sorted(want)
    assert {a.kind for a in alerts if a.tenant_id == tenant} >= {"credits.exhausted", "credits.low"}
    # Until the caller confirms them stored, every round offers the same alerts again (issue #16) ...
    again = follower.tick(now + timedelta(seconds=1))
    assert sorted(a.alert_id for a in again if a.tenant_id == tenant) == mine
    assert store_alerts(conn, alerts) >= set(mine)
    assert store_alerts(conn, again) == set()  # once each: offering them again stores nothing new
    follower.confirm(a.alert_id for a in again)
    # ... and once confirmed, nothing: the balance has not changed, so no alert is derived again.
    assert [a for a in follower.tick(now + timedelta(seconds=1, milliseconds=500)) if a.tenant_id == tenant] == []
    void_grant(conn, small.grant_id, now + timedelta(seconds=2))
    void_grant(conn, big.grant_id, now + timedelta(seconds=2))
    follower.tick(now + timedelta(seconds=3))
    assert client.get(credits_key(tenant)) is None  # every grant voided: postpaid again, no balance to check
    follower.close()


def test_invoices_show_credits_per_grant_and_amount_due_frozen_when_finalized(
    conn: psycopg.Connection, unique: str
) -> None:
    tenant = f"inv-cred-{unique}"
    promo = give(conn, tenant, "0.01", 0, "2025-06-01", "2025-07-15")
    wallet = give(conn, tenant, "0.02", 10, "2025-06-01", None)
    june = calls(tenant, "june", at("2025-06-10"), 4)
    july = calls(tenant, "july", at("2025-07-20"), 3)
    write_batch(conn, june + july)
    grants = [promo, wallet]
    june_drawn, _ = simulate(grants, costs(june))
    june_total = sum((c for _, c in costs(june)), Decimal(0))

    bill = invoice(conn, tenant, "2025-06")
    document = bill.as_json()
    applied = {c["grant_id"]: Decimal(c["applied"]) for c in document["credits"]}
    assert applied == {g: a for g, a in june_drawn.items() if a}
    assert Decimal(document["credits_applied"]) == sum(june_drawn.values())
    assert Decimal(document["amount_due"]) == june_total - sum(june_drawn.values())
    assert promo.grant_id in applied and document["credits"][0]["note"] == "0.01 at priority 0"

    rendered = CliRunner().invoke(cli, ["invoice", "--tenant", tenant, "--period", "2025-06", "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(rendered.output)))
    credited = [g for g in grants if g.grant_id in applied]
    expected = [(f"CREDIT grant {g.grant_id} ({g.note})", -applied[g.grant_id]) for g in credited]
    expected.append(("AMOUNT DUE", june_total - sum(june_drawn.values())))
    assert [(r["provider_model"], Decimal(r["amount"])) for r in rows[-len(expected) :]] == expected
    table = CliRunner().invoke(cli, ["invoice", "--tenant", tenant, "--period", "2025-06"]).output
    assert "prepaid credits applied" in table and "AMOUNT DUE" in table

    frozen = finalize(conn, tenant, "2025-06", now=at("2025-07-02"))
    assert frozen.as_json()["credits"] == document["credits"]
    assert frozen.amount_due == bill.amount_due
    # A late June call now draws credit a finalized invoice already settled: the invoice stays as frozen.
    write_batch(conn, calls(tenant, "late", at("2025-06-11"), 2))
    assert invoice(conn, tenant, "2025-06").as_json() == frozen.as_json()

    # July: its own calls and the late June calls (its adjustment line) get the credit they drew; June's
    # frozen credits are not applied again, so per grant June + July apply exactly what every call drew.
    late = calls(tenant, "late", at("2025-06-11"), 2)
    open_july = invoice(conn, tenant, "2025-07").as_json()
    july_applied = {c["grant_id"]: Decimal(c["applied"]) for c in open_july["credits"]}
    every, every_uncovered = simulate(grants, costs(june + late + july))
    assert july_applied == {g: every[g] - june_drawn[g] for g in every if every[g] != june_drawn[g]}
    july_total = sum((c for _, c in costs(july + late)), Decimal(0))  # pass-through: billed at cost
    assert Decimal(open_july["total"]) == july_total
    assert Decimal(open_july["amount_due"]) == july_total - sum(july_applied.values(), Decimal(0))
    assert Decimal(document["amount_due"]) + Decimal(open_july["amount_due"]) == every_uncovered


def test_late_usage_of_a_finalized_month_is_paid_once_by_credit_or_amount_due(
    conn: psycopg.Connection, unique: str
) -> None:
    """Issue #16: the late calls' adjustment line gets the credit they drew. Over every invoice, amount due
    plus credits applied is the cost of every call once, and each grant applies exactly what the
    call-by-call simulation says every call drew from it."""
    tenant = f"late-cred-{unique}"
    promo = give(conn, tenant, "0.006", 0, "2025-03-01", "2025-05-01")  # expires before the May calls
    wallet = give(conn, tenant, "0.02", 10, "2025-03-01", None)
    grants = [promo, wallet]
    batches = {
        "2025-03": calls(tenant, "march", at("2025-03-05"), 3),
        "2025-04": calls(tenant, "april", at("2025-04-03"), 2) + calls(tenant, "late-march", at("2025-03-02"), 2),
        "2025-05": calls(tenant, "may", at("2025-05-07"), 3)
        + calls(tenant, "late-march-2", at("2025-03-20"), 1)
        + calls(tenant, "late-april", at("2025-04-01"), 2),
    }
    everything: list[PricedEvent] = []
    bills = []
    for period, items in batches.items():  # each month's calls (and late ones) arrive, then it is finalized
        write_batch(conn, items)
        everything += items
        ends = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC) + timedelta(days=32)
        bills.append(finalize(conn, tenant, period, now=ends).as_json())
    drawn, uncovered = simulate(grants, costs(everything))
    all_cost = sum((c for _, c in costs(everything)), Decimal(0))
    applied = {g.grant_id: Decimal(0) for g in grants}
    for bill in bills:
        credits = sum((Decimal(c["applied"]) for c in bill["credits"]), Decimal(0))
        assert credits == Decimal(bill["credits_applied"]) <= Decimal(bill["total"])
        for c in bill["credits"]:
            applied[c["grant_id"]] += Decimal(c["applied"])
    assert applied == drawn
    assert drawn[promo.grant_id] > 0 and drawn[wallet.grant_id] == Decimal("0.02")  # both drawn, wallet used up
    assert sum(Decimal(b["amount_due"]) + Decimal(b["credits_applied"]) for b in bills) == all_cost
    assert sum(Decimal(b["amount_due"]) for b in bills) == uncovered > 0
    assert [len(b["adjustments"]) > 0 for b in bills] == [False, True, True]
    # Finalized invoices read back as frozen: their credits do not move with later usage.
    assert [invoice(conn, tenant, p).as_json()["credits"] for p in batches] == [b["credits"] for b in bills]


def test_voids_are_recorded_once_and_refused_when_they_cannot_apply(conn: psycopg.Connection, unique: str) -> None:
    tenant = f"void-{unique}"
    g = give(conn, tenant, "5", 1, "2025-01-01", "2025-02-01")
    with pytest.raises(CreditError, match="expired"):
        void_grant(conn, g.grant_id, at("2025-03-01"))
    live = give(conn, tenant, "5", 1, "2025-01-01", None)
    void_grant(conn, live.grant_id, at("2025-03-01"), "customer churned")
    with pytest.raises(CreditError, match="already voided"):
        void_grant(conn, live.grant_id, at("2025-03-02"))
    with pytest.raises(CreditError, match="no grant"):
        void_grant(conn, 10**15, at("2025-03-02"))
    assert [x.voided_at for x in grants_of(conn, tenant)] == [None, at("2025-03-01")]


def test_the_credits_commands(stack: LocalStack, unique: str) -> None:
    runner = CliRunner()
    tenant = f"cli-{unique}"

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, ["credits", *args])
        return result.exit_code, result.output

    code, out = run("grant", "--tenant", tenant, "--amount", "500", "--expires", "2099-01-01", "--format", "json")
    assert code == 0, out
    granted = json.loads(out)
    assert granted["amount"] == "500" and granted["tenant_id"] == tenant
    code, out = run("grant", "--tenant", tenant, "--amount", "12.5", "--priority", "0", "--note", "welcome")
    assert code == 0 and "$12.5 of credit" in out
    code, out = run("balance", "--tenant", tenant, "--format", "json")
    balance = json.loads(out)
    assert balance["prepaid"] is True and Decimal(balance["balance"]) == Decimal("512.5")
    assert [g["priority"] for g in balance["grants"]] == [0, 100]  # draw order
    code, out = run("list", "--tenant", tenant, "--format", "json")
    assert [g["amount"] for g in json.loads(out)] == ["12.5", "500"]
    code, out = run("void", "--grant", str(granted["grant_id"]), "--format", "json")
    assert code == 0 and json.loads(out)["voided"] == "500" and json.loads(out)["status"] == "voided"
    code, out = run("balance", "--tenant", tenant)
    assert code == 0 and "$12.50" in out
    for bad, problem in [
        (["--amount", "-1"], "positive"),
        (["--amount", "1e99"], "at most"),
        (["--amount", "0.1234567890123"], "decimal places"),
        (["--amount", "1", "--note", "a\x07b"], "control character"),
        (["--amount", "1", "--expires", "tomorrow"], "not a date"),
        (["--amount", "1", "--starts", "2030-01-01", "--expires", "2029-01-01"], "before it starts"),
    ]:
        code, out = run("grant", "--tenant", tenant, *bad)
        assert code == 1 and problem in out, (bad, out)
    for command in (["grant", "--amount", "1"], ["balance"], ["list"]):
        code, out = run(*command, "--tenant", "bad\x00tenant")
        assert code == 1 and "control character U+0000" in out, (command, out)
    code, out = run("void", "--grant", str(granted["grant_id"]))
    assert code == 1 and "already voided" in out


def test_a_tenant_whose_balance_cannot_be_derived_is_skipped_and_counted(
    conn: psycopg.Connection, settings: Settings, unique: str
) -> None:
    """A corrupt ledger row (a negative cost, written past the sink) stops only its own tenant's balance."""
    own = settings.model_copy(update={"redis_url": settings.redis_url.rsplit("/", 1)[0] + "/14"})
    client = redis.Redis.from_url(own.redis_url)
    bad, good = f"bad-{unique}", f"good-{unique}"
    give(conn, bad, "1", 0, "2025-06-01", None)
    give(conn, good, "2", 0, "2025-06-01", None)
    conn.execute("SELECT tokenmeter.ensure_ledger_partition('2025-06-05')")
    conn.execute(
        "INSERT INTO tokenmeter.ledger (event_id, ts, tenant_id, provider, model, input_tokens, output_tokens,"
        " cache_read_tokens, cache_write_tokens, price_status, input_cost, output_cost, total_cost, price_source)"
        " VALUES (%s, '2025-06-05', %s, 'openai', 'gpt-4o', 0, 0, 0, 0, 'priced', 0, 0, -1, 'test')",
        (f"corrupt-{unique}", bad),
    )

    def rejected() -> float:
        return REGISTRY.get_sample_value("tokenmeter_config_records_rejected_total", {"topic": "credit_grants"}) or 0.0

    before = rejected()
    follower = CreditFollower(own)
    follower.tick(datetime.now(UTC))
    follower.tick(datetime.now(UTC))  # the same data again: not retried, not counted twice
    follower.close()
    assert rejected() == before + 1
    assert client.get(credits_key(bad)) is None
    mirrored = credit_balance(client.get(credits_key(good)))
    assert mirrored is not None and mirrored[0] == Decimal(2)
