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


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """A real 3-node NATS JetStream cluster on 127.0.0.1 (ephemeral ports), for the module's tests."""
    from tests.support.nats_cluster import NatsCluster

    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), nodes=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
