"""Shared test helpers: a real tickerplant on 127.0.0.1 with an ephemeral port, in-process or as a
subprocess, and small row builders."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from marginflow import config
from tickerplant.server import TickerplantServer

ROOT = Path(__file__).resolve().parent.parent


def tp_config(journal: Path, **overrides):
    return config.load(overrides={"tickerplant": {"port": 0, "journal_dir": str(journal), **overrides}}).tickerplant


@asynccontextmanager
async def running_calc(tp_port: int, journal: Path, **calc):
    """calc.server.CalcService against a running tickerplant; `calc` overrides [calc] keys
    (default: any free port, margin rows after every batch)."""
    from calc.server import CalcService

    cfg = config.load(overrides={"tickerplant": {"port": tp_port, "journal_dir": str(journal)},
                                 "calc": {"port": 0, "publish_interval_ms": 0, **calc}, "rdb": {"port": 1}})
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
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
        )
        self.port = 0
        for line in self.proc.stdout:  # type: ignore[union-attr]
            m = re.search(r"ready ws://[\d.]+:(\d+)", line)
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
