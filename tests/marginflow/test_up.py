"""`marginflow up`'s supervision with real child processes: each child restarts in its own task (a
child in a long backoff never holds back another's restart), the backoff is capped and resets after a
healthy stretch, and a child that stays unhealthy is restarted with a line saying why."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time

import pytest

from marginflow import config
from marginflow.up import Child, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASHER = [sys.executable, "-c", "import sys; sys.exit(3)"]


def supervisor(tmp_path, children, **up) -> Supervisor:
    cfg = config.load(overrides={"up": {"health_interval_s": 0.1, "unhealthy_restart_s": 0.6, **up}})
    return Supervisor(cfg, {}, children)


async def until(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_restarts_are_independent_and_backoff_is_capped(tmp_path, run, capsys):
    crash = Child("crash", [], tmp_path / "crash.log", command=CRASHER)
    sleeper = Child("sleep", [], tmp_path / "sleep.log", command=SLEEPER)
    sup = supervisor(tmp_path, [sleeper, crash], max_backoff_s=2.0)

    async def body():
        await sup.start_all()
        stop = asyncio.Event()
        watch = asyncio.create_task(sup.watch(stop))
        try:
            await until(lambda: len(crash.delays) >= 3, 20)  # crash is now waiting 2 s between restarts
            await until(lambda: crash.proc.returncode is not None, 5)  # ... and is in that wait
            old = sleeper.proc.pid
            os.kill(old, signal.SIGKILL)
            took = await until(lambda: sleeper.proc.pid != old and sleeper.proc.returncode is None, 10)
            await until(lambda: len(crash.delays) >= 5, 20)
            return took, list(crash.delays), list(sleeper.delays)
        finally:
            stop.set()
            await watch
            await sup.stop_all()

    took, crash_delays, sleeper_delays = run(body())
    assert sleeper_delays == [0.5] and took < 1.5, took  # not behind crash's 2 s backoff
    assert crash_delays[:5] == [0.5, 1.0, 2.0, 2.0, 2.0]  # doubling, capped
    out = capsys.readouterr().out
    assert "crash died (exit 3)" in out and "sleep died (exit -9)" in out


def test_backoff_resets_after_a_healthy_stretch(tmp_path, run):
    c = Child("sleep", [], tmp_path / "s.log", command=SLEEPER)
    sup = supervisor(tmp_path, [c], healthy_reset_s=1.0)

    async def body():
        await sup.start_all()
        stop = asyncio.Event()
        watch = asyncio.create_task(sup.watch(stop))
        try:
            for expected in (1, 2):  # two quick deaths: the backoff grows
                pid = c.proc.pid
                os.kill(pid, signal.SIGKILL)
                await until(lambda p=pid: c.proc.pid != p and c.proc.returncode is None, 10)
                assert len(c.delays) == expected
            await asyncio.sleep(1.3)  # healthy for longer than healthy_reset_s
            pid = c.proc.pid
            os.kill(pid, signal.SIGKILL)
            await until(lambda: c.proc.pid != pid and c.proc.returncode is None, 10)
            return list(c.delays)
        finally:
            stop.set()
            await watch
            await sup.stop_all()

    assert run(body()) == [0.5, 1.0, 0.5]


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_a_child_that_stays_unhealthy_is_restarted_with_the_reason(tmp_path, run, capsys):
    flag = tmp_path / "stalled"

    async def health() -> str:
        return "/health 503: output stalled (test)" if flag.exists() else ""

    sick = Child("calc", [], tmp_path / "calc.log", health, command=SLEEPER)
    other = Child("sleep", [], tmp_path / "sleep.log", command=SLEEPER)
    sup = supervisor(tmp_path, [sick, other])

    async def body():
        await sup.start_all()
        stop = asyncio.Event()
        watch = asyncio.create_task(sup.watch(stop))
        try:
            pid, other_pid = sick.proc.pid, other.proc.pid
            flag.touch()
            await asyncio.sleep(0.3)
            assert sick.proc.pid == pid  # unhealthy, but not yet for unhealthy_restart_s
            flag.unlink()  # it recovers: the clock starts again
            await asyncio.sleep(0.5)
            flag.touch()
            took = await until(lambda: sick.proc.pid != pid, 10)
            flag.unlink()
            await until(lambda: sick.healthy_at > 0, 10)
            return took, other.proc.pid == other_pid
        finally:
            stop.set()
            await watch
            await sup.stop_all()

    took, other_untouched = run(body())
    assert 0.5 < took < 3 and other_untouched
    out = capsys.readouterr().out
    assert re.search(r"calc unhealthy for \d+ s \(/health 503: output stalled \(test\)\)", out), out
    assert "calc restarted" in out


def test_stop_ends_the_watch_even_when_a_health_check_loses_the_cancel(tmp_path, run):
    """Python 3.11's `asyncio.wait_for` (which websockets' `connect` and our checks go through) loses a
    cancel that arrives as its awaited future completes: the check returns as if nothing happened. `up`
    then waited for that keeper forever after Ctrl-C / SIGTERM and printed nothing (seen under `pytest -n
    2` on busy cores). Here the check swallows the first cancel it gets; stopping must still end the
    watch in a few seconds and stop the child."""
    swallowed: list[float] = []

    async def health() -> str:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(time.monotonic())  # the cancel is lost, as in wait_for's race
        return ""

    c = Child("calc", [], tmp_path / "calc.log", health, command=SLEEPER)
    sup = supervisor(tmp_path, [c], health_interval_s=0.05)

    async def body():
        await sup.start_all()
        stop = asyncio.Event()
        watch = asyncio.create_task(sup.watch(stop))
        await asyncio.sleep(0.3)
        for _ in range(200):  # stop while a check is running, so the cancel lands inside it
            await asyncio.sleep(0.003)
            if c.proc is not None and sup._keepers and _in_check(sup._keepers[0]):
                break
        stop.set()
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(watch)
            ended = True
        except TimeoutError:
            ended = False
        finally:
            await sup.stop_all()
        return ended

    assert run(body()) and swallowed, "the watch did not end after stop (keeper lost its cancel)"
    assert c.proc.returncode is not None


def _in_check(task: asyncio.Task) -> bool:
    """Whether the keeper task is suspended inside the child's health check now."""
    return any(f.f_code.co_name == "health" for f in _frames(task))


def _frames(task: asyncio.Task):
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            yield frame
        coro = getattr(coro, "cr_await", None)
