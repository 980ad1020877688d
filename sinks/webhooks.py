"""Alert delivery to webhooks, from the Postgres alerts table used as an outbox.

Each alert is stored once (``sinks.alerts.store_alerts``); this loop posts the undelivered ones to
every configured URL (``TOKENMETER_WEBHOOK_URLS``) as JSON with a Slack-compatible ``text`` field and
the alert itself, with an ``Idempotency-Key: <alert_id>`` header. A 2xx from every URL marks the
alert delivered; anything else is retried with exponential back-off (2 s, 4 s … up to 5 min). That
includes every exception of one post (an endpoint that answers garbage, hangs up, fails TLS, or a
URL that is not http(s)): it is a failed delivery to that URL, never an error of the worker. A
replayed pipeline never posts an alert twice; only a crash between a post and its mark can, and the
receiver can drop that repeat by its key. ``FOR UPDATE SKIP LOCKED`` lets several workers share it.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import psycopg

from schemas.records import ALERT_FIELDS

log = logging.getLogger("tokenmeter.webhooks")
MAX_BACKOFF = timedelta(minutes=5)

Post = Callable[[str, bytes, dict[str, str]], int]


def redacted(url: str) -> str:
    """A webhook URL as logs and ``last_error`` may show it: scheme and host only (Slack-style URLs
    carry their secret in the path)."""
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}/…" if parts.scheme and parts.hostname else "<webhook URL>"
    except ValueError:
        return "<webhook URL>"


def http_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST and return the HTTP status. Only http(s) URLs with a host: urllib would otherwise also
    open ``file:`` and ``ftp:`` URLs from a mistyped setting."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {redacted(url)!r}")
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def payload(alert: dict[str, Any]) -> bytes:
    emoji = ":rotating_light:" if "blocked" in alert["kind"] else ":warning:"
    return json.dumps({"text": f"{emoji} [{alert['kind']}] {alert['message']}", "alert": alert}, default=str).encode()


_COLUMNS = ", ".join(f'"{name}"' for name in ALERT_FIELDS)


def _post_everywhere(alert: dict[str, Any], urls: Sequence[str], post: Post) -> list[str]:
    """Post one alert to every URL; return the failures, one line per URL. Any exception is caught: an
    endpoint that answers something other than HTTP (``http.client.BadStatusLine``, ``IncompleteRead``
    are not OSError) must fail its own delivery, not stop the worker again at every restart."""
    headers = {"Content-Type": "application/json", "Idempotency-Key": str(alert["alert_id"])}
    try:
        body = payload(alert)
    except Exception as exc:  # a stored alert that cannot be encoded fails like an endpoint would
        return [f"payload: {type(exc).__name__}: {exc}"]
    errors = []
    for url in urls:
        try:
            status = post(url, body, headers)
        except Exception as exc:
            errors.append(f"{redacted(url)}: {type(exc).__name__}: {str(exc).replace(url, redacted(url))}")
            continue
        if not 200 <= status < 300:
            errors.append(f"{redacted(url)}: HTTP {status}")
    return errors


def deliver_pending(conn: psycopg.Connection, urls: Sequence[str], post: Post = http_post, limit: int = 100) -> int:
    """Post the alerts that are due; return how many were delivered now."""
    if not urls:
        return 0
    delivered = 0
    with conn.transaction():
        rows = conn.execute(
            f"SELECT {_COLUMNS}, delivery_attempts FROM tokenmeter.alerts WHERE delivered_at IS NULL"
            " AND next_attempt_at <= now() ORDER BY created_at LIMIT %s FOR UPDATE SKIP LOCKED",
            (limit,),
        ).fetchall()
        for *values, attempts in rows:
            alert = dict(zip(ALERT_FIELDS, values, strict=True))
            errors = _post_everywhere(alert, urls, post)
            if not errors:
                conn.execute(
                    "UPDATE tokenmeter.alerts SET delivered_at = now(), delivery_attempts = delivery_attempts + 1,"
                    " last_error = NULL WHERE alert_id = %s",
                    (alert["alert_id"],),
                )
                delivered += 1
                continue
            backoff = min(timedelta(seconds=2 ** (attempts + 1)), MAX_BACKOFF)
            log.warning("webhook delivery of %s failed (attempt %d): %s", alert["alert_id"], attempts + 1, errors[0])
            conn.execute(
                "UPDATE tokenmeter.alerts SET delivery_attempts = delivery_attempts + 1,"
                " next_attempt_at = now() + %s, last_error = %s WHERE alert_id = %s",
                (backoff, "; ".join(errors)[:1000], alert["alert_id"]),
            )
    return delivered
