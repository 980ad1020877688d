"""Retrying a sink call while its service is down: exponential back-off, logged, optionally cut short."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("tokenmeter.sinks")


def with_backoff(
    call: Callable[[], T],
    retry_on: tuple[type[BaseException], ...],
    what: str,
    *,
    on_failure: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    first_delay: float = 0.2,
    max_delay: float = 5.0,
    retry_if: Callable[[BaseException], bool] | None = None,
    note: Callable[[str], None] | None = None,
    describe: Callable[[BaseException], str] | None = None,
) -> T:
    """``call()`` until it succeeds; ``on_failure`` runs after each failure (e.g. drop a broken
    connection); ``should_stop`` makes the failure final (the caller replays the work later).
    ``retry_if`` narrows ``retry_on`` (anything else is raised at once); ``note`` hears each failure,
    so supervision can say what a stage is waiting for; ``describe`` words a failure (default: "``what``
    unavailable (…)")."""
    delay = first_delay
    while True:
        try:
            return call()
        except retry_on as exc:
            if retry_if is not None and not retry_if(exc):
                raise
            message = describe(exc) if describe is not None else f"{what} unavailable ({str(exc).strip()[:200]})"
            log.warning("%s; retrying in %.1fs", message, delay)
            if note is not None:
                note(message)
            if on_failure is not None:
                on_failure()
            if should_stop is not None and should_stop():
                raise
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
