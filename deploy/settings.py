"""All runtime settings, read from the environment with the prefix ``TOKENMETER_``.

``tokenmeter dev env`` prints the three connection settings for the local stack; every other
command reads them from here, so one ``eval "$(tokenmeter dev env)"`` points everything at it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import redis
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The superuser of a local stack started with ``dev up --secure`` (its password is in <home>/kafka/security.json).
LOCAL_ADMIN = "admin"
# Node n of a local multi-broker cluster (``tokenmeter dev up --brokers 3``) listens 10 ports above node n-1.
LOCAL_NODE_PORT_STEP = 10


def local_kafka_security(home: Path) -> dict[str, Any] | None:
    """The SASL/SCRAM users of a local stack started with ``dev up --secure`` (None for a plaintext one)."""
    try:
        loaded: dict[str, Any] = json.loads((home / "kafka" / "security.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded


def local_kafka_nodes(home: Path) -> int:
    """How many Kafka nodes the local stack under ``home`` was created with (``dev up --brokers``); 1 if none."""
    try:
        return max(1, int((home / "kafka" / "nodes").read_text().strip()))
    except (OSError, ValueError):
        return 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENMETER_", extra="ignore")

    # Local dev stack (tokenmeter dev up): where its state lives and which loopback ports it uses.
    home: Path = Field(default=Path(".tokenmeter"), description="state of the local stack (data, logs, pids)")
    kafka_port: int = 19092
    kafka_controller_port: int = 19093
    postgres_port: int = 15432
    redis_port: int = 16379
    kafka_heap: str = "768m"
    kafka_node_heap: str = "512m"  # per node of a multi-node local cluster (dev up --brokers 3)
    jar_cache: Path = Field(default=Path.home() / ".cache" / "tokenmeter" / "jars")
    maven_repo_url: str = "https://repo.maven.apache.org/maven2"

    # Connections. Empty means "the local dev stack on the ports above".
    kafka_bootstrap: str = ""
    database_url: str = ""
    redis_url: str = ""
    # Kafka security, the same for every client the project builds (kafka_config below): stage 1, Faust
    # (mapped to aiokafka), the producer library, the CLI, lag, topics and config followers.
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_ca_location: Path | None = None
    kafka_ssl_certificate_location: Path | None = None
    kafka_ssl_key_location: Path | None = None
    kafka_ssl_key_password: SecretStr = SecretStr("")
    # Any other librdkafka property (JSON object, e.g. '{"ssl.endpoint.identification.algorithm": "none"}');
    # applied last to the confluent-kafka clients. Faust's aiokafka clients take only the settings above.
    kafka_client_properties: dict[str, str | int | bool] = Field(default_factory=dict)
    # Redis Cluster: the URL names one node; the client discovers the others. Every key one quota call
    # touches carries the tenant as a hash tag, so it lives on one node (schemas/redis_keys.py).
    redis_cluster: bool = False

    # Topics (DESIGN.md §2).
    topic_raw: str = "usage.raw"
    topic_priced: str = "usage.priced"
    topic_dlq: str = "usage.dlq"
    topic_alerts_budget: str = "alerts.budget"
    topic_alerts_anomaly: str = "alerts.anomaly"
    topic_rollups: str = "metering.rollups"
    topic_budgets: str = "config.budgets"
    topic_price_overrides: str = "config.price-overrides"
    topic_partitions: int = Field(default=4, ge=1)
    # Unset: min(3, brokers in the cluster), and min.insync.replicas 2 once there are 3 replicas (one broker
    # may be down without stopping writes with acks=all). Set them to pin other values.
    topic_replication: int | None = Field(default=None, ge=1)
    topic_min_insync_replicas: int | None = Field(default=None, ge=1)

    # Worker: the Faust app id (also names its table changelog topics); stage 1's consumer group is
    # "<worker_id>-meter". Workers sharing an id share the work.
    worker_id: str = "tokenmeter"
    # Bigger batches aggregate more per Postgres statement: 5,000 → 10,000 took the bench from 12k to
    # 14k events/s; 20,000 gained nothing more. A batch is what arrived within 50 ms, so under light
    # traffic batches stay small and quick.
    worker_batch_size: int = Field(default=10_000, ge=1, description="most raw messages per stage-1 batch")
    # Stage-1 processes per worker (each a consumer of usage.raw in the same group, so they split its
    # partitions; tenants are the message keys, so one tenant stays with one process). Stage 1 is bound
    # by one interpreter, and a big tenant's partition by the process that has it: on the 2-core bench box
    # (4 partitions) 1 process did 11.3-11.7k events/s, 2 did 13.1k, 4 did 13.7-14.1k with quota
    # visibility p99 at half load ~0.5 s. 2 by default: a partition moves between them when the second one
    # joins, so the hand-over is routine: committed first, then the moved tenants' live scopes dropped.
    worker_meter_processes: int = Field(default=2, ge=1, le=64, description="stage-1 processes per worker")
    # Compression of what stage 1 publishes (usage.priced, usage.dlq, rollups, alerts). None by default:
    # with the broker on the same box or LAN, lz4 cost the broker 36 µs of CPU per event against 22 µs
    # without (bench cpu_us_per_event, Kafka 4.4). Over a slow or metered network, lz4 or zstd save bytes.
    worker_compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = "none"
    # Supervision: a stage that commits nothing for this long while it has messages to do, or a stage
    # process that dies, makes the worker exit non-zero (for systemd/Kubernetes to restart it); /readyz
    # reports a stall after half of it.
    worker_stall_timeout_s: float = Field(default=120.0, ge=2.0)
    # How often stage 2 writes the newest value of each day window to its table, the anomaly rules' history
    # (streams/app.py: TABLE_WRITE_INTERVAL note). Longer: fewer changelog messages; a worker killed outright
    # loses at most this long of that history (handover and stop write it first).
    worker_table_write_interval_s: float = Field(default=5.0, gt=0.0, le=300.0)
    # How often the worker folds newly written ledger batches into the report summaries (sinks/summaries.py).
    # Reports are exact whatever it is (they read the batches not yet folded in from the ledger); a longer
    # interval folds more calls per run, which costs far less per call (30 s: ~3x less than 2 s at 15k/s).
    report_summary_interval_s: float = Field(default=30.0, ge=1.0)
    # The worker creates missing topics at start-up; false: a missing topic is a fatal one-line error.
    worker_create_topics: bool = True
    # Bounded live state (streams/live.py): per tenant, the most recently active users, features,
    # environments and models (each) that get Redis spend and stage-2 windows, besides those a budget names.
    live_values_per_tenant: int = Field(default=1000, ge=1)

    # Prometheus metrics of the worker (both stages) at http://<host>:<port>/metrics; port 0 turns them off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)

    # Alert delivery: webhook URLs (JSON list, e.g. '["https://hooks.slack.com/services/…"]').
    webhook_urls: list[str] = Field(default_factory=list)

    # Quota client: spend data older than this is stale (a hard budget then follows its on_stale policy);
    # a committed call's cost stays held until the pipeline has counted it, at most quota_hold_max_s.
    quota_stale_after_s: float = Field(default=10.0, gt=0)
    quota_hold_max_s: float = Field(default=3600.0, gt=0)

    # Producer library.
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    spool_replay_timeout_s: float = Field(default=30.0, gt=0)

    # OTLP/HTTP receiver (tokenmeter otlp; mapping in producers/otlp.py). 4318 is OTLP/HTTP's standard port.
    # Attribute lists are JSON ('["tenant.id", "app.tenant"]'): the first one set wins, span before resource.
    # Count rule: "leaf" (a span whose descendants carry usage is a roll-up) or "operation" (model-call spans only).
    otlp_host: str = "127.0.0.1"
    otlp_port: int = Field(default=4318, ge=0, le=65535)
    otlp_tenant_attributes: list[str] = Field(default_factory=lambda: ["tenant.id"], min_length=1)
    otlp_user_attributes: list[str] = Field(default_factory=lambda: ["user.id"])
    otlp_feature_attributes: list[str] = Field(default_factory=lambda: ["feature"])
    otlp_environment_attributes: list[str] = Field(
        default_factory=lambda: ["deployment.environment", "deployment.environment.name"]
    )
    otlp_count_rule: Literal["leaf", "operation"] = "leaf"
    otlp_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)  # after gzip; larger requests get 413

    # Reconciliation (tokenmeter reconcile --fetch): the providers' admin keys (sk-admin-…, sk-ant-admin…; never
    # logged) and API base URLs (tests point them at a local fixture server).
    openai_admin_key: SecretStr = SecretStr("")
    anthropic_admin_key: SecretStr = SecretStr("")
    openai_admin_base_url: str = "https://api.openai.com"
    anthropic_admin_base_url: str = "https://api.anthropic.com"

    @model_validator(mode="after")
    def _fill_local_defaults(self) -> Settings:
        self.home = self.home.expanduser().absolute()
        if not self.kafka_bootstrap:
            security = local_kafka_security(self.home)
            if security is not None and "kafka_security_protocol" not in self.model_fields_set:
                # The local secured stack: its superuser, so the CLI and the worker just work there.
                self.kafka_security_protocol = "SASL_PLAINTEXT"
                self.kafka_sasl_mechanism = security["mechanism"]
                self.kafka_sasl_username = LOCAL_ADMIN
                self.kafka_sasl_password = SecretStr(security["users"][LOCAL_ADMIN])
            self.kafka_bootstrap = ",".join(
                f"127.0.0.1:{self.local_kafka_port(node)}" for node in range(1, local_kafka_nodes(self.home) + 1)
            )
        if not self.database_url:
            self.database_url = f"postgresql://postgres@127.0.0.1:{self.postgres_port}/tokenmeter"
        if not self.redis_url:
            self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.spool_dir is None:
            self.spool_dir = self.home / "spool"
        return self

    def local_kafka_port(self, node: int) -> int:
        """The client port of node ``node`` (1-based) of the local stack's Kafka cluster."""
        return self.kafka_port + LOCAL_NODE_PORT_STEP * (node - 1)

    def local_kafka_controller_port(self, node: int) -> int:
        return self.kafka_controller_port + LOCAL_NODE_PORT_STEP * (node - 1)

    @property
    def spool_path(self) -> Path:
        assert self.spool_dir is not None  # filled by the validator
        return self.spool_dir

    @property
    def faust_datadir(self) -> Path:
        """The worker's Faust data folder, ``<home>/faust/<worker_id>`` (Faust's default would be
        ``<worker_id>-data`` in the current folder). Faust creates only the last folder: the one above it
        is created here."""
        path = self.home / "faust" / self.worker_id
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


