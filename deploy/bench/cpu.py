"""CPU time per pipeline component during a bench phase, from ``/proc`` (Linux): the worker's two stages,
Postgres, Kafka, Redis and the bench process itself. Divided by the events of the phase, it is the
capacity model's input (README "Sizing"): CPU microseconds per event for each part, whatever else the
box was doing (only these processes' own CPU time counts)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid → (parent pid, CPU ticks user+system, command line) of every process readable now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), command)
    return found


@dataclass(frozen=True)
class Stack:
    """What tells this stack's processes from others' on the box (other stacks may run beside it)."""

    worker_pid: int
    kafka_home: str  # the Kafka nodes' server.properties live under it
    postgres_port: int
    redis_port: int


def _component(pid: int, processes: dict[int, tuple[int, int, str]], stack: Stack) -> str | None:
    parent, _ticks, command = processes[pid]
    if pid == stack.worker_pid:
        return "stage2_faust"
    if parent == stack.worker_pid:
        return "stage1_meter"  # the worker's child processes (stage 1)
    if pid == os.getpid():
        return "bench_client"
    if "kafka.Kafka" in command and stack.kafka_home in command:
        return "kafka"
    if "redis-server" in command and f":{stack.redis_port}" in command:
        return "redis"
    postmaster = pid if command.split(" ", 1)[0].endswith("/postgres") else parent
    if postmaster in processes and f"-p {stack.postgres_port} " in processes[postmaster][2]:
        return "postgres"  # the server and its backends
    return None


@dataclass
class CpuMeter:
    """``start()`` then ``stop()``: CPU seconds per component in between (processes that ended in between
    are missed: the bench's processes live through the phase)."""

    stack: Stack
    _before: dict[int, tuple[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def _snapshot(self) -> dict[int, tuple[str, int]]:
        processes = _processes()
        snapshot = {}
        for pid, (_parent, ticks, _command) in processes.items():
            component = _component(pid, processes, self.stack)
            if component is not None:
                snapshot[pid] = (component, ticks)
        return snapshot

    def start(self) -> None:
        self._before = self._snapshot()

    def stop(self) -> dict[str, float]:
        for pid, (component, ticks) in self._snapshot().items():
            _, before = self._before.get(pid, (component, 0))  # a process started meanwhile: all its time
            self.seconds[component] = self.seconds.get(component, 0.0) + (ticks - before) / _CLOCK_TICKS
        return self.seconds

    def per_event_us(self, events: int) -> dict[str, float]:
        return {name: round(seconds * 1e6 / max(events, 1), 1) for name, seconds in sorted(self.seconds.items())}
