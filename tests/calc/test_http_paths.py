"""calc's HTTP side: odd URL paths get a 404, never a 500 and a traceback, and never a file outside
calc/static/."""

from __future__ import annotations

from marginflow.up import http_get
from tests.support.servers import running_calc, running_tp

ODD_PATHS = [
    "/" + "a" * 5000,  # was a 500: OSError "File name too long" from the static lookup
    "/" + "a/" * 2500,
    "/x?" + "a" * 5000,
    "/../config.toml",
    "/..%2f..%2fconfig.toml",
    "/%2e%2e/%2e%2e/config.toml",
    "/static/../../config.toml",
    "/%00",
]


def test_odd_paths_are_404_and_the_dashboard_still_serves(tmp_path, run):
    async def body():
        async with (
            running_tp(tmp_path) as (_, url),
            running_calc(int(url.rsplit(":", 1)[1]), tmp_path) as calc,
        ):
            for path in ODD_PATHS:
                status, body = await http_get("127.0.0.1", calc.port, path)
                assert status == 404, (path[:40], status, body[:200])
            status, body = await http_get("127.0.0.1", calc.port, "/")
            assert status == 200 and b"<html" in body.lower()

    run(body())
