"""Fixtures of the replay tests: a small demo history (`marginflow demo-history`) made once per module."""

from __future__ import annotations

import pytest

from replay import demo_history

DEMO_DAYS, DEMO_TICKS = 6, 30  # days of journals; trade ticks per instrument per day


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo history (journals and actual calls of DEMO_DAYS days), made once per module."""
    out = tmp_path_factory.mktemp("demo")
    assert demo_history.main(["--days", str(DEMO_DAYS), "--ticks", str(DEMO_TICKS), "--out", str(out)]) == 0
    return out
