"""The worker owns its topics and says when it cannot work: it creates missing topics before it
starts (or exits with a one-line error), serves /healthz and /readyz, and exits non-zero when a
stage is dead or stuck, with the reason in its log and in /readyz first."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from deploy.isolation import TOPIC_FIELDS, WorkerProcess, env_for, free_port
from deploy.settings import Settings
from deploy.stack import LocalStack
from sinks.migrate import available_migrations, migrate, pending_migrations
from streams.lag import wait_for_sinks

pytestmark = pytest.mark.integration


def fresh_settings(settings: Settings, **extra: object) -> Settings:
    """Own topic names and worker id, with no topic created (as after `dev up` on a new cluster)."""
    unique = uuid.uuid4().hex[:10]
    update: dict[str, object] = {name: f"t{unique}.{getattr(settings, name)}" for name in TOPIC_FIELDS}
    update.update(worker_id=f"w{unique}", metrics_port=free_port(), **extra)
    return settings.model_copy(update=update)


def usage(tenant: str, **fields: object) -> bytes:
    return json.dumps(
        {
            "event_id": uuid.uuid4().hex,
            "tenant_id": tenant,
            "provider": "openai",
            "model": "gpt-4o",
            "timestamp": "2025-07-10T10:00:00+00:00",
            "input_tokens": 1_000_000,
            "output_tokens": 0,
            **fields,
        }
    ).encode()


def get(settings: Settings, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until(check: Any, timeout: float, what: str, worker: WorkerProcess | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"{what} within {timeout}s" + (f"\n{worker.output()}" if worker else ""))


def exit_code(worker: WorkerProcess, timeout: float) -> int | None:
    assert worker.process is not None
    try:
        return worker.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_worker_on_a_cluster_without_topics_creates_them_and_alerts_on_budgets(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    """`dev up` + `worker` without `topics ensure`: stage 2 used to ignore the missing rollups topic for
    the life of the process, so no budget alert ever fired."""
    own = fresh_settings(settings)
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        _status, body = wait_until(lambda: (r := get(own, "/readyz"))[0] == 200 and r, 90, "ready", worker)
        assert body["status"] == "ok" and body["problems"] == []
        # Two stage-1 processes by default (TOKENMETER_WORKER_METER_PROCESSES; each supervised on its own).
        stage_one = ["stage 1 (metering)", "stage 1 (metering) #2"]
        assert set(body["stages"]) == {*stage_one, "stage 2 (budgets and alerts)"}
        assert all(body["pids"][name] for name in stage_one)
        existing = AdminClient({"bootstrap.servers": own.kafka_bootstrap}).list_topics(timeout=10).topics
        assert all(getattr(own, name) in existing for name in TOPIC_FIELDS)
        tenant = f"fresh-{uuid.uuid4().hex[:6]}"
        command = [sys.executable, "-m", "deploy", "budget", "set", "--tenant", tenant, "--limit", "1"]
        done = subprocess.run(command, env=env_for(own), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        time.sleep(2)  # the worker follows config.budgets every second
        producer = Producer({"bootstrap.servers": own.kafka_bootstrap})
        producer.produce(own.topic_raw, key=tenant.encode(), value=usage(tenant))  # $2.50 of a $1 budget
        assert producer.flush(30) == 0
        assert wait_for_sinks(own, timeout=60), worker.output()

        def thresholds() -> list[int]:
            with psycopg.connect(own.database_url) as conn:
                rows = conn.execute(
                    "SELECT threshold_percent FROM tokenmeter.alerts WHERE tenant_id = %s ORDER BY 1", (tenant,)
                ).fetchall()
            return [row[0] for row in rows if row[0] is not None]

        assert wait_until(lambda: thresholds() == [50, 80, 100], 30, "budget alerts 50/80/100", worker)
        assert "Ignoring missing topic" not in worker.output()
        assert worker.alive()
    finally:
        worker.stop()


def test_a_worker_that_may_not_create_topics_names_the_missing_one_and_exits(
    stack: LocalStack, settings: Settings
) -> None:
    own = fresh_settings(settings, worker_create_topics=False)
    done = subprocess.run(
        [sys.executable, "-m", "deploy", "worker"], env=env_for(own), capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: topic '{own.topic_raw}' does not exist")
    assert "Traceback" not in done.stderr


def test_a_worker_on_a_database_without_the_migrations_names_them_and_exits(
    stack: LocalStack, settings: Settings
) -> None:
    """Every batch would fail on a missing table until the stall timeout; the worker says why at once."""
    name = f"tokenmeter_unmigrated_{uuid.uuid4().hex[:8]}"
    server = make_conninfo(settings.database_url, dbname="postgres")
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = make_conninfo(settings.database_url, dbname=name)
        own = fresh_settings(settings, database_url=url)
        done = subprocess.run(
            [sys.executable, "-m", "deploy", "worker"], env=env_for(own), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1
        every = len(available_migrations())
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: the database lacks {every} migration(s) (0001_"), last
        assert last.endswith("run `tokenmeter db migrate`") and "Traceback" not in done.stderr
        migrate(url)
        assert pending_migrations(url) == []
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_a_stuck_stage_shows_in_readyz_and_then_the_worker_exits_non_zero(
    stack: LocalStack, settings: Settings, tmp_path: Path
) -> None:
    """Postgres unreachable for this worker: stage 1 retries (transient), reports why, then gives up."""
    own = fresh_settings(
        settings, database_url="postgresql://postgres@127.0.0.1:9/tokenmeter", worker_stall_timeout_s=8.0
    )
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        wait_until(lambda: get(own, "/healthz")[0] == 200, 90, "healthz", worker)
        producer = Producer({"bootstrap.servers": own.kafka_bootstrap})
        producer.produce(own.topic_raw, value=usage("stuck"))
        assert producer.flush(30) == 0
        _status, body = wait_until(
            lambda: (r := get(own, "/readyz"))[0] == 503 and "stalled" in str(r[1]) and r,
            60,
            "readyz reporting the stall",
            worker,
        )
        stalled = [p for p in body["problems"] if "stage 1" in p and "stalled" in p]
        assert stalled and "Postgres unavailable" in stalled[0], body
        assert exit_code(worker, 60) == 3, worker.output()
        # whichever stage-1 process had the message on its partitions
        assert re.search(r"stopping the worker: stage 1 \(metering\)( #\d)? made no progress", worker.output())
    finally:
        worker.stop()


def test_a_dead_stage_makes_the_worker_exit_non_zero(stack: LocalStack, settings: Settings, tmp_path: Path) -> None:
    own = fresh_settings(settings)
    worker = WorkerProcess(own, tmp_path)
    worker.start()
    try:
        # Answered as soon as the worker serves: stage 1 is listed from then on, with a pid once started.
        started = lambda: (r := get(own, "/healthz"))[0] == 200 and r[1]["pids"]["stage 1 (metering)"]  # noqa: E731
        stage_one = wait_until(started, 90, "stage 1 started", worker)
        subprocess.run(["kill", "-9", str(stage_one)], check=True)
        assert exit_code(worker, 30) == 3, worker.output()
        assert "stage 1 (metering) process exited with code -9" in worker.output()
    finally:
        worker.stop()
