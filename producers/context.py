"""Per-request attribution, set once so that call sites that record usage stay one line.

    with usage_context(tenant_id="acme", user_id="u-42", feature="search"):
        ...
        producer.record(from_openai_chat(response))   # tenant, user and feature filled in

Contexts nest (inner values win, tags merge) and follow asyncio tasks and threads started with
``contextvars.copy_context``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any

ATTRIBUTION_FIELDS = frozenset(
    {"tenant_id", "user_id", "feature", "environment", "trace_id", "session_id", "team_id", "request_id", "tags"}
    | {"api_key_id"}  # the id of the caller's API key (budgets per key), never the key itself
)
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_attribution: ContextVar[Mapping[str, Any]] = ContextVar("tokenmeter_attribution", default=_EMPTY)


@contextmanager
def usage_context(**fields: Any) -> Iterator[Mapping[str, Any]]:
    unknown = set(fields) - ATTRIBUTION_FIELDS
    if unknown:
        raise TypeError(f"usage_context does not take {', '.join(sorted(unknown))}")
    current = _attribution.get()
    merged = {**current, **{k: v for k, v in fields.items() if v is not None}}
    if "tags" in fields and "tags" in current:
        merged["tags"] = {**current["tags"], **fields["tags"]}
    token = _attribution.set(MappingProxyType(merged))
    try:
        yield merged
    finally:
        _attribution.reset(token)


def current_attribution() -> Mapping[str, Any]:
    return _attribution.get()


def apply_attribution(event: dict[str, Any]) -> dict[str, Any]:
    """Fill the event's missing attribution fields from the current context (explicit fields win)."""
    context = _attribution.get()
    if not context:
        return event
    filled = {**{k: v for k, v in context.items() if k != "tags"}, **event}
    if "tags" in context:
        filled["tags"] = {**context["tags"], **event.get("tags", {})}
    return filled
