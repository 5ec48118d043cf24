"""Fixtures of the tickerplant's tests: its configuration over a temporary journal folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from marginflow.config import TickerplantConfig
from tests.support.servers import tp_config


@pytest.fixture
def tp_cfg(tmp_path: Path) -> TickerplantConfig:
    """The embedded [tickerplant] defaults on any free port, journaling under tmp_path."""
    return tp_config(tmp_path)
