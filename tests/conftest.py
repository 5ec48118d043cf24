"""What every test shares: its own credentials folder (never the project's var/), and `run` for
coroutines. Helpers are in tests/support/; each folder's conftest.py holds that layer's fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path

import pytest

from calc.warm import cache_lock
from marginflow import config

# The tests' credentials live in a folder of their own (every process the tests start inherits this through
# $MARGINFLOW_OVERRIDES), never in the project's var/: `make demo` after `make test` is still a first start.
_CREDENTIALS = Path(tempfile.mkdtemp(prefix="marginflow-test-credentials-"))
os.environ[config.OVERRIDES_ENV] = json.dumps(
    config._merge(
        json.loads(os.environ.get(config.OVERRIDES_ENV) or "{}"),
        {
            "access": {
                "credentials_file": str(_CREDENTIALS / "credentials.json"),
                "client_credentials_file": str(_CREDENTIALS / "client-credentials.json"),
            },
            # no fixed kdb+ IPC ports (tests that want one ask for any free port: kdb_port = -1)
            "tickerplant": {"kdb_port": 0},
            "rdb": {"kdb_port": 0},
        },
    )
)


def pytest_configure(config: pytest.Config) -> None:
    """Numba's cache writes under the warm-up's file lock: the two xdist workers of `make test` may compile
    signatures the warm-up did not (e.g. test_options' own) of one function at once."""
    stack = contextlib.ExitStack()
    stack.enter_context(cache_lock())
    config.add_cleanup(stack.close)


@pytest.fixture
def run():
    """Run a coroutine to completion (tests are plain functions; each gets its own loop)."""
    return lambda coro, timeout=120: asyncio.run(asyncio.wait_for(coro, timeout))


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
