"""Publish a JSON-lines file of usage events through the library (``tokenmeter produce``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from producers.producer import ProducerStats, UsageProducer
from schemas.events import InvalidEvent


@dataclass
class ProduceReport:
    accepted: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)
    stats: ProducerStats | None = None


def produce_lines(
    lines: Iterable[str],
    producer: UsageProducer,
    on_line: Callable[[int, int], None] = lambda _n, _bytes: None,
) -> ProduceReport:
    """Record each non-blank line; collect (line number, reason) for every rejected one."""
    report = ProduceReport()
    for number, line in enumerate(lines, 1):
        on_line(number, len(line))
        text = line.strip()
        if not text:
            continue
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            report.rejected.append((number, f"malformed JSON: {exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(data, dict):
            report.rejected.append((number, f"expected a JSON object, got {type(data).__name__}"))
            continue
        if "event_id" not in data:
            # A file may be re-sent; a generated id would count its events again.
            report.rejected.append((number, "event_id: Field required (files must carry their own ids)"))
            continue
        try:
            producer.record(data)
        except InvalidEvent as exc:
            report.rejected.append((number, exc.reason))
            continue
        report.accepted += 1
    return report
