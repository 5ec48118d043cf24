"""Alert delivery beyond the socket: each alert row is POSTed as JSON (with a Slack-compatible `text`)
to the webhook of its rule, with retries and a bounded queue, so a dead endpoint never slows margin.

    sender = WebhookSender(retries=3, timeout_s=2.0, queue_size=1000)
    sender.submit(url, alert_row)     # never blocks: a full queue drops the alert and counts it
    await sender.run()                # the delivery task (calc/server.py starts it)
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import msgspec

log = logging.getLogger("marginflow.webhook")


def payload(row: Mapping[str, Any]) -> bytes:
    """Slack-compatible body: `text` for chat tools, the whole alert row under `alert` for programs."""
    icon = ":rotating_light:" if row.get("state") == "raised" else ":white_check_mark:"
    state, rule, account = row.get("state", ""), row.get("rule", ""), row.get("account", "")
    text = f"{icon} {state} {rule} {account}: {row.get('message', '')}"
    return msgspec.json.encode({"text": text, "alert": dict(row)})


def post(url: str, body: bytes, timeout_s: float) -> str:
    """POST body; '' on a 2xx answer, else the reason."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return "" if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        return str(getattr(e, "reason", e))


class WebhookSender:
    def __init__(
        self, retries: int = 3, timeout_s: float = 2.0, queue_size: int = 1000, backoff_s: float = 0.2
    ):
        self.retries = retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(maxsize=queue_size)
        self.sent = 0
        self.failed = 0
        self.dropped = 0

    def submit(self, url: str, row: Mapping[str, Any]) -> bool:
        try:
            self.queue.put_nowait((url, payload(row)))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning(
                "webhook queue full (%d): alert %s/%s for %s dropped",
                self.queue.maxsize,
                row.get("rule"),
                row.get("state"),
                row.get("account"),
            )
            return False

    async def deliver(self, url: str, body: bytes) -> bool:
        why = ""
        for attempt in range(self.retries + 1):
            why = await asyncio.to_thread(post, url, body, self.timeout_s)
            if not why:
                self.sent += 1
                return True
            if attempt < self.retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        log.error("webhook %s: gave up after %d attempts: %s", url, self.retries + 1, why)
        return False

    async def run(self) -> None:
        while True:
            url, body = await self.queue.get()
            await self.deliver(url, body)
