"""Shared test helpers: a real tickerplant on 127.0.0.1 with an ephemeral port, in-process or as a
subprocess, calc against it, the whole system under `marginflow up`, and small row builders."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from marginflow import auth, config
from tickerplant.journal_writer import JournaledCore
from tickerplant.server import TickerplantServer

# The tests' credentials live in a folder of their own (every process the tests start inherits this through
# $MARGINFLOW_OVERRIDES), never in the project's var/: `make demo` after `make test` is still a first start.
_CREDENTIALS = Path(tempfile.mkdtemp(prefix="marginflow-test-credentials-"))
os.environ[config.OVERRIDES_ENV] = json.dumps(
    config._merge(
        json.loads(os.environ.get(config.OVERRIDES_ENV) or "{}"),
        {
            "access": {
                "credentials_file": str(_CREDENTIALS / "credentials.json"),
                "client_credentials_file": str(_CREDENTIALS / "client-credentials.json"),
            }
        },
    )
)

ROOT = Path(__file__).resolve().parent.parent


def local_token(role: str = "admin") -> str:
    """The local token of a role ("admin", "publisher", "subscriber", "query") or a demo desk ("desk:risk")."""
    return auth.local_token(role, config.current_access())


def with_token(role: str = "admin", token: str | None = None) -> dict:
    """websockets `connect` keyword arguments carrying a token (default: the local one of `role`)."""
    return {"additional_headers": {"Authorization": f"Bearer {token or local_token(role)}"}}


def desk_token(desk: str = "risk") -> dict:
    """`connect` keyword arguments for calc's API as a demo desk (its local token in the handshake)."""
    return with_token(token=local_token(f"desk:{desk}"))


async def until(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def system_core(cfg, **kw) -> JournaledCore:
    """A tickerplant core with its journal, driven directly (no sockets), whose connections 1-8 are
    authenticated as the in-process system principal (every role)."""
    tp = JournaledCore(cfg, **kw)
    for conn in range(1, 9):
        tp.core.connect(conn, auth.SYSTEM)
    return tp


def tp_config(journal: Path, **overrides):
    return config.load(
        overrides={"tickerplant": {"port": 0, "journal_dir": str(journal), **overrides}}
    ).tickerplant


@asynccontextmanager
async def running_calc(tp_port: int, journal: Path, access: dict | None = None, **calc):
    """calc.server.CalcService against a running tickerplant; `calc` overrides [calc] keys
    (default: any free port, margin rows after every batch), `access` [access] keys."""
    from calc.server import CalcService

    cfg = config.load(
        overrides={
            "tickerplant": {"port": tp_port, "journal_dir": str(journal)},
            "calc": {"port": 0, "publish_interval_ms": 0, **calc},
            "rdb": {"port": 1},
            "access": access or {},
        }
    )
    service = CalcService(cfg)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@asynccontextmanager
async def running_tp(journal: Path, **overrides):
    srv = TickerplantServer(tp_config(journal, **overrides))
    await srv.start()
    try:
        yield srv, f"ws://127.0.0.1:{srv.port}"
    finally:
        await srv.stop()


def trades(n: int, start: int = 0) -> dict[str, list]:
    syms = ["AAPL", "MSFT", "IBM", "JPM"]
    return {
        "sym": [syms[(start + i) % 4] for i in range(n)],
        "price": [100.0 + (start + i) % 97 * 0.25 for i in range(n)],
        "size": [1 + (start + i) % 13 for i in range(n)],
    }


def quotes(n: int, start: int = 0) -> dict[str, list]:
    syms = ["AAPL", "MSFT", "IBM", "JPM"]
    return {
        "sym": [syms[(start + i) % 4] for i in range(n)],
        "bid": [99.0 + (start + i) % 89 * 0.25 for i in range(n)],
        "ask": [99.5 + (start + i) % 89 * 0.25 for i in range(n)],
        "bid_size": [100] * n,
        "ask_size": [200] * n,
    }


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


@pytest.fixture
def run():
    """Run a coroutine to completion (tests are plain functions; each gets its own loop)."""
    return lambda coro, timeout=120: asyncio.run(asyncio.wait_for(coro, timeout))


class UpProcess:
    """`marginflow up --ephemeral --var VAR [extra]` as a subprocess: its printed URLs (dashboard,
    tickerplant, calc_ws), child pids and output; `stop` sends SIGTERM and returns the exit code."""

    def __init__(self, var: Path, *extra: str):
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.var = var
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "marginflow.cli", "up", "--ephemeral", "--var", str(var), *extra],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        self.pids: dict[str, int] = {}
        self.dashboard = self.tickerplant = ""
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 240  # a cold numba cache compiles calc's kernels first
        while not (self.dashboard and self.tickerplant and any("Ctrl-C" in x for x in self.output)):
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    "marginflow up did not print its URLs in time:\n" + self.report()
                ) from None
            if m := re.match(r"\s+(\w+)\s+up in .*\(pid (\d+)", line):
                self.pids[m.group(1)] = int(m.group(2))
            if m := re.search(r"dashboard\s+(https?://\S+)", line):
                self.dashboard = m.group(1)
            if m := re.search(r"tickerplant\s+(wss?://\S+)", line):
                self.tickerplant = m.group(1)
            if self.proc.poll() is not None and self.lines.empty():
                raise AssertionError("marginflow up exited:\n" + self.report())
        self.calc_ws = "ws://" + self.dashboard.split("//")[1].split("/")[0]

    def report(self) -> str:
        """`up`'s output and the end of each child's log, for a failure message."""
        tails = [
            f"--- {log.name}\n" + "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            for log in sorted((self.var / "log").glob("*.log"))
        ]
        return "".join(self.output) + "\n".join(tails)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} in time:\n" + "".join(self.output))

    def stop(self) -> int:
        """SIGTERM: `up` stops its children in order (returns its exit code once all its output is in
        `output`). If it fails to, its children are killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        if self.proc.returncode == 0:
            return 0
        for line in self.output:  # children restarted after the start have new pids
            if m := re.search(r"(\w+) restarted \(pid (\d+)\)", line):
                self.pids[m.group(1)] = int(m.group(2))
        for pid in self.pids.values():  # never leave a child behind, even if `up` itself failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode
