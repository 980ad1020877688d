"""Test fixtures. Integration tests run against a private local stack (real Kafka, Postgres, Redis)
under ``.tokenmeter-test/`` on their own ports, so a developer's own ``tokenmeter dev up`` is untouched.
The stack starts once per session from a clean state and stops at the end; if it cannot start, the
tests that need it fail (never skip)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# TOKENMETER_TEST_SLOT=N (1-9) runs a second private stack beside the default one (ports +N*100,
# state in .tokenmeter-test-N), so two test sessions on one machine never stop each other's stack.
_SLOT = int(os.environ.get("TOKENMETER_TEST_SLOT", "0") or 0)
TEST_ENV = {
    "TOKENMETER_HOME": str(ROOT / (f".tokenmeter-test-{_SLOT}" if _SLOT else ".tokenmeter-test")),
    "TOKENMETER_KAFKA_PORT": str(29092 + 100 * _SLOT),
    "TOKENMETER_KAFKA_CONTROLLER_PORT": str(29093 + 100 * _SLOT),
    "TOKENMETER_POSTGRES_PORT": str(25432 + 100 * _SLOT),
    "TOKENMETER_REDIS_PORT": str(26379 + 100 * _SLOT),
    "TOKENMETER_KAFKA_BOOTSTRAP": "",
    "TOKENMETER_DATABASE_URL": "",
    "TOKENMETER_REDIS_URL": "",
}
os.environ.update(TEST_ENV)

from deploy.settings import Settings, get_settings  # noqa: E402
from deploy.stack import LocalStack  # noqa: E402


@pytest.fixture(scope="session")
def settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[LocalStack]:
    local = LocalStack(settings)
    local.down(purge=True, progress=lambda _m: None)
    local.up(progress=lambda _m: None)
    from deploy.topics import ensure_topics

    ensure_topics(settings)
    yield local
    local.down(progress=lambda _m: None)


@pytest.fixture
def unique() -> str:
    """A short unique suffix so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: stops and kills real stack services; runs after everything else")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that uses the real stack (directly or through another fixture) is marked
    ``integration`` (``pytest -m "not integration"`` runs the rest, no server needed); fault scenarios
    run last: they stop and restart the shared stack's services."""
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
    items.sort(key=lambda item: item.get_closest_marker("faults") is not None)
