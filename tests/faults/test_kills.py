"""Processes killed under traffic: the worker SIGKILLed again and again, its stage 1 killed on its own
(the worker then exits 3 and is restarted, as a process manager would), and a second worker joining
while the first is killed mid-rebalance. Invariants as in ``test_outages``, plus: each budget threshold
alert is stored once and posted once to each webhook URL."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import psycopg
import pytest

from deploy.isolation import WorkerProcess, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from streams.budgets import Budget
from streams.lag import wait_for_sinks
from tests.faults.test_outages import Traffic, check_invariants

pytestmark = [pytest.mark.integration, pytest.mark.faults]


class Hook(BaseHTTPRequestHandler):
    posts: list[tuple[int, str]] = []  # (server port, Idempotency-Key)  # noqa: RUF012

    def do_POST(self) -> None:  # a webhook receiver: records each delivery
        self.rfile.read(int(self.headers["Content-Length"]))
        Hook.posts.append((self.server.server_address[1], self.headers["Idempotency-Key"]))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[list[str]]:
    servers = [HTTPServer(("127.0.0.1", 0), Hook) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    Hook.posts = []
    yield [f"http://127.0.0.1:{server.server_address[1]}/hook" for server in servers]
    for server in servers:
        server.shutdown()


def stage_one_pid(settings: Settings) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/healthz", timeout=5) as response:
                pid = json.loads(response.read())["pids"]["stage 1 (metering)"]
                if pid:
                    return int(pid)
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.25)
    raise AssertionError("no stage 1 pid in /healthz")


def send_budget(settings: Settings, budget: Budget) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(settings.topic_budgets, key=budget.key.encode(), value=budget.to_json())
    assert producer.flush(15) == 0


def test_worker_killed_five_times_and_stage_one_once(
    stack: LocalStack, settings: Settings, tmp_path: Path, hooks: list[str]
) -> None:
    own = isolated(settings, uuid.uuid4().hex[:10], webhook_urls=hooks)
    with psycopg.connect(own.database_url, autocommit=True) as conn:  # other tests' alerts are not ours to post
        conn.execute("UPDATE tokenmeter.alerts SET delivered_at = now() WHERE delivered_at IS NULL")
    tenants = [f"kill-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    send_budget(own, Budget(tenants[0], "tenant", "", "month", Decimal(8)))  # crossed within ~15 s
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        killed_and_restarted(own, worker, tenants)
    finally:
        worker.stop()  # a worker left running would deliver (and claim) later tests' alerts


def killed_and_restarted(own: Settings, worker: WorkerProcess, tenants: list[str]) -> None:
    rng = random.Random(11)
    started = time.monotonic()
    with Traffic(own, tenants) as traffic:
        for round_ in range(6):
            time.sleep(rng.uniform(2.0, 5.0))
            assert worker.process is not None
            if round_ == 3:  # stage 1 alone: the worker notices, says why and exits 3
                os.kill(stage_one_pid(own), signal.SIGKILL)
                assert worker.process.wait(timeout=30) == 3, worker.output()
            else:
                worker.kill()
            worker.start()
        time.sleep(3)
    check_invariants(own, traffic, worker, starts=7)
    assert wait_for_sinks(own, timeout=120, topic=own.topic_rollups, group=own.worker_id)

    def delivered() -> tuple[list[str], Counter[tuple[int, str]]]:
        with psycopg.connect(own.database_url) as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "SELECT alert_id FROM tokenmeter.alerts WHERE tenant_id = %s AND kind LIKE 'budget%%'"
                    " ORDER BY threshold_percent",
                    (tenants[0],),
                ).fetchall()
            ]
        return ids, Counter(post for post in Hook.posts if post[1] in ids)

    deadline = time.monotonic() + 60
    while True:
        ids, posts = delivered()
        if (len(ids) == 3 and len(posts) == 6) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ids) == 3, ids  # 50, 80 and 100 %, each stored once whatever the kills replayed
    assert set(posts.values()) == {1} and len(posts) == 2 * len(ids), posts  # once per alert and URL
    print(f"\n6 kills in {time.monotonic() - started:.0f}s, {len(traffic.sent)} events: billed exactly once")


@pytest.fixture
def pair(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> Iterator[tuple[Settings, WorkerProcess, WorkerProcess]]:
    own = isolated(settings, uuid.uuid4().hex[:10])
    first, second = WorkerProcess(own, tmp_path / "first"), WorkerProcess(own, tmp_path / "second")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    yield own, first, second
    first.stop()
    second.stop()


def test_two_workers_one_killed_during_a_rebalance(pair: tuple[Settings, WorkerProcess, WorkerProcess]) -> None:
    own, first, second = pair
    tenants = [f"pair-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    first.start()
    with Traffic(own, tenants) as traffic:
        time.sleep(8)
        second.start()  # the group rebalances...
        time.sleep(2.5)
        first.kill()  # ...and loses a member in the middle of it
        time.sleep(15)
    check_invariants(own, traffic, second)
    assert not first.alive()
