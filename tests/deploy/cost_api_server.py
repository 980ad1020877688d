"""A local stand-in for the providers' cost endpoints (OpenAI ``/v1/organization/costs``, Anthropic
``/v1/organizations/cost_report``), serving saved pages in their documented shapes, for tests of
``tokenmeter reconcile --fetch``. Never a real endpoint: it listens on loopback in a thread."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "deploy" / "samples" / "reconcile"
PATHS = {"openai": "/v1/organization/costs", "anthropic": "/v1/organizations/cost_report"}
ADMIN_KEY = "sk-admin-test-key-0123456789"


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class CostApi:
    """Pages as raw JSON text (so amounts stay exactly as written) per provider; ``failures`` are
    answers given before the pages, one per request: (status, headers, body)."""

    pages: dict[str, list[str]]
    failures: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def answer(
        self, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        self.seen.append(Seen(path, query, headers))
        if self.failures:
            return self.failures.pop(0)
        provider = next((p for p, known in PATHS.items() if known == path), None)
        if provider is None:
            return 404, {}, b'{"error": {"message": "no such path"}}'
        key = (
            headers.get("authorization", "").removeprefix("Bearer ")
            if provider == "openai"
            else headers.get("x-api-key")
        )
        if key != ADMIN_KEY or (provider == "anthropic" and headers.get("anthropic-version") != "2023-06-01"):
            return 401, {}, b'{"error": {"type": "authentication_error", "message": "invalid admin key"}}'
        pages = self.pages[provider]
        token = query.get("page", [None])[0]
        index = 0 if token is None else _page_index(pages, token)
        if index is None:
            return 400, {}, b'{"error": {"message": "unknown page token"}}'
        return 200, {"Content-Type": "application/json"}, pages[index].encode()


def _page_index(pages: list[str], token: str) -> int | None:
    """The page that follows the one whose ``next_page`` is ``token``."""
    for index, text in enumerate(pages[:-1]):
        if json.loads(text).get("next_page") == token:
            return index + 1
    return None


def sample_pages(provider: str) -> list[str]:
    """The shipped sample export as pages of raw JSON text."""
    name = "openai_costs.json" if provider == "openai" else "anthropic_cost_report.json"
    document: Any = json.loads((SAMPLES / name).read_text())
    pages = document if isinstance(document, list) else [document]
    # Re-serialise page by page from the text itself, so numbers keep their written digits.
    text = (SAMPLES / name).read_text()
    if not isinstance(document, list):
        return [text]
    decoder = json.JSONDecoder()
    start = text.index("[") + 1
    out = []
    for _ in pages:
        while text[start] in " \n\t,":
            start += 1
        _value, end = decoder.raw_decode(text, start)
        out.append(text[start:end])
        start = end
    return out


@contextmanager
def serve(api: CostApi) -> Iterator[CostApi]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, extra, body = api.answer(parts.path, urllib.parse.parse_qs(parts.query), headers)
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
