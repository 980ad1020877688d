"""Measure what `record()` adds to the caller, against the real broker (used by `tokenmeter bench`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from deploy.settings import Settings
from producers.producer import UsageProducer


@dataclass(frozen=True)
class LatencyFigures:
    mode: str
    rate_per_s: int | None
    calls: int
    p50_us: float
    p99_us: float
    max_us: float


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * q))] / 1000


def record_latency(
    settings: Settings, calls: int, rate_per_s: int | None, *, idle: bool = False, topic: str | None = None
) -> LatencyFigures:
    """Time each record() call at a steady rate (None: back to back, the worst case for GIL sharing).

    Between calls the caller either stays busy (``idle=False``: a loaded service doing other work) or
    sleeps (``idle=True``): after a sleep on this VM even a bare ``deque.append`` has a p99 near 5 us
    and ``datetime.now()`` + ``os.urandom()`` about 25 us, so the idle figures mostly measure cold
    caches, not the library.
    """
    producer = UsageProducer(settings, topic=topic)
    event = {
        "tenant_id": "bench",
        "provider": "openai",
        "model": "gpt-4o",
        "input_tokens": 1200,
        "cache_read_tokens": 1024,
        "output_tokens": 300,
        "feature": "search",
        "user_id": "u-1",
    }
    gap = int(1e9 / rate_per_s) if rate_per_s else 0
    samples: list[int] = []
    next_at = time.perf_counter_ns()
    try:
        for _ in range(calls):
            if gap:
                pause = next_at - time.perf_counter_ns()
                if pause > 0 and idle:
                    time.sleep(pause / 1e9)  # as a service waiting on I/O would
                while pause > 0 and time.perf_counter_ns() < next_at:
                    pass  # as a service busy with other work would
            started = time.perf_counter_ns()
            producer.record(event)
            samples.append(time.perf_counter_ns() - started)
            next_at = started + gap
    finally:
        producer.close(timeout=30)
    samples.sort()
    mode = "back-to-back" if not rate_per_s else f"{'idle' if idle else 'busy'} {rate_per_s}/s"
    return LatencyFigures(
        mode, rate_per_s, calls, _percentile(samples, 0.5), _percentile(samples, 0.99), samples[-1] / 1000
    )
