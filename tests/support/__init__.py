"""Helpers the tests of every layer share (plain modules, imported; fixtures live in each folder's conftest):
servers started on 127.0.0.1 with ephemeral ports and stopped, tokens, row builders, `marginflow up`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRICES_FILE = ROOT / "data" / "prices" / "sp500_20_daily_1990_2022.csv.gz"  # the real daily closes
SPAN_FILE = ROOT / "data" / "span" / "takasbank_2016-05-17.spn"  # the real Takasbank file the SPAN tests use


async def until(predicate, timeout: float = 30.0) -> bool:
    """Poll `predicate` every 50 ms until it holds (True) or `timeout` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return False
