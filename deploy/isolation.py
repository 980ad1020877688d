"""Isolated pipelines on a shared stack: own topics, worker id and consumer groups, the worker as a
subprocess. Used by the tests and by ``tokenmeter bench``, so neither touches the user's data."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from psycopg import sql
from pydantic import SecretStr

from deploy.settings import Settings, kafka_config
from deploy.topics import ensure_topics
from sinks.migrate import migrate
from streams.lag import measure_lag
from streams.meter import meter_group

TOPIC_FIELDS = (
    "topic_raw",
    "topic_priced",
    "topic_dlq",
    "topic_alerts_budget",
    "topic_alerts_anomaly",
    "topic_rollups",
    "topic_budgets",
    "topic_price_overrides",
)


def isolated(settings: Settings, unique: str, **extra: object) -> Settings:
    """Settings with their own topics (``t<unique>.usage.raw`` …) and worker id; the topics are created."""
    update: dict[str, object] = {name: f"t{unique}.{getattr(settings, name)}" for name in TOPIC_FIELDS}
    update.update(worker_id=f"w{unique}", metrics_port=free_port(), **extra)
    own = settings.model_copy(update=update)
    ensure_topics(own)
    return own


def drop_isolated(settings: Settings, timeout: float = 30.0) -> int:
    """Delete what ``isolated`` made on the cluster: its topics and its worker's (Faust's changelog), and its
    consumer groups; return how many topics went. A benchmark that left them behind grew the broker by
    ~20 topics and hundreds of MB per run, and later runs slowed down with it."""
    unique = settings.worker_id[1:]
    prefixes = (f"t{unique}.", f"{settings.worker_id}-")
    if not settings.worker_id.startswith("w") or not all(
        getattr(settings, name).startswith(prefixes[0]) for name in TOPIC_FIELDS
    ):  # never the user's own topics
        raise ValueError(f"not an isolated pipeline: worker {settings.worker_id}, topic {settings.topic_raw}")
    admin = AdminClient(kafka_config(settings))
    names = [t for t in admin.list_topics(timeout=timeout).topics if t.startswith(prefixes)]
    for future in admin.delete_topics(names, operation_timeout=timeout).values() if names else ():
        with contextlib.suppress(KafkaException):  # already gone, or the broker finishes it later
            future.result()
    groups = [meter_group(settings), settings.worker_id]
    for future in admin.delete_consumer_groups(groups, request_timeout=timeout).values():
        with contextlib.suppress(KafkaException):  # never made, or still has a member that is shutting down
            future.result()
    return len(names)


def free_port() -> int:
    """A TCP port free on loopback right now (for an isolated worker's metrics endpoint)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# What a worker subprocess must share with the test or bench that starts it (the rest comes from the
# environment: the stack's ports and home).
_SHARED_FIELDS = (
    *TOPIC_FIELDS,
    "worker_id",
    "worker_batch_size",
    "kafka_bootstrap",
    "database_url",
    "redis_url",
    "redis_cluster",
    "metrics_port",
    "worker_stall_timeout_s",
    "worker_table_write_interval_s",
    "worker_create_topics",
    "live_values_per_tenant",
    "quota_stale_after_s",
    "webhook_urls",
    "topic_replication",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_ca_location",
    "kafka_client_properties",
)


def env_for(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name in _SHARED_FIELDS:
        value = getattr(settings, name)
        if value is None:
            env.pop(f"TOKENMETER_{name.upper()}", None)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"TOKENMETER_{name.upper()}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return env


@contextmanager
def scratch_stores(settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a throwaway Postgres database (migrated) and Redis database 15, both
    emptied afterwards: a benchmark's ledger and spend never mix with real data."""
    name = f"tokenmeter_scratch_{uuid.uuid4().hex[:8]}"
    server = settings.database_url.rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    database_url = f"{server}/{name}"
    migrate(database_url)
    redis_url = settings.redis_url.rsplit("/", 1)[0] + "/15"
    try:
        yield settings.model_copy(update={"database_url": database_url, "redis_url": redis_url})
    finally:
        with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        redis.Redis.from_url(redis_url).flushdb()


@dataclass
class WorkerProcess:
    settings: Settings
    log_dir: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self, loglevel: str = "info") -> None:
        self.starts += 1
        log = self.log_dir / f"worker-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "deploy", "worker", "--loglevel", loglevel],
                env=env_for(self.settings),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logs)


def committed_total(settings: Settings) -> int:
    return sum(max(0, p.committed) for p in measure_lag(settings))


def wait_for_commits(settings: Settings, at_least: int, timeout: float, worker: WorkerProcess) -> int:
    """Wait until the worker has committed ``at_least`` raw messages; return how many it has."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = committed_total(settings)
        if done >= at_least:
            return done
        if not worker.alive():
            raise RuntimeError(f"the worker exited:\n{worker.output()}")
        time.sleep(0.05)
    raise TimeoutError(f"worker committed fewer than {at_least} messages in {timeout}s:\n{worker.output()}")
