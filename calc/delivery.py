"""Alert delivery beyond the socket, one machinery for every transport (webhooks: calc/webhook.py, email:
calc/mail.py): a bounded queue, a delivery task that sends each item from a thread (a blocking HTTP POST
or SMTP session never stalls calc's loop), retries with a doubling backoff, and counters.

    sender = DeliveryQueue("webhook", send, retries=3, queue_size=1000, backoff_s=0.2)
    sender.put(target, body, what)   # never blocks: a full queue drops the item and counts it
    await sender.run()               # the delivery task (calc/server.py starts it)

`send(target, body)` is a plain blocking function returning "" when delivered, else the reason. `Routes`
says where an alert row goes: a rule's alert to its rule's webhook / email, a data alert ([calc.data_alerts]).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marginflow.config import AlertRuleConfig, DataAlertsConfig
from schemas.tables import DATA_KIND

log = logging.getLogger("marginflow.delivery")


def describe(row: Mapping[str, Any]) -> str:
    """An alert row in a log line: rule/state for account."""
    return f"alert {row.get('rule')}/{row.get('state')} for {row.get('account')}"


class Routes:
    """Where each alert row goes beyond the socket and the alert table: a rule's alert to its rule's
    `webhook` / `email`, a data alert (kind "data": price band, refused parameter file; raised by no rule) to
    [calc.data_alerts]'s."""

    def __init__(self, rules: Sequence[AlertRuleConfig], data: DataAlertsConfig):
        self.webhooks = {r.name: r.webhook for r in rules if r.webhook}
        self.emails = {r.name: list(r.email) for r in rules if r.email}
        self.data = data

    @property
    def has_webhooks(self) -> bool:
        return bool(self.webhooks or self.data.webhook)

    @property
    def has_emails(self) -> bool:
        return bool(self.emails or self.data.email)

    def webhook(self, row: Mapping[str, Any]) -> str:
        """The URL the row is POSTed to ("" = none)."""
        return self.data.webhook if row.get("kind") == DATA_KIND else self.webhooks.get(row["rule"], "")

    def email(self, row: Mapping[str, Any]) -> list[str]:
        """The addresses the row is mailed to ([] = none)."""
        return list(self.data.email) if row.get("kind") == DATA_KIND else self.emails.get(row["rule"], [])


class DeliveryQueue:
    """Items (target, body) waiting for `send`; sent, failed (gave up after the retries) and dropped
    (queue full) are counted, `attempts` counts every try."""

    def __init__(
        self,
        name: str,
        send: Callable[[Any, Any], str],
        retries: int = 3,
        queue_size: int = 1000,
        backoff_s: float = 0.2,
    ):
        self.name = name
        self.send = send
        self.retries = retries
        self.backoff_s = backoff_s
        self.queue: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue(maxsize=queue_size)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self.attempts = 0
        self.last_error = ""

    def put(self, target: Any, body: Any, what: str) -> bool:
        """Queue one item; False (dropped, counted) when the queue is full."""
        try:
            self.queue.put_nowait((target, body))
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("%s queue full (%d): %s dropped", self.name, self.queue.maxsize, what)
            return False

    async def deliver(self, target: Any, body: Any) -> bool:
        why = ""
        for attempt in range(self.retries + 1):
            self.attempts += 1
            why = await asyncio.to_thread(self.send, target, body)
            if not why:
                self.sent += 1
                return True
            if attempt < self.retries:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        self.last_error = why
        log.error("%s %s: gave up after %d attempts: %s", self.name, target, self.retries + 1, why)
        return False

    async def run(self) -> None:
        while True:
            target, body = await self.queue.get()
            await self.deliver(target, body)

    def counts(self) -> dict[str, int]:
        """For /health: sent, failed (gave up) and dropped (queue full)."""
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}
