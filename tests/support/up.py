"""`marginflow up` as a real subprocess for whole-system tests (browser, supervision, chaos)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support import ROOT


class UpProcess:
    """`marginflow up --ephemeral --var VAR [extra]` as a subprocess, its output read by a thread: the
    printed URLs (`dashboard`, `tickerplant`, `calc_ws`, and `urls` by process), child pids (kept current
    across restarts), when each child last restarted, and every line; `stop` sends SIGTERM and returns
    the exit code. Used by the whole-system tests and by benchmarks/chaos.py."""

    def __init__(self, var: Path, *extra: str, ready_timeout: float = 240):
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self.var = var
        self.pids: dict[str, int] = {}
        self.restarted: dict[str, float] = {}  # name -> monotonic time of its last "restarted" line
        self.urls: dict[str, str] = {}  # tickerplant / rdb / calc / dashboard -> the URL `up` printed
        self.lock = threading.Lock()
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
        try:
            self._wait_ready(ready_timeout)  # a cold numba cache compiles calc's kernels first
        except BaseException:
            self.stop()
            raise
        self.dashboard, self.tickerplant = self.urls["dashboard"], self.urls["tickerplant"]
        self.calc_ws = "ws://" + self.dashboard.split("//")[1].split("/")[0]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            with self.lock:
                self.output.append(line)
                if m := re.match(r"\s+(\w+)\s+up in .*\(pid (\d+)", line):
                    self.pids[m.group(1)] = int(m.group(2))
                if m := re.search(r"(\w+) restarted \(pid (\d+)\)", line):
                    self.pids[m.group(1)] = int(m.group(2))
                    self.restarted[m.group(1)] = now
                if m := re.match(r"\s+(tickerplant|rdb|calc|dashboard)\s+((?:wss?|https?)://\S+)", line):
                    self.urls[m.group(1)] = m.group(2)
            self.lines.put(line)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ("dashboard" in self.urls and "tickerplant" in self.urls and self._said("Ctrl-C")):
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError("marginflow up exited:\n" + self.report())
            if time.monotonic() > deadline:
                raise AssertionError("marginflow up did not print its URLs in time:\n" + self.report())
            time.sleep(0.05)

    def _said(self, text: str) -> bool:
        with self.lock:
            return any(text in x for x in self.output)

    def report(self) -> str:
        """`up`'s output and the end of each child's log, for a failure message."""
        tails = [
            f"--- {log.name}\n" + "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            for log in sorted((self.var / "log").glob("*.log"))
        ]
        with self.lock:
            return "".join(self.output) + "\n".join(tails)

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

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: `up` stops its children in order (returns its exit code once all its output is in
        `output`). If it fails to, its children are killed by pid."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        if self.proc.returncode == 0:
            return 0
        for pid in self.pids.values():  # never leave a child behind, even if `up` itself failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.proc.returncode
