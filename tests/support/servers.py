"""Real servers for tests: a tickerplant in-process or as a subprocess (for kill -9), calc against it,
and a tickerplant core driven without sockets; each on 127.0.0.1 with an ephemeral port, and stopped."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from marginflow import auth, config, process
from marginflow.up import free_port
from tests.support import ROOT
from tickerplant.journal_writer import JournaledCore
from tickerplant.server import TickerplantServer


def system_core(cfg, **kw) -> JournaledCore:
    """A tickerplant core with its journal, opened (repaired and continued as at a start) and driven
    directly (no sockets), whose connections 1-8 are authenticated as the in-process system principal."""
    tp = JournaledCore(cfg, **kw)
    tp.open()
    for conn in range(1, 9):
        tp.core.connect(conn, auth.SYSTEM)
    return tp


def tp_config(journal: Path, **overrides):
    return config.load(
        overrides={"tickerplant": {"port": 0, "journal_dir": str(journal), **overrides}}
    ).tickerplant


@asynccontextmanager
async def running_calc(
    tp_port: int,
    journal: Path,
    access: dict | None = None,
    params: dict | None = None,
    rdb_port: int = 1,
    bus: dict | None = None,
    **calc,
):
    """calc.server.CalcService against a running tickerplant; `calc` overrides [calc] keys
    (default: any free port, margin rows after every batch, no REST port), `access` [access] keys,
    `params` [params], `bus` [bus], `rdb_port` the rdb it asks for history (default: none there)."""
    from calc.server import CalcService

    cfg = config.load(
        overrides={
            "tickerplant": {"port": tp_port, "journal_dir": str(journal)},
            "calc": {"port": 0, "publish_interval_ms": 0, "rest_port": 0, **calc},
            "rdb": {"port": rdb_port},
            "access": access or {},
            "params": params or {},
            "bus": bus or {},
        }
    )
    service = CalcService(cfg)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def running_tp_and_calc(journal: Path, params: dict | None = None, **calc):
    """A tickerplant on `journal` and calc against it (running_tp + running_calc; `calc` overrides
    [calc] keys, `params` [params] keys): (tickerplant server, its URL, calc service)."""
    async with (
        running_tp(journal) as (srv, url),
        running_calc(srv.port, journal, params=params, **calc) as service,
    ):
        yield srv, url, service


@asynccontextmanager
async def running_tp(journal: Path, **overrides):
    srv = TickerplantServer(tp_config(journal, **overrides))
    await srv.start()
    try:
        yield srv, f"ws://127.0.0.1:{srv.port}"
    finally:
        await srv.stop()


class TpProcess:
    """`marginflow tp` as a real subprocess (for kill -9 tests)."""

    def __init__(self, journal: Path, *extra: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "marginflow.cli", "tp", "--port", "0", "--journal", str(journal), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self.port = 0
        for line in self.proc.stdout:  # type: ignore[union-attr]
            m = re.search(r"ready wss?://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        if not self.port:
            raise RuntimeError(f"tickerplant did not start (exit {self.proc.poll()})")
        self.url = f"ws://127.0.0.1:{self.port}"

    def kill(self, sig: int = 9) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll `cond` every 20 ms until it holds; AssertionError naming `what` after `timeout` s."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def recv_type(ws, kind: str, timeout: float = 10.0) -> dict:
    """The next JSON message of type `kind` on a websocket (others skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == kind:
                return msg


@contextmanager
def rdb_process(hdb: Path, date: str = "2024-01-15") -> Iterator[tuple[subprocess.Popen, str]]:
    """`marginflow rdb` as a real subprocess on an ephemeral port, not subscribed to a tickerplant:
    (the process, its ws:// URL); on leaving, SIGTERM and the exit code must be 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginflow.cli", "rdb", "--port", "0", "--hdb", str(hdb),
         "--date", date, "--no-subscribe"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("rdb ready ws://127.0.0.1:"), (
            proc.stderr.read() if proc.poll() is not None else line  # type: ignore[union-attr]
        )
        yield proc, line.split()[2]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@asynccontextmanager
async def running_system(root: Path, tp: dict | None = None, **calc):
    """A tickerplant, an rdb following it and calc with its REST API on free ports, under `root`:
    (tickerplant server, rdb, calc service); `tp` overrides [tickerplant] keys, `calc` [calc] keys."""
    from rdb.server import Rdb
    from rdb.subscription import follow

    async with running_tp(root / "journal", **(tp or {})) as (srv, url):
        rdb = Rdb(config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(root / "hdb")}}).rdb)
        rdb.recovery.begin("starting")
        await rdb.start()
        following = asyncio.create_task(follow(rdb, url))
        try:
            rest = {"rest_port": free_port()} | calc
            async with running_calc(srv.port, root / "journal", rdb_port=rdb.port, **rest) as service:
                yield srv, rdb, service
        finally:
            await process.cancel_and_wait(following)
            await rdb.stop()


class Background:
    """An event loop in a thread of its own holding an async context manager open (servers shared by a
    test module's tests, which talk to them over sockets from their own loops): `value` is what it
    yielded; `close()` leaves it and stops the loop."""

    def __init__(self, manager, timeout: float = 120.0):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.manager = manager
        self.value = self._run(manager.__aenter__(), timeout)

    def _run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, coro, timeout: float = 60.0):
        """Run a coroutine on the background loop and return its result."""
        return self._run(coro, timeout)

    def close(self) -> None:
        try:
            self._run(self.manager.__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@asynccontextmanager
async def _started(server):
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


class InThread(Background):
    """A server (anything with async start / stop) running on its own event loop in a thread, for
    clients that block (PyKX, the console, websockets' sync client): `call(fn, *args)` runs fn on
    that loop; `stop()` stops the server and the loop."""

    def __init__(self, server) -> None:
        self.server = server
        super().__init__(_started(server), timeout=30.0)

    def call(self, fn, *args):  # type: ignore[override]
        async def go():
            return fn(*args)

        return self._run(go(), 10.0)

    def stop(self) -> None:
        self.close()
