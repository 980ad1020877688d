"""Fetching the providers' cost data with an admin key (``tokenmeter reconcile --fetch``).

* OpenAI: ``GET {base}/v1/organization/costs?start_time=<unix>&end_time=<unix>&bucket_width=1d
  &group_by=line_item&limit=180[&project_ids=P&group_by=project_id][&page=<next_page>]`` with
  ``Authorization: Bearer <admin key>``.
* Anthropic: ``GET {base}/v1/organizations/cost_report?starting_at=<RFC 3339>&ending_at=<RFC 3339>
  &bucket_width=1d&group_by[]=description[&group_by[]=workspace_id]&limit=31[&page=<next_page>]`` with
  ``x-api-key: <admin key>`` and ``anthropic-version: 2023-06-01``.

Pages are followed while ``has_more`` is true (``page=next_page``). 429 and 5xx answers and connection
errors are retried a few times (429 after its ``Retry-After``, capped); 401/403 and other 4xx stop at once
with the provider's own error message. The key never appears in an error.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from deploy.output import cell
from sinks.reconcile import ProviderName, load_json

ANTHROPIC_VERSION = "2023-06-01"
MAX_PAGES = 500  # a year of days, several times over: more means the server keeps saying has_more
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_RETRY_AFTER_S = 60.0
USER_AGENT = "tokenmeter-reconcile"


class FetchError(RuntimeError):
    """The provider's cost data could not be fetched; the message says why (never the key)."""


def request_url(
    provider: ProviderName, base_url: str, first_day: date, last_day: date, project: str | None, page: str | None
) -> str:
    """The URL of one page of the provider's daily costs over ``first_day..last_day`` (UTC, inclusive)."""
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    end = datetime(last_day.year, last_day.month, last_day.day, tzinfo=UTC) + timedelta(days=1)
    params: list[tuple[str, str]]
    if provider == "openai":
        path = "/v1/organization/costs"
        params = [
            ("start_time", str(int(start.timestamp()))),
            ("end_time", str(int(end.timestamp()))),
            ("bucket_width", "1d"),
            ("group_by", "line_item"),
            ("limit", "180"),
        ]
        if project is not None:  # filtered by the API, and grouped so that each line says its project
            params += [("project_ids", project), ("group_by", "project_id")]
    else:
        path = "/v1/organizations/cost_report"
        params = [
            ("starting_at", start.strftime("%Y-%m-%dT%H:%M:%SZ")),
            ("ending_at", end.strftime("%Y-%m-%dT%H:%M:%SZ")),
            ("bucket_width", "1d"),
            ("group_by[]", "description"),
            ("limit", "31"),
        ]
        if project is not None:
            params.append(("group_by[]", "workspace_id"))
    if page is not None:
        params.append(("page", page))
    return base_url.rstrip("/") + path + "?" + urllib.parse.urlencode(params)


def request_headers(provider: ProviderName, key: str) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
    if provider == "openai":
        headers["Authorization"] = f"Bearer {key}"
    else:
        headers["x-api-key"] = key
        headers["anthropic-version"] = ANTHROPIC_VERSION
    return headers


def _provider_message(body: bytes, secrets: Sequence[str] = ()) -> str:
    """The ``error.message`` both APIs put in an error body, else the start of the body; printable, and
    without any of ``secrets`` (a proxy or server may echo the key it refused)."""
    message = body[:200].decode("utf-8", "replace")
    try:
        error = json.loads(body).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = str(error["message"])[:300]
    except (ValueError, AttributeError, RecursionError):
        pass
    return _redacted(message, secrets)


def _redacted(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return cell(text).plain  # control characters as escapes: an ESC would drive the terminal it is printed on


def _secrets(headers: dict[str, str]) -> list[str]:
    """The credentials among request headers: the key, and ``Bearer <key>``'s key."""
    values = [headers[name] for name in ("Authorization", "x-api-key") if name in headers]
    return values + [v.removeprefix("Bearer ") for v in values if v.startswith("Bearer ")]


def _retry_after(value: str | None, default: float) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        seconds = default  # an HTTP date: wait the default instead of parsing clocks
    if seconds != seconds:  # "nan": time.sleep would raise
        seconds = default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def get_json(
    url: str,
    headers: dict[str, str],
    attempts: int = 4,
    timeout: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Any:
    """One GET, JSON numbers read as Decimal; retried on 429, 5xx and connection errors."""
    secrets = _secrets(headers)
    shown = _redacted(url.split("?", 1)[0], secrets)
    delay = 1.0
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
                body = response.read(MAX_BODY_BYTES + 1)
        except urllib.error.HTTPError as exc:
            try:
                message = _provider_message(exc.read(64 * 1024), secrets)
            except (OSError, http.client.HTTPException):
                message = "(no readable error body)"
            if exc.code in (401, 403):
                raise FetchError(f"{shown}: HTTP {exc.code}, the admin key was refused: {message}") from None
            if exc.code != 429 and exc.code < 500:
                raise FetchError(f"{shown}: HTTP {exc.code}: {message}") from None
            last = f"HTTP {exc.code}: {message}"
            wait = _retry_after(exc.headers.get("Retry-After"), delay) if exc.code == 429 else delay
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, TLS, a cut-off body
            last = _redacted(f"cannot connect: {getattr(exc, 'reason', exc) or type(exc).__name__}", secrets)
            wait = delay
        else:
            if len(body) > MAX_BODY_BYTES:
                raise FetchError(f"{shown}: the answer is larger than {MAX_BODY_BYTES} bytes")
            try:
                return load_json(body)
            except (ValueError, RecursionError) as exc:
                raise FetchError(f"{shown}: the answer is not JSON ({exc})") from None
        if attempt < attempts:
            sleep(wait)
            delay = min(delay * 2, 16.0)
    raise FetchError(f"{shown}: gave up after {attempts} attempts ({last})")


def fetch_pages(
    provider: ProviderName,
    base_url: str,
    key: str,
    first_day: date,
    last_day: date,
    project: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Any]:
    """Every page of the provider's daily costs over the range, following ``next_page``."""
    variable = f"TOKENMETER_{provider.upper()}_ADMIN_KEY"
    if not key:
        raise FetchError(f"--fetch needs an admin key in {variable}")
    if not key.isascii() or not key.isprintable() or " " in key:
        # A header cannot carry it, and http.client's error would print the key itself.
        raise FetchError(
            f"the admin key in {variable} has a space, a control character (a stray newline?) or non-ASCII"
        )
    try:
        parts = urllib.parse.urlsplit(base_url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # "http://[::1", "http://host:99999"
        parts, port_ok = urllib.parse.urlsplit(""), False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise FetchError(f"the {provider} admin base URL is not an http(s) URL")
    headers = request_headers(provider, key)
    pages: list[Any] = []
    page: str | None = None
    seen: set[str] = set()
    while True:
        document = get_json(request_url(provider, base_url, first_day, last_day, project, page), headers, sleep=sleep)
        if not isinstance(document, dict):
            raise FetchError(f"page {len(pages)}: expected a JSON object, got {type(document).__name__}")
        pages.append(document)
        if document.get("has_more") is not True:
            return pages
        page = document.get("next_page")
        if not isinstance(page, str) or not page or page in seen:
            raise FetchError(f"page {len(pages) - 1}: has_more is true but next_page is missing or repeats")
        if len(pages) >= MAX_PAGES:
            raise FetchError(f"more than {MAX_PAGES} pages: narrow the range with --from/--to")
        seen.add(page)
