"""Fixtures of the rdb's tests: an empty in-memory store for 2024-01-15 over a temporary HDB folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rdb.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty Store dated 2024-01-15 (HDB under tmp_path/hdb), flushing queued rows every 1,000."""
    s = Store(tmp_path / "hdb", date="2024-01-15", flush_rows=1000, memory_limit="1GB", threads=2)
    yield s
    s.close()
