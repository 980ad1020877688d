"""Supervision of the worker's two stages, and the HTTP endpoints that show it.

Each stage reports into a ``StageStatus`` (shared memory, because stage 1 is a child process): when it
last made progress (committed a batch, or had nothing to do), how far behind it is, and its last
error. The worker's supervisor (``streams/app.py``) reads them every second and decides:

- a stage that made no progress for ``worker_stall_timeout_s`` while it had messages to do is stuck;
- a stage process that exited is dead;
- either way the worker logs why and exits non-zero, so systemd or Kubernetes restarts it (their
  restart back-off applies), instead of idling while metering has stopped.

The metrics port serves ``/metrics`` (both processes), ``/healthz`` (the worker and both stages are
alive) and ``/readyz`` (alive, topics present, connected, neither stage stalled for half the timeout),
each answering JSON with the reasons when it is not 200.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("tokenmeter.health")

_PROGRESS, _BEHIND, _HEARTBEAT, _FAILURES = range(4)
_ERROR_BYTES = 400
LOOP_SILENCE_S = 15.0  # the worker's event loop did not tick for this long: it is hung


class StageStatus:
    """What one stage tells the supervisor; safe to share with a spawned child process."""

    def __init__(self, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.name = name
        now = time.time()
        self._values = context.Array("d", [now, 0.0, 0.0, 0.0], lock=False)
        self._error = context.Array("c", _ERROR_BYTES, lock=False)
        self._error_at = context.Value("d", 0.0, lock=False)

    def progressed(self, behind: int = 0, since: float | None = None) -> None:
        """A batch was committed, or there was nothing to do. ``since``: a part of the stage's work (a
        partition) has not moved since then, so progress counts from there."""
        now = time.time()
        self._values[_PROGRESS] = now if since is None else min(now, since)
        self._values[_HEARTBEAT] = now
        self._values[_BEHIND] = float(behind)

    def alive(self, behind: int) -> None:
        """The stage's loop ran (it may be retrying); ``behind`` messages wait for it."""
        self._values[_HEARTBEAT] = time.time()
        self._values[_BEHIND] = float(behind)
        if behind == 0:
            self._values[_PROGRESS] = time.time()

    def failed(self, reason: str) -> None:
        self._values[_FAILURES] += 1
        self._error.value = reason.encode("utf-8", "replace")[: _ERROR_BYTES - 1]
        self._error_at.value = time.time()

    def restart_clock(self) -> None:
        """Start counting from now (a new stage process starts with a clean slate)."""
        self._values[_PROGRESS] = time.time()
        self._values[_HEARTBEAT] = 0.0

    @property
    def behind(self) -> int:
        return int(self._values[_BEHIND])

    @property
    def seconds_since_progress(self) -> float:
        return max(0.0, time.time() - self._values[_PROGRESS])

    @property
    def started(self) -> bool:
        return self._values[_HEARTBEAT] > 0

    @property
    def failures(self) -> int:
        return int(self._values[_FAILURES])

    @property
    def last_error(self) -> str:
        """The last failure, if it happened after the last progress (older ones are history)."""
        if self._error_at.value < self._values[_PROGRESS]:
            return ""
        return bytes(self._error.value).decode("utf-8", "replace")

    def describe(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "behind": self.behind,
            "seconds_since_progress": round(self.seconds_since_progress, 1),
            "failures": self.failures,
            "last_error": self.last_error or None,
        }


@dataclass
class Health:
    """The worker's view of itself (its main process), read by the HTTP endpoints."""

    stall_timeout_s: float
    stages: dict[str, StageStatus] = field(default_factory=dict)
    processes: dict[str, multiprocessing.process.BaseProcess | None] = field(default_factory=dict)
    topics_ok: bool = False
    loop_tick: float = field(default_factory=time.time)
    fatal: str | None = None

    def stage(self, name: str) -> StageStatus:
        if name not in self.stages:
            self.stages[name] = StageStatus(name)
        return self.stages[name]

    def stuck(self) -> str | None:
        """Why the worker must exit now, or None."""
        for name, process in list(self.processes.items()):  # copies: the HTTP threads read while the worker stops
            if process is not None and process.exitcode is not None:
                status = self.stages.get(name)
                why = f" ({status.last_error})" if status is not None and status.last_error else ""
                return f"{name} process exited with code {process.exitcode}{why}"
        for name, status in list(self.stages.items()):
            if status.behind > 0 and status.seconds_since_progress > self.stall_timeout_s:
                why = f": {status.last_error}" if status.last_error else ""
                return (
                    f"{name} made no progress for {status.seconds_since_progress:.0f}s with {status.behind} "
                    f"messages behind{why}"
                )
        return None

    def problems(self, ready: bool) -> list[str]:
        found = [self.fatal] if self.fatal else []
        if time.time() - self.loop_tick > LOOP_SILENCE_S:
            found.append(f"the worker's event loop has not run for {time.time() - self.loop_tick:.0f}s")
        for name, process in list(self.processes.items()):
            if process is None or not process.is_alive():
                found.append(f"{name} process is not running")
        if not ready:
            return found
        if not self.topics_ok:
            found.append("topics not verified yet")
        for name, status in self.stages.items():
            if not status.started:
                found.append(f"{name} has not started yet")
            elif status.behind > 0 and status.seconds_since_progress > self.stall_timeout_s / 2:
                why = f" ({status.last_error})" if status.last_error else ""
                found.append(
                    f"{name} stalled: no progress for {status.seconds_since_progress:.0f}s with "
                    f"{status.behind} messages behind{why}"
                )
        return found

    def report(self, ready: bool) -> tuple[int, dict[str, Any]]:
        problems = self.problems(ready)
        body = {
            "status": "ok" if not problems else "unavailable",
            "problems": problems,
            "stages": {name: status.describe() for name, status in self.stages.items()},
            "pids": {name: p.pid if p is not None else None for name, p in list(self.processes.items())},
            "stall_timeout_s": self.stall_timeout_s,
        }
        return (200 if not problems else 503), body

    def metrics_text(self) -> str:
        """Gauges computed at scrape time (not stored in prometheus_client's per-process files)."""
        lines = [
            "# HELP tokenmeter_seconds_since_progress Seconds since a stage last committed a batch or was idle",
            "# TYPE tokenmeter_seconds_since_progress gauge",
        ]
        lines += [
            f'tokenmeter_seconds_since_progress{{stage="{name}"}} {s.seconds_since_progress:.3f}'
            for name, s in self.stages.items()
        ]
        lines += [
            "# HELP tokenmeter_ready 1 when /readyz answers 200",
            "# TYPE tokenmeter_ready gauge",
            f"tokenmeter_ready {0 if self.problems(ready=True) else 1}",
        ]
        return "\n".join(lines) + "\n"


def serve(health: Health, host: str, port: int) -> ThreadingHTTPServer | None:
    """Serve /metrics, /healthz and /readyz; None, with a warning, if the port is taken (or 0)."""
    if not port:
        return None
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/healthz", "/readyz"):
                status, body = health.report(ready=path == "/readyz")
                self._send(status, "application/json", json.dumps(body, indent=1).encode())
            elif path in ("/metrics", "/"):
                text = generate_latest(registry) + health.metrics_text().encode()
                self._send(200, "text/plain; version=0.0.4; charset=utf-8", text)
            else:
                self._send(404, "text/plain", b"try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the worker's log

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        log.warning("metrics and health not served: cannot listen on %s:%d (%s)", host, port, exc)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tokenmeter-http", daemon=True).start()
    return server
