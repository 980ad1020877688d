"""Webhook delivery from the alerts outbox: retried with back-off, never posted twice on replay."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, ClassVar

import psycopg
import pytest

from deploy.settings import Settings
from deploy.stack import LocalStack
from sinks.alerts import store_alerts
from sinks.webhooks import deliver_pending


class Receiver(BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []
    received: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Receiver.received.append((self.headers["Idempotency-Key"], body))
        self.send_response(Receiver.statuses.pop(0) if Receiver.statuses else 200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Receiver.statuses, Receiver.received = [], []
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()


def alert(alert_id: str) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": "budget.blocked", "tenant_id": "acme", "scope": {"dimension": "tenant"},
            "period": "month:2025-07-01", "threshold_percent": 100, "current": Decimal("10.25"), "baseline": None,
            "limit": Decimal(10), "message": "acme has spent $10.25 of $10", "details": {},
            "created_at": datetime.now(UTC)}  # fmt: skip


def test_failed_posts_are_retried_and_delivered_once(stack: LocalStack, settings: Settings, webhook: str) -> None:
    first, second = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("UPDATE tokenmeter.alerts SET delivered_at = now() WHERE delivered_at IS NULL")  # others' alerts
        assert store_alerts(conn, [alert(first), alert(second)]) == {first, second}
        assert store_alerts(conn, [alert(first)]) == set()  # a replay stores nothing new
        Receiver.statuses = [500]  # the first post fails
        assert deliver_pending(conn, [webhook]) == 1
        assert deliver_pending(conn, [webhook]) == 0  # the failed one waits for its back-off
        conn.execute("UPDATE tokenmeter.alerts SET next_attempt_at = now() WHERE alert_id IN (%s, %s)", (first, second))
        assert deliver_pending(conn, [webhook]) == 1
        assert deliver_pending(conn, [webhook]) == 0
        row = conn.execute("SELECT delivery_attempts, last_error FROM tokenmeter.alerts WHERE alert_id = %s",
                           (first,)).fetchone()  # fmt: skip
    keys = [key for key, _ in Receiver.received]
    assert sorted(keys) == sorted([first, first, second])  # one failed attempt, then exactly one success each
    assert row == (2, None)
    assert Receiver.received[0][1]["text"].startswith(":rotating_light: [budget.blocked]")
