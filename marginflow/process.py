"""Plumbing every marginflow process shares: one log format (websockets' per-connection chatter
off), waiting for SIGINT / SIGTERM (so each server's `run` reads: start, wait, stop), cancelling
tasks for good, busy polling, writing a websocket frame without a queue hop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from websockets.protocol import State


def setup_logging(process: str, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s {process} %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)


async def until_stopped() -> None:
    """Return when the process receives SIGINT (Ctrl-C) or SIGTERM (`marginflow up` stopping it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


class Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def serve_until_stopped(
    service: Service, ready_line: Callable[[], str], ready: asyncio.Event | None = None
) -> None:
    """A server process's `run`: start the service, freeze what start-up allocated, set `ready` and print
    the ready line (made after start, when the bound port is known), wait for SIGINT / SIGTERM, stop."""
    await service.start()
    freeze_startup_objects()
    if ready is not None:
        ready.set()
    print(ready_line(), flush=True)
    await until_stopped()
    await service.stop()


async def cancel_and_wait(*tasks: asyncio.Task | None, again_s: float = 0.25) -> None:
    """Cancel the tasks and wait until each has ended, cancelling again every `again_s` s a task is
    still running. (Python 3.11's `asyncio.wait_for` loses a cancel that arrives as its awaited
    future completes, and nats-py's requests go through it: a task cancelled once could go on, e.g.
    into `next_msg`, and `stop` would wait for it forever.)"""
    given = [t for t in tasks if t is not None]
    pending = set(given)
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=again_s)
    for t in given:  # (an error it ended with is its own business: taken, as gather(return_exceptions))
        if not t.cancelled():
            t.exception()


def cpu_priority() -> dict[str, Any]:
    """The calling thread's CPU scheduling, for a process's status: {"policy": "other" | "batch" | "idle" |
    "fifo" | "rr", "nice": n} (what `chrt -p` and `ps -o ni` show); {} where the OS does not tell."""
    try:
        policy, nice = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return {}
    names = ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
    known = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in names if hasattr(os, n)}
    return {"policy": known.get(policy, str(policy)), "nice": nice}


def freeze_startup_objects() -> None:
    """Once a server has started: move everything allocated so far (modules, numba and Arrow objects,
    loaded state) out of the garbage collector's view, so a full collection walks only what came after
    and does not stall a message for milliseconds."""
    gc.collect()
    gc.freeze()


async def busy_poll(window_s: float, activity: asyncio.Event) -> None:
    """Keep the event loop polling its sockets (epoll with no timeout) for `window_s` after each
    `activity.set()`, then sleep until the next one. A process that sleeps between messages wakes on
    a cold core (on this VM a 1 ms sleep makes the next message's Python ~2x slower); polling keeps
    it hot while messages flow, at the cost of a busy core, and costs nothing when idle."""
    while True:
        await activity.wait()
        activity.clear()
        until = time.perf_counter() + window_s
        while time.perf_counter() < until:
            await asyncio.sleep(0)
            if activity.is_set():
                activity.clear()
                until = time.perf_counter() + window_s


def write_now(ws: Any, frame: bytes | str) -> bool:
    """Write a frame (bytes: binary, str: text) to a websockets connection's transport now if it is
    open and not paused by flow control (what websockets' own `send` does before awaiting a drain that
    then returns at once); False leaves it to the caller's queue. The caller checks that nothing is
    queued before it, so frames keep their order. Uses websockets' protocol object and `send_data`."""
    if ws.protocol.state is not State.OPEN or ws.paused:
        return False
    if isinstance(frame, str):
        ws.protocol.send_text(frame.encode())
    else:
        ws.protocol.send_binary(frame)
    ws.send_data()
    return True