# ---------------------------------------------------------------- client options
# How every client reaches Kafka and Redis, here beside the settings because every layer may import
# this module (DESIGN.md §9). Each Kafka client the project builds (stage 1's consumer and idempotent
# producer, the producer library, the CLI, lag, topics, the config followers) starts from kafka_config;
# Faust's aiokafka clients get the same security from streams.app.faust_credentials. Postgres needs
# nothing here: its URL carries the password and sslmode. Redis's URL carries an ACL user and password,
# and rediss:// turns on TLS; redis_client adds Redis Cluster.
def kafka_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka properties for ``settings``' cluster: bootstrap, security, then the pass-through
    properties, then ``overrides`` (the caller's own, e.g. ``group.id``)."""
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    protocol = settings.kafka_security_protocol
    if protocol != "PLAINTEXT":
        config["security.protocol"] = protocol
    if protocol.startswith("SASL_"):
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
        config["sasl.username"] = settings.kafka_sasl_username
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    tls_files = {
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
    }
    config.update({name: str(path) for name, path in tls_files.items() if path is not None})
    if settings.kafka_ssl_key_password.get_secret_value():
        config["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
    config.update(settings.kafka_client_properties)
    config.update(overrides)
    return config


def faust_brokers(settings: Settings) -> list[str]:
    """Faust's broker URLs: one ``kafka://host:port`` per bootstrap server."""
    return [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap.split(",") if server.strip()]


def redis_client(settings: Settings, socket_timeout: float = 5.0, **options: Any) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` (a Redis Cluster client when ``redis_cluster``)."""
    if settings.redis_cluster:
        cluster: Any = redis.RedisCluster.from_url(settings.redis_url, socket_timeout=socket_timeout, **options)
        return cluster  # same command surface for what the project uses; typed as Redis for the callers
    return redis.Redis.from_url(settings.redis_url, socket_timeout=socket_timeout, **options)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
