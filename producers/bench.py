"""Measure what `record()` adds to the caller, against the real broker (used by `tokenmeter bench`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from deploy.settings import Settings
from producers.producer import UsageProducer


@dataclass(frozen=True)
class LatencyFigures:
    rate_per_s: int | None
    calls: int
    p50_us: float
    p99_us: float
    max_us: float


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1000


def record_latency(settings: Settings, calls: int, rate_per_s: int | None, topic: str | None = None) -> LatencyFigures:
    """Time each record() call at a steady rate (None: back to back, the worst case for GIL sharing)."""
    producer = UsageProducer(settings, topic=topic)
    event = {"tenant_id": "bench", "provider": "openai", "model": "gpt-4o", "input_tokens": 1200,
             "cache_read_tokens": 1024, "output_tokens": 300, "feature": "search", "user_id": "u-1"}  # fmt: skip
    gap = int(1e9 / rate_per_s) if rate_per_s else 0
    samples: list[int] = []
    next_at = time.perf_counter_ns()
    try:
        for _ in range(calls):
            if gap:
                pause = next_at - time.perf_counter_ns()
                if pause > 0:
                    time.sleep(pause / 1e9)  # sleep, as a service waiting on I/O would, not spin
            started = time.perf_counter_ns()
            producer.record(event)
            samples.append(time.perf_counter_ns() - started)
            next_at = started + gap
    finally:
        producer.close(timeout=30)
    samples.sort()
    return LatencyFigures(rate_per_s, calls, _percentile(samples, 0.5), _percentile(samples, 0.99), samples[-1] / 1000)
