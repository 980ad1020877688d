"""Webhook delivery from the alerts outbox: retried with back-off, never posted twice on replay."""

from __future__ import annotations

import contextlib
import http.client
import json
import socketserver
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
from schemas.records import Alert
from sinks.alerts import store_alerts
from sinks.webhooks import deliver_pending, http_post, redacted


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


def alert(alert_id: str) -> Alert:
    return Alert(
        **{
            "alert_id": alert_id,
            "kind": "budget.blocked",
            "tenant_id": "acme",
            "scope": {"dimension": "tenant"},
            "period": "month:2025-07-01",
            "threshold_percent": 100,
            "current": Decimal("10.25"),
            "baseline": None,
            "limit": Decimal(10),
            "message": "acme has spent $10.25 of $10",
            "details": {},
            "created_at": datetime.now(UTC),
        }
    )


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
        row = conn.execute(
            "SELECT delivery_attempts, last_error FROM tokenmeter.alerts WHERE alert_id = %s", (first,)
        ).fetchone()
    keys = [key for key, _ in Receiver.received]
    assert sorted(keys) == sorted([first, first, second])  # one failed attempt, then exactly one success each
    assert row == (2, None)
    assert Receiver.received[0][1]["text"].startswith(":rotating_light: [budget.blocked]")


class NotHttp(socketserver.StreamRequestHandler):
    """A TCP endpoint that is not an HTTP server: it reads the request, then answers ``reply`` (or hangs
    up at once when ``reply`` is None)."""

    reply: ClassVar[bytes | None] = None

    def handle(self) -> None:
        if self.reply is None:
            return
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self.rfile.read(length)  # all of it: closing on unread bytes would reset the connection instead
        self.wfile.write(self.reply)


@contextlib.contextmanager
def serving(reply: bytes | None) -> Iterator[str]:
    """A real local TCP server answering ``reply`` (see NotHttp); yields its URL."""
    handler = type("Handler", (NotHttp,), {"reply": reply})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


GARBAGE = b"garbage\r\n\r\n"


@pytest.fixture(params=[GARBAGE, None], ids=["garbage-reply", "hangs-up"])
def not_http(request: pytest.FixtureRequest) -> Iterator[str]:
    with serving(request.param) as url:
        yield url


def _delivery(conn: psycopg.Connection, alert_id: str) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT delivery_attempts, delivered_at, last_error FROM tokenmeter.alerts WHERE alert_id = %s", (alert_id,)
    ).fetchone()
    assert row is not None
    return tuple(row)


def _fresh_alert(conn: psycopg.Connection, prefix: str) -> str:
    """Store one new alert as the only undelivered one (others' alerts are marked delivered)."""
    alert_id = f"{prefix}-{uuid.uuid4().hex}"
    conn.execute("UPDATE tokenmeter.alerts SET delivered_at = now() WHERE delivered_at IS NULL")
    assert store_alerts(conn, [alert(alert_id)]) == {alert_id}
    return alert_id


def test_an_endpoint_that_is_not_http_is_a_failed_delivery(
    stack: LocalStack, settings: Settings, not_http: str
) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        alert_id = _fresh_alert(conn, "nh")
        assert deliver_pending(conn, [not_http]) == 0  # and does not raise
        attempts, delivered_at, last_error = _delivery(conn, alert_id)
        assert (attempts, delivered_at) == (1, None)
        assert last_error.startswith(f"{redacted(not_http)}: ")
        conn.execute("UPDATE tokenmeter.alerts SET next_attempt_at = now() WHERE alert_id = %s", (alert_id,))
        assert deliver_pending(conn, [not_http]) == 0  # retried after its back-off, failing the same way
        assert _delivery(conn, alert_id)[0] == 2


def test_garbage_reply_is_not_an_os_error() -> None:
    """Why catching OSError and ValueError was not enough: urllib raises http.client's own errors."""
    with serving(GARBAGE) as url, pytest.raises(http.client.BadStatusLine) as raised:
        http_post(url, b"{}", {})
    assert not isinstance(raised.value, OSError | ValueError)


def test_malformed_urls_and_any_exception_fail_that_url_only(
    stack: LocalStack, settings: Settings, webhook: str
) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        alert_id = _fresh_alert(conn, "bad-url")
        bad = ["not a url", "ftp://x/T000/B000/secret", "file:///etc/passwd", "http://[::1"]
        assert deliver_pending(conn, [*bad, webhook]) == 0
        attempts, delivered_at, last_error = _delivery(conn, alert_id)
        assert (attempts, delivered_at) == (1, None)
        assert last_error.count("<webhook URL>: ValueError") == 3 and "ftp://x/…: ValueError" in last_error
        assert "secret" not in last_error and "passwd" not in last_error  # URLs carry secrets: host only
        assert [key for key, _ in Receiver.received] == [alert_id]  # the good URL was still posted to

        def broken(url: str, body: bytes, headers: dict[str, str]) -> int:
            raise RuntimeError("a bug in a post function")

        conn.execute("UPDATE tokenmeter.alerts SET next_attempt_at = now() WHERE alert_id = %s", (alert_id,))
        assert deliver_pending(conn, [webhook], post=broken) == 0
        assert _delivery(conn, alert_id)[0] == 2
        assert "RuntimeError: a bug in a post function" in _delivery(conn, alert_id)[2]
