"""Fixtures of calc's tests: the engine on the embedded configuration (the demo's accounts, positions
and price history), fresh for each test."""

from __future__ import annotations

import pytest

from calc.engine import MarginEngine
from marginflow import config


@pytest.fixture
def demo_engine() -> MarginEngine:
    """A MarginEngine built from config.toml's [calc] defaults, before any event."""
    return MarginEngine.from_config(config.load().calc)
