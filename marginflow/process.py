"""Plumbing every marginflow process shares: one log format (websockets' per-connection chatter
off) and waiting for SIGINT / SIGTERM, so each server's `run` reads: start, wait, stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal


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
