"""Hostile cardinality (DESIGN §4.5): one tenant sends 200,000 distinct users. The ledger keeps every
call and the invoice stays exact; the live structures stay bounded (``streams/live.py``): Redis holds
spend for at most ``live_values_per_tenant`` users plus those a budget names, and the worker's two
processes stay under a stated memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import genai_prices
import psycopg
import pytest
import redis
from confluent_kafka import Producer

from deploy.isolation import WorkerProcess, env_for, isolated
from deploy.settings import Settings
from deploy.stack import LocalStack
from schemas.records import money
from schemas.redis_keys import spend_key
from streams.lag import wait_for_sinks

pytestmark = [pytest.mark.integration, pytest.mark.faults]

USERS = 200_000
LIVE = 1_000
RSS_BOUND_MIB = 512  # per process; measured 288 MiB (stage 1) and 126 MiB (stage 2) here


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_two_hundred_thousand_users_of_one_tenant(stack: LocalStack, settings: Settings, tmp_path: Path) -> None:
    own = isolated(settings, uuid.uuid4().hex[:10], live_values_per_tenant=LIVE)
    tenant = f"crowd-{uuid.uuid4().hex[:6]}"
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        command = [sys.executable, "-m", "deploy", "budget", "set", "--tenant", tenant, "--user", "u-0", "--limit", "9"]
        done = subprocess.run(command, env=env_for(own), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        at = datetime.now(UTC)
        producer = Producer(
            {
                "bootstrap.servers": own.kafka_bootstrap,
                "linger.ms": 20,
                "batch.num.messages": 10000,
                "compression.type": "lz4",
            }
        )
        started = time.monotonic()
        for i in range(USERS):
            event = {
                "event_id": f"{tenant}-{i}",
                "tenant_id": tenant,
                "provider": "openai",
                "model": "gpt-4o-mini",
                "timestamp": at.isoformat(),
                "input_tokens": 1200,
                "output_tokens": 300,
                "user_id": f"u-{i}",
                "feature": f"feature-{i % 50}",
                "session_id": f"s-{i}",
            }
            while True:
                try:
                    producer.produce(own.topic_raw, key=tenant.encode(), value=json.dumps(event).encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        assert producer.flush(60) == 0
        assert wait_for_sinks(own, timeout=600), worker.output()
        assert wait_for_sinks(own, timeout=300, topic=own.topic_rollups, group=own.worker_id), "stage 2 behind"
        metered = time.monotonic() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{own.metrics_port}/healthz", timeout=5) as response:
            stage_one = json.loads(response.read())["pids"]["stage 1 (metering)"]
        assert worker.process is not None
        memory = {"stage 1": rss_mib(stage_one), "stage 2 (worker)": rss_mib(worker.process.pid)}
        print(
            f"\n{USERS:,} users metered in {metered:.0f}s; RSS MiB: "
            + ", ".join(f"{k} {v:.0f}" for k, v in memory.items())
        )
        assert all(v < RSS_BOUND_MIB for v in memory.values()), memory

        unit = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1200, output_tokens=300),
            "gpt-4o-mini",
            provider_id="openai",
            genai_request_timestamp=at,
        ).total_price
        with psycopg.connect(own.database_url) as conn:
            total, calls, users = conn.execute(
                "SELECT sum(total_cost), count(*), count(DISTINCT user_id) FROM tokenmeter.ledger WHERE tenant_id = %s",
                (tenant,),
            ).fetchone()
        assert (total, calls, users) == (money(unit) * USERS, USERS, USERS)  # the ledger keeps every call
        invoice = subprocess.run(
            [
                sys.executable,
                "-m",
                "deploy",
                "invoice",
                "--tenant",
                tenant,
                "--period",
                at.strftime("%Y-%m"),
                "--format",
                "json",
            ],
            env=env_for(own),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert invoice.returncode == 0, invoice.stderr
        assert Decimal(json.loads(invoice.stdout)["total"]) == money(unit) * USERS

        client = redis.Redis.from_url(own.redis_url)
        pattern = spend_key(tenant, "user", "*", "*").replace("%2A", "*")
        user_keys = sum(1 for _ in client.scan_iter(match=pattern, count=10_000))
        assert user_keys == 3 * (LIVE + 1), user_keys  # day/week/month of each live user and the budgeted one
        assert client.exists(spend_key(tenant, "user", "u-0", "month"))  # a budget keeps its user live
        assert worker.alive() and worker.starts == 1, worker.output()
    finally:
        worker.stop()
