"""The deployment files (issue #14 items 3 and 6): deploy/compose.yaml, deploy/k8s/*.yaml, deploy/Dockerfile
and deploy/sql/roles.sql, checked against the code they deploy rather than against a second copy of it:
settings names against ``deploy.settings.Settings``, topics against ``deploy.topics.topic_specs``, probes
against the endpoints ``streams.health.serve`` answers, KEDA's consumer group against
``streams.meter.meter_group``. The manifest checks need no server; the last two tests apply the SQL roles
and the Compose file's Redis ACL users to the real test stack and run the components' own code as each."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

from deploy.bench.workload import Model, usage_events
from deploy.isolation import free_port
from deploy.jars import kafka_version, read_lock
from deploy.settings import Settings
from deploy.stack import LocalStack
from deploy.topics import topic_specs
from producers.quota import QuotaClient
from schemas.currencies import FxRate
from schemas.events import validate_event
from schemas.records import Alert, PricedEvent, Rollup
from schemas.redis_keys import budget_key, freshness_key, stale_calls_key
from sinks.alerts import list_alerts, store_alerts
from sinks.credits import forget_balance, mirror_balance, record_grant, tenant_allocation, void_grant
from sinks.fx import add_fx_rate
from sinks.invoices import RateCard, finalize, invoice, set_rate_card
from sinks.migrate import migrate
from sinks.postgres import set_time_zone, write_batch
from sinks.redis import prune_freshness, write_freshness, write_spend
from sinks.reports import build_report, parse_period
from sinks.webhooks import deliver_pending
from streams.budgets import Budget
from streams.health import Health, serve
from streams.meter import meter_group
from streams.pricing import PriceBook

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = sorted((DEPLOY / "k8s").glob("*.yaml"))
MANIFESTS = [COMPOSE, *K8S]
ROLES_SQL = DEPLOY / "sql" / "roles.sql"
SETTING_NAME = re.compile(r"\bTOKENMETER_[A-Z0-9_]+")
INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_]+)(?::?-([^}]*))?\}")


# ---------------------------------------------------------------- reading the files
def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


@cache
def k8s_objects() -> tuple[dict[str, Any], ...]:
    return tuple(doc for path in K8S for doc in documents(path))


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in k8s_objects() if doc["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for doc in objects(kind) if name is None or doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@cache
def compose() -> dict[str, Any]:
    [document] = documents(COMPOSE)
    return document


def compose_value(text: str) -> str:
    """A Compose string as Compose would run it with no variables set: ``${X:-default}`` → default."""
    return INTERPOLATION.sub(lambda m: m.group(2) or "", text)


def compose_env(service: str) -> dict[str, str]:
    environment = compose()["services"][service].get("environment", {})
    assert isinstance(environment, dict), f"{service}: environment as a mapping"
    return {name: compose_value(str(value)) for name, value in environment.items()}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container with exactly these TOKENMETER_* variables reads."""
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TOKENMETER_")]:
            patch.delenv(name)
        for name, value in env.items():
            if name.startswith("TOKENMETER_"):
                patch.setenv(name, value)
        return Settings()


def worker_container() -> dict[str, Any]:
    [container] = one("Deployment", "tokenmeter-worker")["spec"]["template"]["spec"]["containers"]
    return container


