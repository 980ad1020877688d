"""Kafka broker jars: pinned coordinates and SHA-256 sums, fetched from Maven Central once and verified."""

from __future__ import annotations

import hashlib
import shutil
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


class JarError(RuntimeError):
    pass


@dataclass(frozen=True)
class PinnedJar:
    group: str
    artifact: str
    version: str
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.artifact}-{self.version}.jar"

    def url(self, repo: str) -> str:
        return f"{repo.rstrip('/')}/{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.filename}"


def read_lock() -> list[PinnedJar]:
    text = resources.files("deploy").joinpath("kafka/jars.lock").read_text()
    jars = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        coords, sha = line.split()
        group, artifact, version = coords.split(":")
        jars.append(PinnedJar(group, artifact, version, sha))
    return jars


def kafka_version(jars: list[PinnedJar] | None = None) -> str:
    for jar in jars or read_lock():
        if jar.artifact == "kafka_2.13":
            return jar.version
    raise JarError("jars.lock names no kafka_2.13 artifact")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_jars(cache: Path, repo_url: str, progress: Callable[[str], None] = lambda _m: None) -> Path:
    """Return a folder holding every pinned jar, downloading and verifying what is missing."""
    jars = read_lock()
    folder = cache / f"kafka-{kafka_version(jars)}"
    folder.mkdir(parents=True, exist_ok=True)
    missing = [jar for jar in jars if not (folder / jar.filename).exists()]
    for index, jar in enumerate(missing, 1):
        progress(f"downloading {jar.filename} ({index}/{len(missing)})")
        partial = folder / (jar.filename + ".part")
        try:
            with urllib.request.urlopen(jar.url(repo_url), timeout=60) as response, partial.open("wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise JarError(
                f"could not download {jar.url(repo_url)}: {exc}. Check network access to Maven Central "
                "or set TOKENMETER_MAVEN_REPO_URL to a mirror."
            ) from exc
        actual = _sha256(partial)
        if actual != jar.sha256:
            partial.unlink(missing_ok=True)
            raise JarError(f"checksum mismatch for {jar.filename}: expected {jar.sha256}, got {actual}")
        partial.rename(folder / jar.filename)
    for jar in jars:
        if _sha256(folder / jar.filename) != jar.sha256:
            (folder / jar.filename).unlink()
            raise JarError(f"cached {jar.filename} failed its checksum and was removed; run the command again")
    return folder
