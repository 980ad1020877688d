"""Fault scenarios on the real stack (DESIGN §4.1, §4.6, §4.7): a store or the broker goes away while
traffic flows; afterwards every invariant is checked against independent computations.

Invariants after each scenario: every distinct event billed exactly once at genai-prices' price (not
the project's aggregates); Redis spend equals the Postgres rollups of every open period; the worker
never exited for a transient fault; lag drains. During a Postgres outage the quota answer turns
``stale`` and a hard budget with ``on_stale=block`` refuses calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import psycopg
import pytest
import redis
from confluent_kafka import Producer

from deploy.bench.workload import Model, Tenant, Workload
from deploy.isolation import WorkerProcess, env_for, isolated
from deploy.settings import Settings, kafka_config
from deploy.stack import LocalStack
from producers.quota import QuotaClient
from schemas.periods import PERIODS
from schemas.records import money
from schemas.redis_keys import spend_key, spend_value
from streams.budgets import Budget
from streams.lag import wait_for_sinks

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MODELS = (Model("openai", "gpt-4o"), Model("openai", "gpt-4o-mini"), Model("anthropic", "claude-sonnet-4-5"))


class Traffic:
    """Raw usage events at a steady rate from a thread, remembered for the reference computation: the
    shared workload's calls, stamped now, every tenant on one model of ``MODELS`` (the i-th tenant on the
    i-th, round: ``test_postgres_down_for_60s_under_traffic``'s second tenant spends slowly on gpt-4o-mini)."""

    def __init__(self, settings: Settings, tenants: list[str], rate: float = 200.0) -> None:
        self.settings, self.tenants, self.rate = settings, tenants, rate
        self.sent: list[dict[str, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = Producer(kafka_config(self.settings, **{"enable.idempotence": True, "linger.ms": 5}))
        mix = Workload(tuple(Tenant(t, models=(MODELS[n % len(MODELS)],)) for n, t in enumerate(self.tenants)))
        calls = mix.calls(seed=11)
        i = 0
        started = time.monotonic()
        while not self._stop.is_set():
            event: dict[str, object] = {
                **next(calls),
                "event_id": uuid.uuid4().hex,
                "timestamp": datetime.now(UTC).isoformat(),
            }
            producer.produce(
                self.settings.topic_raw, key=str(event["tenant_id"]).encode(), value=json.dumps(event).encode()
            )
            if i % 10 == 0:  # a producer retry: the same event again
                producer.produce(
                    self.settings.topic_raw, key=str(event["tenant_id"]).encode(), value=json.dumps(event).encode()
                )
            self.sent.append(event)
            producer.poll(0)
            i += 1
            time.sleep(max(0.0, started + i / self.rate - time.monotonic()))
        assert producer.flush(60) == 0

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(90)


def reference(sent: list[dict[str, object]]) -> dict[str, tuple[Decimal, int]]:
    """tenant → (total cost, calls) over distinct events, each priced by genai-prices at its time."""
    totals: dict[str, tuple[Decimal, int]] = {}
    for event in {e["event_id"]: e for e in sent}.values():
        usage = genai_prices.Usage(
            input_tokens=int(str(event["input_tokens"])),
            cache_read_tokens=int(str(event["cache_read_tokens"])),
            output_tokens=int(str(event["output_tokens"])),
        )
        at = datetime.fromisoformat(str(event["timestamp"]))
        price = genai_prices.calc_price(
            usage, str(event["model"]), provider_id=str(event["provider"]), genai_request_timestamp=at
        )
        cost, calls = totals.get(str(event["tenant_id"]), (Decimal(0), 0))
        totals[str(event["tenant_id"])] = (cost + money(price.total_price), calls + 1)
    return totals


def check_invariants(settings: Settings, traffic: Traffic, worker: WorkerProcess, starts: int = 1) -> float:
    """The invariants of the module doc; returns how long the pipeline took to drain."""
    started = time.monotonic()
    assert wait_for_sinks(settings, timeout=240), worker.output()
    drained = time.monotonic() - started
    billed_exactly_once_and_mirrored(settings, traffic)
    assert worker.alive() and worker.starts == starts, worker.output()  # never exited for a transient fault
    return drained


def billed_exactly_once_and_mirrored(settings: Settings, traffic: Traffic) -> None:
    """Once the sinks caught up: each distinct event billed once at genai-prices' price; Redis spend of
    every open period equals Postgres."""
    expected = reference(traffic.sent)
    with psycopg.connect(settings.database_url) as conn:
        billed = {
            tenant: (cost, calls)
            for tenant, cost, calls in conn.execute(
                "SELECT tenant_id, sum(total_cost), count(*) FROM tokenmeter.ledger WHERE tenant_id = ANY(%s)"
                " GROUP BY tenant_id",
                (traffic.tenants,),
            ).fetchall()
        }
        windows = conn.execute(
            "SELECT tenant_id, granularity, cost FROM tokenmeter.rollups WHERE tenant_id = ANY(%s)"
            " AND dimension = 'tenant' AND granularity IN ('day', 'week', 'month')"
            " AND window_start = date_trunc(granularity, now(), 'UTC')",
            (traffic.tenants,),
        ).fetchall()
    assert billed == expected  # exactly once, at genai-prices' price, to the last decimal
    client = redis.Redis.from_url(settings.redis_url)
    now = datetime.now(UTC)
    deadline = time.monotonic() + 10
    while True:  # Redis mirrors what Postgres committed (written right after each batch)
        mirrored = {(t, g): spend_value(client.get(spend_key(t, "tenant", "", g)), now) for t, g, _ in windows}
        if mirrored == {(t, g): c for t, g, c in windows} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert mirrored == {(t, g): c for t, g, c in windows}
    assert {g for _, g, _ in windows} == set(PERIODS)


@pytest.fixture
def running(stack: LocalStack, settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, WorkerProcess]]:
    own = isolated(settings, uuid.uuid4().hex[:10])
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    Traffic(own, ["warm-up"], rate=50).__enter__().__exit__()
    assert wait_for_sinks(own, timeout=120), worker.output()
    yield own, worker
    worker.stop()


def outage(
    stop: Callable[[], None], start: Callable[[], None], seconds: float, during: Callable[[], None] | None = None
) -> None:
    stop()
    try:
        deadline = time.monotonic() + seconds
        if during is not None:
            during()
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        start()


def test_postgres_down_for_60s_under_traffic(stack: LocalStack, running: tuple[Settings, WorkerProcess]) -> None:
    own, worker = running
    tenants = [f"pg-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    guarded = tenants[0]
    budget = Budget(guarded, "tenant", "", "month", Decimal(1000), hard=True, on_stale="block")
    command = [
        sys.executable,
        "-m",
        "deploy",
        "budget",
        "set",
        "--tenant",
        guarded,
        "--limit",
        "1000",
        "--hard",
        "--on-stale",
        "block",
    ]
    done = subprocess.run(command, env=env_for(own), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    quota = QuotaClient(own.model_copy(update={"quota_stale_after_s": 3.0}))
    seen: dict[str, object] = {}
    lenient = tenants[1]  # a hard budget with on_stale=allow, set to run out during the outage

    def while_down() -> None:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            answer = quota.check(guarded)
            if answer.stale:
                seen["stale"] = answer
                break
            time.sleep(0.2)
        for _ in range(20):  # the lenient tenant's service keeps asking, and is let through on stale data
            seen.setdefault("lenient", []).append(quota.check(lenient))  # type: ignore[union-attr]
            seen.setdefault("guarded", []).append(quota.check(guarded))  # type: ignore[union-attr]
            seen.setdefault("reserved", []).append(quota.reserve(guarded, Decimal("0.01")))  # type: ignore[union-attr]
            time.sleep(0.5)

    with Traffic(own, tenants, rate=500) as traffic:
        time.sleep(3)
        before = quota.check(guarded)
        assert before.allowed and not before.stale and before.limit == budget.limit, before
        # ~15 s of its traffic (gpt-4o-mini, ~$0.08/s at 500 events/s): crossed while Postgres is down
        limit = quota.check(lenient).spent + Decimal("1.2")
        command = [
            sys.executable,
            "-m",
            "deploy",
            "budget",
            "set",
            "--tenant",
            lenient,
            "--limit",
            str(limit),
            "--hard",
        ]
        done = subprocess.run(command, env=env_for(own), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        time.sleep(1.5)  # the worker mirrors budgets into Redis within a second
        outage(
            lambda: stack.stop_postgres(progress=lambda _m: None),
            lambda: stack.start_postgres(progress=lambda _m: None),
            60,
            while_down,
        )
        restarted = time.monotonic()
        time.sleep(2)
    stale = seen.get("stale")
    assert stale is not None, "the quota answer never turned stale while Postgres was down"
    assert not stale.allowed and "blocks while its spend data is stale" in stale.reason  # type: ignore[attr-defined]
    drained = check_invariants(own, traffic, worker)
    after = quota.check(guarded)
    assert after.allowed and not after.stale, after
    # once stale, the block policy lets no call through, neither checked nor reserved
    assert not any(a.allowed for a in seen["guarded"]), seen["guarded"]  # type: ignore[attr-defined]
    assert not any(r.allowed for r in seen["reserved"]), seen["reserved"]  # type: ignore[attr-defined]
    lenient_answers = seen["lenient"]
    assert all(a.allowed and a.stale for a in lenient_answers), lenient_answers  # type: ignore[attr-defined]

    def overrun() -> list[tuple[str, str]]:
        with psycopg.connect(own.database_url) as conn:
            return conn.execute(
                "SELECT kind, message FROM tokenmeter.alerts WHERE tenant_id = %s AND kind ="
                " 'budget.overrun_during_outage'",
                (lenient,),
            ).fetchall()

    deadline = time.monotonic() + 60
    while not overrun() and time.monotonic() < deadline:
        time.sleep(0.5)
    ((_kind, message),) = overrun()  # reported afterwards, once
    assert "calls were allowed while the spend data was stale" in message, message
    print(
        f"\npostgres outage: {len(traffic.sent)} events; drained {drained:.1f}s after traffic stopped, "
        f"{time.monotonic() - restarted:.1f}s after Postgres came back"
    )


def outage_under_traffic(
    running: tuple[Settings, WorkerProcess],
    name: str,
    stop: Callable[[], None],
    start: Callable[[], None],
    seconds: float,
) -> None:
    own, worker = running
    tenants = [f"{name[:8]}-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    with Traffic(own, tenants) as traffic:
        time.sleep(3)
        outage(stop, start, seconds)
        restarted = time.monotonic()
        time.sleep(3)
    drained = check_invariants(own, traffic, worker)
    print(
        f"\n{name}: {len(traffic.sent)} events; drained {drained:.1f}s after traffic stopped, "
        f"{time.monotonic() - restarted:.1f}s after the service came back"
    )


def test_redis_down_for_30s_under_traffic(stack: LocalStack, running: tuple[Settings, WorkerProcess]) -> None:
    outage_under_traffic(
        running,
        "redis outage",
        lambda: stack.stop_redis(progress=lambda _m: None),
        lambda: stack.start_redis(progress=lambda _m: None),
        30,
    )


def test_kafka_broker_killed_and_restarted_under_traffic(
    stack: LocalStack, running: tuple[Settings, WorkerProcess]
) -> None:
    outage_under_traffic(
        running,
        "broker kill -9",
        lambda: stack.stop_kafka(progress=lambda _m: None, kill=True),
        lambda: stack.start_kafka(progress=lambda _m: None),
        10,
    )


def test_redis_down_when_the_worker_starts(stack: LocalStack, settings: Settings, tmp_path: Path) -> None:
    """Nothing crashes while Redis is away at start-up (budget following, freshness, spend): the worker
    waits, says why in /readyz, and meters everything once Redis is back."""
    own = isolated(settings, uuid.uuid4().hex[:10])
    worker = WorkerProcess(own, tmp_path)
    tenants = [f"rs-{uuid.uuid4().hex[:6]}"]
    stack.stop_redis(progress=lambda _m: None)
    try:
        worker.start()
        with Traffic(own, tenants, rate=50) as traffic:
            deadline = time.monotonic() + 90
            while "Redis unavailable" not in "".join(p.read_text() for p in worker.logs):  # visible, not silent
                assert time.monotonic() < deadline, worker.output()
                assert worker.alive(), worker.output()
                time.sleep(0.5)
            time.sleep(3)
            assert worker.alive(), worker.output()
            stack.start_redis(progress=lambda _m: None)
            time.sleep(2)
    finally:
        stack.start_redis(progress=lambda _m: None)
    try:
        check_invariants(own, traffic, worker)
    finally:
        worker.stop()
