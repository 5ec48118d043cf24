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
