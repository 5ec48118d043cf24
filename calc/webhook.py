"""Alert webhooks: each alert row is POSTed as JSON (with a Slack-compatible `text`) to the webhook of its
rule, through the shared delivery queue (calc/delivery.py: retries, backoff, bounded queue, counters), so a
dead endpoint never slows margin.

    sender = WebhookSender(retries=3, timeout_s=2.0, queue_size=1000)
    sender.submit(url, alert_row)     # never blocks: a full queue drops the alert and counts it
    await sender.run()                # the delivery task (calc/server.py starts it)
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import msgspec

from calc.delivery import DeliveryQueue, describe


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


class WebhookSender(DeliveryQueue):
    def __init__(
        self, retries: int = 3, timeout_s: float = 2.0, queue_size: int = 1000, backoff_s: float = 0.2
    ):
        super().__init__(
            "webhook", lambda url, body: post(url, body, self.timeout_s), retries, queue_size, backoff_s
        )
        self.timeout_s = timeout_s

    def submit(self, url: str, row: Mapping[str, Any]) -> bool:
        return self.put(url, payload(row), describe(row))
