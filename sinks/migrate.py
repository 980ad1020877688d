"""A small migration runner: versioned SQL files in ``sinks/migrations``, each applied once and recorded.

Files are named ``NNNN_description.sql`` and applied in order, each in its own transaction, under an
advisory lock so that two processes starting at once do not race. An applied file whose text changed
afterwards is reported as an error: migrations are append-only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import psycopg

_LOCK_KEY = 0x746F6B656E  # "token": any constant shared by every tokenmeter process


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    folder = resources.files("sinks").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version, _, rest = entry.name.partition("_")
            found.append(Migration(version, rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def pending_migrations(database_url: str, connect_timeout: int = 5) -> list[str] | None:
    """The migrations (``NNNN_name``) this version has that the database has not applied; None when this
    role may not read ``schema_migrations`` (roles.sql's worker may not: nothing to tell then). Raises
    ``psycopg.OperationalError`` when Postgres cannot be reached."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=connect_timeout) as conn:
        try:
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        except psycopg.errors.UndefinedTable:
            done = set()
        except psycopg.errors.InsufficientPrivilege:
            return None
    return [f"{m.version}_{m.name}" for m in available_migrations() if m.version not in done]


def migrate(database_url: str) -> list[str]:
    """Apply the pending migrations; return the versions applied now."""
    applied_now: list[str] = []
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done: dict[str, str] = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            for migration in available_migrations():
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version}_{migration.name} changed after it was applied; "
                            "add a new migration instead of editing an applied one"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now