def k8s_worker_settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker Deployment's settings: its ConfigMap and Secret (envFrom), then its env."""
    container = worker_container()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(one("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            env.update(one("Secret", source["secretRef"]["name"])["stringData"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", "from-a-secret")
    return settings_from(env, monkeypatch)


def kafka_users() -> dict[str, dict[str, Any]]:
    return {user["metadata"]["name"]: user for user in objects("KafkaUser")}


def brokers() -> int:
    return sum(pool["spec"]["replicas"] for pool in objects("KafkaNodePool") if "broker" in pool["spec"]["roles"])


# ---------------------------------------------------------------- every file
def test_every_manifest_parses_and_k8s_objects_are_complete() -> None:
    assert (DEPLOY / "k8s").is_dir() and K8S
    for path in MANIFESTS:
        assert documents(path), f"{path.name} is empty"
    seen = set()
    for doc in k8s_objects():
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "tokenmeter", f"{key}: namespace"
        if doc["apiVersion"].startswith("kafka.strimzi.io/") and doc["kind"] != "Kafka":
            assert doc["metadata"]["labels"]["strimzi.io/cluster"] == one("Kafka")["metadata"]["name"]
    services = compose()["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", "redis", "topics", "demo-producer"} <= set(services)
    assert [name for name, s in services.items() if s.get("command", [None])[0] == "worker"] == ["worker-1", "worker-2"]


def test_every_tokenmeter_variable_is_a_setting() -> None:
    """Every TOKENMETER_* name in a manifest (keys, values, scripts, comments alike) or the Dockerfile is a
    field of Settings (prefix TOKENMETER_, case-insensitive): a misspelt one would be silently ignored."""
    names: set[str] = set()
    for path in [*MANIFESTS, DEPLOY / "Dockerfile"]:
        names |= set(SETTING_NAME.findall(path.read_text(encoding="utf-8")))
    fields = {name.lower() for name in Settings.model_fields}
    unknown = sorted(name for name in names if name.removeprefix("TOKENMETER_").lower() not in fields)
    assert not unknown, f"not fields of deploy.settings.Settings: {unknown}"
    # The Kafka and Redis security settings are used where they belong.
    for name in (
        "TOKENMETER_KAFKA_SECURITY_PROTOCOL",
        "TOKENMETER_KAFKA_SASL_MECHANISM",
        "TOKENMETER_KAFKA_SASL_USERNAME",
        "TOKENMETER_KAFKA_SASL_PASSWORD",
        "TOKENMETER_KAFKA_SSL_CA_LOCATION",
        "TOKENMETER_KAFKA_CLIENT_PROPERTIES",
        "TOKENMETER_REDIS_CLUSTER",
    ):
        assert name in names, f"{name} is used by no manifest"


def test_the_kafka_version_is_the_pinned_one() -> None:
    pinned = kafka_version(read_lock())
    for name in ("kafka-1", "kafka-2", "kafka-3"):
        assert compose()["services"][name]["image"] == f"apache/kafka:{pinned}"
    assert str(one("Kafka")["spec"]["kafka"]["version"]) == pinned


# ---------------------------------------------------------------- Compose
def test_compose_runs_a_kraft_quorum_of_three_and_replicated_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = {name: compose_env(name) for name in ("kafka-1", "kafka-2", "kafka-3")}
    voters = {f"{env['KAFKA_NODE_ID']}@{name}:9093" for name, env in nodes.items()}
    assert len(voters) == 3
    for name, env in nodes.items():
        assert compose()["services"][name]["hostname"] == name
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert set(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == voters
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2" and env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
    assert len({env["CLUSTER_ID"] for env in nodes.values()}) == 1

    topics_job = settings_from(compose_env("topics"), monkeypatch)
    assert compose()["services"]["topics"]["command"] == ["topics", "ensure"]
    assert set(topics_job.kafka_bootstrap.split(",")) == {f"{name}:9092" for name in nodes}
    for spec in topic_specs(topics_job, len(nodes)):
        assert spec.replication == 3, spec
        assert spec.config.get("min.insync.replicas") == "2", f"{spec.name}: min.insync.replicas from deploy/topics.py"


def test_compose_services_read_settings_that_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in compose()["services"]:
        env = compose_env(name)
        if any(key.startswith("TOKENMETER_") for key in env):
            settings = settings_from(env, monkeypatch)
            assert settings.worker_id == "tokenmeter", name
    worker = settings_from(compose_env("worker-1"), monkeypatch)
    assert compose_env("worker-1") == compose_env("worker-2")
    assert not worker.worker_create_topics
    assert urlsplit(worker.database_url).username == "tokenmeter_worker"
    assert urlsplit(worker.redis_url).username == "tokenmeter-worker"
    producer = settings_from(compose_env("demo-producer"), monkeypatch)
    assert urlsplit(producer.redis_url).username == "tokenmeter-service"


def test_compose_python_scripts_compile_and_import_what_exists() -> None:
    """The inline scripts of the one-shot and demo services are Python whose imports exist."""
    scripts = {
        name: service["command"][0]
        for name, service in compose()["services"].items()
        if service.get("entrypoint") == ["python", "-c"]
    }
    assert set(scripts) == {"db-setup", "demo-producer"}
    for name, script in scripts.items():
        tree = ast.parse(compose_value(script), filename=name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{name}: from {node.module} import {alias.name}"
    assert "/app/deploy/sql/roles.sql" in scripts["db-setup"]  # where deploy/Dockerfile copies it
    assert "COPY deploy ./deploy" in (DEPLOY / "Dockerfile").read_text(encoding="utf-8")


# ---------------------------------------------------------------- Kubernetes: Kafka, topics, users
def test_kafka_topics_are_the_topics_of_deploy_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_worker_settings(monkeypatch)
    expected = {
        spec.name: (spec.partitions, spec.replication, spec.config) for spec in topic_specs(settings, brokers())
    }
    actual = {
        topic["spec"].get("topicName", topic["metadata"]["name"]): (
            topic["spec"]["partitions"],
            topic["spec"]["replicas"],
            {key: str(value) for key, value in topic["spec"]["config"].items()},
        )
        for topic in objects("KafkaTopic")
    }
    assert actual == expected
    config = one("Kafka")["spec"]["kafka"]["config"]
    assert config["min.insync.replicas"] == 2 and config["default.replication.factor"] == 3
    assert config["auto.create.topics.enable"] is False
    assert brokers() == 3
    [pool] = objects("KafkaNodePool")
    assert sorted(pool["spec"]["roles"]) == ["broker", "controller"]


_IMPLIED = {"Describe": {"Read", "Write", "Delete", "Alter"}, "DescribeConfigs": {"AlterConfigs"}}


def allows(user: dict[str, Any], kind: str, name: str, operation: str) -> bool:
    """What Kafka's ACL authorizer decides for this user (allow rules only, as these users have)."""
    for rule in user["spec"]["authorization"]["acls"]:
        resource = rule["resource"]
        if resource["type"] != kind or rule.get("type", "allow") != "allow":
            continue
        pattern = resource.get("name", "")
        if resource.get("patternType", "literal") == "prefix":
            matches = name.startswith(pattern)
        else:
            matches = pattern in (name, "*")
        granted = set(rule["operations"])
        if matches and ({operation, "All"} & granted or _IMPLIED.get(operation, set()) & granted):
            return True
    return False


def test_kafka_users_may_do_what_their_component_needs_and_no_more(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_worker_settings(monkeypatch)
    users = kafka_users()
    pipeline = [spec.name for spec in topic_specs(settings, brokers())]
    for user in users.values():
        assert user["spec"]["authentication"]["type"] == "scram-sha-512"

    service = users["tokenmeter-service"]
    for topic in pipeline:
        assert allows(service, "topic", topic, "Write") == (topic == settings.topic_raw), topic
        assert allows(service, "topic", topic, "Describe") == (topic == settings.topic_raw), topic
        assert not allows(service, "topic", topic, "Read")
    assert not [rule for rule in service["spec"]["authorization"]["acls"] if rule["resource"]["type"] != "topic"]

    worker = users[settings.kafka_sasl_username]
    # Faust's own topics (stage 2's table changelog, its leader topic) carry the app id as their prefix.
    faust = {topic for topic in pipeline if topic.startswith(f"{settings.worker_id}-")}
    assert faust, "topic_specs names Faust's changelog topic"
    reads = {settings.topic_raw, settings.topic_rollups, settings.topic_budgets, settings.topic_price_overrides}
    writes = {
        settings.topic_priced,
        settings.topic_dlq,
        settings.topic_rollups,
        settings.topic_alerts_budget,
        settings.topic_alerts_anomaly,
    }
    for topic in pipeline:
        assert allows(worker, "topic", topic, "Describe"), topic  # the start-up check of every topic
        assert allows(worker, "topic", topic, "Read") == (topic in reads | faust), topic
        assert allows(worker, "topic", topic, "Write") == (topic in writes | faust), topic
        assert allows(worker, "topic", topic, "Create") == (topic in faust), topic
        assert not allows(worker, "topic", topic, "AlterConfigs"), topic
    assert allows(worker, "topic", f"{settings.worker_id}-__assignor-__leader", "Create")
    for group in (meter_group(settings), settings.worker_id):  # stage 1, Faust
        assert allows(worker, "group", group, "Read"), group
    assert not allows(worker, "group", "someone-else", "Read")
    assert not [rule for rule in worker["spec"]["authorization"]["acls"] if rule["resource"]["type"] == "cluster"]

    keda = users["tokenmeter-keda"]
    assert allows(keda, "group", meter_group(settings), "Describe")
    assert allows(keda, "topic", settings.topic_raw, "Describe")
    assert not any(allows(keda, "topic", topic, op) for topic in pipeline for op in ("Read", "Write"))

    operator = users["tokenmeter-operator"]
    assert allows(operator, "topic", settings.topic_budgets, "Write")
    assert not allows(operator, "topic", settings.topic_raw, "Write")


def test_the_worker_authenticates_with_strimzi_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_worker_settings(monkeypatch)
    kafka = one("Kafka")
    cluster = kafka["metadata"]["name"]
    [listener] = [
        listener
        for listener in kafka["spec"]["kafka"]["listeners"]
        if any(server.endswith(f":{listener['port']}") for server in settings.kafka_bootstrap.split(","))
    ]
    assert settings.kafka_bootstrap == f"{cluster}-kafka-bootstrap.{kafka['metadata']['namespace']}.svc:9093"
    assert listener["tls"] is True and settings.kafka_security_protocol == "SASL_SSL"
    assert listener["authentication"]["type"] == "scram-sha-512" and settings.kafka_sasl_mechanism == "SCRAM-SHA-512"

    container = worker_container()
    [password] = [v for v in container["env"] if v["name"] == "TOKENMETER_KAFKA_SASL_PASSWORD"]
    reference = password["valueFrom"]["secretKeyRef"]
    assert reference == {"name": settings.kafka_sasl_username, "key": "password"}  # Strimzi's user Secret
    assert settings.kafka_sasl_username in kafka_users()

    # The CA file the settings name is the cluster CA certificate Strimzi keeps in <cluster>-cluster-ca-cert.
    ca = settings.kafka_ssl_ca_location
    assert ca is not None
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == ca.parent]
    [volume] = [v for v in one("Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == f"{cluster}-cluster-ca-cert"
    assert {"key": "ca.crt", "path": ca.name} in volume["secret"]["items"]

    database = urlsplit(settings.database_url)
    assert database.username == "tokenmeter_worker"
    assert parse_qs(database.query)["sslmode"] == ["verify-full"]
    cache_redis = urlsplit(settings.redis_url)
    assert cache_redis.scheme == "rediss" and cache_redis.username == "tokenmeter-worker"
    assert settings.kafka_client_properties and not settings.redis_cluster
    assert settings.home == Path("/var/lib/tokenmeter")
    assert any(Path(m["mountPath"]) == settings.home for m in container["volumeMounts"])


# ---------------------------------------------------------------- probes and health checks
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_probes_and_health_checks_ask_the_worker_s_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes' liveness and startup probes ask /healthz, readiness /readyz, Compose's health check
    /healthz, all on the metrics port of the settings; and those are the paths ``streams.health.serve``
    answers: for a worker that runs but has not verified its topics, /healthz says 200 and /readyz 503."""
    settings = k8s_worker_settings(monkeypatch)
    container = worker_container()
    [port] = container["ports"]
    assert port["containerPort"] == settings.metrics_port and settings.metrics_host == "0.0.0.0"
    paths = {}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        check = container[probe]["httpGet"]
        assert check["port"] in (port["name"], port["containerPort"]), probe
        paths[probe] = check["path"]
    assert paths == {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)

    for name in ("worker-1", "worker-2"):
        worker = settings_from(compose_env(name), monkeypatch)
        test = " ".join(compose()["services"][name]["healthcheck"]["test"])
        [url] = re.findall(r"https?://[^'\"\s]+", test)
        assert urlsplit(url).port == worker.metrics_port and worker.metrics_host == "0.0.0.0"
        assert urlsplit(url).path == "/healthz"

    health = Health(stall_timeout_s=120.0)
    server = serve(health, "127.0.0.1", free_port())
    assert server is not None
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        live, body = _get(base + paths["livenessProbe"])
        assert live == 200 and json.loads(body)["status"] == "ok"
        ready, body = _get(base + paths["readinessProbe"])
        assert ready == 503 and "topics not verified yet" in json.loads(body)["problems"]
        assert _get(base + "/not-a-probe")[0] == 404
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- autoscaling
def test_keda_scales_on_stage_one_lag_up_to_the_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = k8s_worker_settings(monkeypatch)
    scaled = one("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == one("Deployment")["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == meter_group(settings)
    assert meta["topic"] == settings.topic_raw
    assert meta["bootstrapServers"] == settings.kafka_bootstrap
    assert (
        meta["sasl"]
        == {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}[
            settings.kafka_sasl_mechanism
        ]
    )
    assert meta["tls"] == "enable" and settings.kafka_security_protocol == "SASL_SSL"
    assert meta["offsetResetPolicy"] == "earliest"
    [raw] = [t for t in objects("KafkaTopic") if t["metadata"]["name"] == settings.topic_raw]
    assert scaled["spec"]["maxReplicaCount"] == raw["spec"]["partitions"] == settings.topic_partitions
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert "replicas" not in one("Deployment")["spec"]  # KEDA's HPA owns the count

    auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
    refs = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    username = one("Secret", refs["username"]["name"])["stringData"][refs["username"]["key"]]
    assert username in kafka_users() and refs["password"] == {
        "parameter": "password",
        "name": username,
        "key": "password",
    }
    assert refs["ca"]["name"] == f"{one('Kafka')['metadata']['name']}-cluster-ca-cert" and refs["ca"]["key"] == "ca.crt"
    assert one("PodDisruptionBudget")["spec"]["selector"] == one("Deployment")["spec"]["selector"]


# ---------------------------------------------------------------- Postgres roles (real server)
def _priced(tenant: str, count: int, start: datetime) -> list[PricedEvent]:
    book = PriceBook()
    events = usage_events(
        count,
        seed=14,
        tenants=[tenant],
        users_per_tenant=3,
        features=("search", "chat"),
        models=(Model("openai", "gpt-4o"), Model("anthropic", "claude-sonnet-4-5")),
        start=start,
        span=timedelta(minutes=30),
        prefix=tenant,
    )
    return [PricedEvent(event, book.price(event)) for event in map(validate_event, events)]


def _alert(tenant: str) -> Alert:
    return Alert(
        alert_id=f"{tenant}-roles-test",
        kind="budget.threshold",
        tenant_id=tenant,
        scope={"dimension": "tenant", "value": ""},
        period="day",
        threshold_percent=50,
        current=Decimal("1.5"),
        limit=Decimal("3"),
        message="half the budget",
        created_at=datetime.now(UTC),
    )


@pytest.fixture
def scratch_database(stack: LocalStack, settings: Settings, unique: str) -> Iterator[str]:
    name = f"tokenmeter_roles_{unique}"
    with psycopg.connect(make_conninfo(settings.database_url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(settings.database_url, dbname=name)
    finally:
        with psycopg.connect(make_conninfo(settings.database_url, dbname="postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            for role in ("tokenmeter_operator", "tokenmeter_reporting", "tokenmeter_worker", "tokenmeter_owner"):
                # A role still used in another database of this cluster stays.
                with contextlib.suppress(psycopg.errors.DependentObjectsStillExist):
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_roles_sql_gives_each_component_what_its_code_needs(scratch_database: str, unique: str) -> None:
    """roles.sql applies before the migrations (which then run as tokenmeter_owner) and again after them;
    then the worker's sink, the reports and the operator's commands work as their roles, and nothing else."""
    roles = ROLES_SQL.read_text(encoding="utf-8")
    passwords = {role: secrets.token_hex(12) for role in ("owner", "worker", "reporting", "operator")}
    with psycopg.connect(scratch_database, autocommit=True) as admin:
        admin.execute(roles.encode())
        for role, password in passwords.items():
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(f"tokenmeter_{role}"), sql.Literal(password))
            )

    def url(role: str) -> str:
        return make_conninfo(scratch_database, user=f"tokenmeter_{role}", password=passwords[role])

    assert migrate(url("owner"))
    with psycopg.connect(scratch_database, autocommit=True) as admin:
        admin.execute(roles.encode())
        admin.execute(roles.encode())  # idempotent
        owners = admin.execute(
            "SELECT DISTINCT tableowner FROM pg_tables"
            " WHERE schemaname = 'tokenmeter' OR tablename = 'schema_migrations'"
        ).fetchall()
        assert owners == [("tokenmeter_owner",)]

    tenant = f"roles-{unique}"
    now = datetime.now(UTC)
    batch = _priced(tenant, 20, now - timedelta(hours=1))
    with psycopg.connect(url("worker")) as worker:
        result = write_batch(worker, batch)
        assert result.inserted == 20 and result.rollups
        assert write_batch(worker, batch).inserted == 0  # a replay
        assert store_alerts(worker, [_alert(tenant)]) == {f"{tenant}-roles-test"}
        assert tenant_allocation(worker, tenant, now).balance == 0  # prepaid credits: the worker follows grants
        worker.commit()
        assert deliver_pending(worker, ["https://hooks.example/x"], post=lambda _u, _b, _h: 200) >= 1
        for statement in (
            "UPDATE tokenmeter.ledger SET total_cost = 0",
            "DELETE FROM tokenmeter.rollups",
            "INSERT INTO tokenmeter.rate_cards (tenant_id, mode) VALUES ('x', 'pass_through')",
            "CREATE TABLE tokenmeter.intruder (x int)",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), worker.transaction():
                worker.execute(statement.encode())

    period = f"{batch[0].event.timestamp:%Y-%m}"
    in_period = sum(1 for item in batch if f"{item.event.timestamp:%Y-%m}" == period)
    with psycopg.connect(url("reporting")) as reporting:
        report = build_report(reporting, tenant, parse_period(period))
        assert report["totals"]
        assert invoice(reporting, tenant, period).calls == in_period
        assert [a["alert_id"] for a in list_alerts(reporting, tenant)] == [f"{tenant}-roles-test"]
        reporting.rollback()
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction), reporting.transaction():
            reporting.execute("INSERT INTO tokenmeter.tenants (tenant_id) VALUES ('x')")
        reporting.execute("SET default_transaction_read_only = off")  # and without the read-only default:
        reporting.commit()
        for statement in (
            "INSERT INTO tokenmeter.ledger (event_id) VALUES ('x')",
            "DELETE FROM tokenmeter.alerts",
            "UPDATE tokenmeter.rollups SET cost = 0",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), reporting.transaction():
                reporting.execute(statement.encode())

    with psycopg.connect(url("operator"), autocommit=True) as operator:
        set_rate_card(operator, RateCard(tenant, "cost_plus", Decimal("20")))
        assert set_time_zone(operator, tenant, "Europe/Berlin")
        credit = record_grant(operator, tenant, Decimal(1), priority=0, starts_at=now, expires_at=None)
        assert void_grant(operator, credit.grant_id, now).voided_at == now  # credits grant, credits void
        last_month = f"{(now.replace(day=1) - timedelta(days=1)):%Y-%m}"
        assert finalize(operator, tenant, last_month, now).status == "finalized"
        # Currencies: `fx set` and finalizing an invoice in EUR (its rate frozen in the same INSERT).
        add_fx_rate(operator, FxRate("USD", "EUR", Decimal("0.9213"), date(2000, 1, 1), "roles test"))
        set_rate_card(operator, RateCard(f"{tenant}-eur", currency="EUR"))
        assert finalize(operator, f"{tenant}-eur", last_month, now).fx is not None
        for statement in ("UPDATE tokenmeter.ledger SET total_cost = 0", "DELETE FROM tokenmeter.alerts"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                operator.execute(statement.encode())


# ---------------------------------------------------------------- Redis ACL users of deploy/compose.yaml
def compose_redis_users() -> dict[str, list[str]]:
    """The ``--user`` rules of the Compose file's redis-server, without the user's password."""
    command = [compose_value(str(arg)) for arg in compose()["services"]["redis"]["command"]]
    users: dict[str, list[str]] = {}
    for i, arg in enumerate(command):
        if arg == "--user":
            rest = command[i + 1 :]
            end = next((j for j, a in enumerate(rest) if a.startswith("--")), len(rest))
            name, *rules = rest[:end]
            users[name] = [rule for rule in rules if not rule.startswith(">")]
    return users


def test_the_readme_shows_the_redis_users_compose_gives() -> None:
    readme = (DEPLOY.parent / "README.md").read_text(encoding="utf-8")
    shown = {
        line.split()[1]: [rule for rule in line.split()[2:] if not rule.startswith(">")]
        for line in readme.splitlines()
        if line.startswith("user tokenmeter-")
    }
    users = compose_redis_users()
    assert shown == {name: rules for name, rules in users.items() if name in shown}
    assert set(shown) == {"tokenmeter-worker", "tokenmeter-service"}


def test_compose_redis_users_let_the_worker_and_services_work(
    stack: LocalStack, settings: Settings, unique: str
) -> None:
    """The ACL rules Compose gives Redis, applied to the test stack's Redis (6.2, the oldest supported),
    are enough for the quota client (check, reserve, commit, the stale-call count) and for the worker's
    Redis writes, and keep both to tm:* keys and their own commands."""
    users = compose_redis_users()
    assert {"default", "tokenmeter-worker", "tokenmeter-service"} <= set(users)
    admin = redis.Redis.from_url(settings.redis_url)
    password = secrets.token_hex(12)
    made: dict[str, redis.Redis] = {}
    try:
        for component in ("worker", "service"):
            name = f"acl-{component}-{unique}"
            admin.acl_setuser(name, reset=True)  # no rules of redis-py's own: the Compose ones, as given
            admin.execute_command("ACL", "SETUSER", name, *users[f"tokenmeter-{component}"], f">{password}")
            made[component] = redis.Redis.from_url(
                settings.redis_url.replace("redis://", f"redis://{name}:{password}@", 1)
            )
        worker, service_client = made["worker"], made["service"]
        tenant = f"acl-{unique}"
        now = datetime.now(UTC)

        # The worker: spend (a script, loaded again after a flush), freshness, budget mirror, stale calls.
        admin.script_flush()
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        day = Rollup(tenant, "day", start, "tenant", "", 3, 0, 30, 30, 0, 0, Decimal(1), Decimal(1), Decimal(2))
        assert write_spend(worker, [day], now) == 1
        fresh = freshness_key(f"acl-{unique}")
        write_freshness(worker, fresh, "pod/1", int(now.timestamp() * 1000), int(now.timestamp() * 1000))
        prune_freshness(worker, fresh, int(now.timestamp() * 1000))
        worker.hdel(fresh, "pod/1")
        budget = Budget(tenant, "tenant", "", "day", Decimal(10), hard=True)
        worker.set(budget_key(tenant, "tenant", ""), budget.redis_json())
        worker.hget(stale_calls_key(tenant, "tenant", ""), "day:0")
        assert mirror_balance(worker, tenant, Decimal(5), int(now.timestamp() * 1000))  # a prepaid balance

        # The services: $2 of a hard $10 budget spent, but no worker reports freshness for this worker id:
        # the data is stale, and on_stale=allow lets the call through and counts it (tm:stale_calls).
        quota = QuotaClient(
            settings.model_copy(update={"worker_id": f"acl-{unique}", "redis_url": "unused"}), client=service_client
        )
        decision = quota.check(tenant, "search", "u1")
        assert decision.allowed and decision.stale and decision.credit_balance == Decimal(5)
        assert sum(int(v) for v in admin.hvals(stale_calls_key(tenant, "tenant", ""))) == 1
        reservation = quota.reserve(tenant, Decimal("0.01"), "search", "u1", tokens=100)
        assert reservation.allowed, reservation.reason
        quota.commit(reservation, Decimal("0.004"))
        quota.release(quota.reserve(tenant, Decimal("0.01"), tokens=10))

        worker.delete(budget_key(tenant, "tenant", ""))
        forget_balance(worker, tenant)
        for client in (worker, service_client):
            for forbidden in (
                lambda c: c.get("not-tokenmeter"),
                lambda c: c.keys("*"),
                lambda c: c.flushdb(),
                lambda c: c.config_get("*"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    forbidden(client)
        with pytest.raises(redis.exceptions.NoPermissionError):
            service_client.set(budget_key(tenant, "tenant", ""), "{}")  # services only read budgets and spend
    finally:
        for client in made.values():
            client.close()
        for component in made:
            admin.acl_deluser(f"acl-{component}-{unique}")
        stale = list(admin.scan_iter(match=f"tm:*{unique}*", count=1000))
        if stale:
            admin.delete(*stale)
        admin.close()
