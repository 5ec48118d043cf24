"""Process logging: one format for every marginflow process, websockets' per-connection chatter off.

Call `setup("tp")` once at process start.
"""

from __future__ import annotations

import logging


def setup(process: str, level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=f"%(asctime)s {process} %(levelname)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
