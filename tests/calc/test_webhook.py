"""Alert webhooks: Slack-compatible JSON POSTed to a real HTTP server on 127.0.0.1, retried after a
failure, bounded queue (a full queue drops and counts), and end to end from calc's alert rules."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from calc.webhook import WebhookSender, payload
from marginflow import config
from tests.support.rows import ALERT_ROW, fills
from tests.support.servers import running_calc, running_tp
from tickerplant.client import Publisher


class Hook:
    """An HTTP endpoint that fails the first `fail` POSTs with 500, then records and accepts them."""

    def __init__(self, fail: int = 0):
        self.received: list[dict] = []
        self.attempts = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                hook.attempts += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.attempts <= fail:
                    self.send_response(500)
                else:
                    hook.received.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


ROW = ALERT_ROW


def test_retry_after_failure_then_delivered_with_slack_text():
    hook = Hook(fail=2)
    try:

        async def body():
            sender = WebhookSender(retries=3, timeout_s=2, queue_size=10, backoff_s=0.01)
            ok = await sender.deliver(hook.url, payload(ROW))
            return ok, sender

        ok, sender = asyncio.run(body())
    finally:
        hook.close()
    assert ok and hook.attempts == 3 and sender.sent == 1 and sender.failed == 0
    (got,) = hook.received
    assert got["alert"] == ROW
    assert "TECH01" in got["text"] and "utilisation-90" in got["text"] and "raised" in got["text"]


def test_unreachable_endpoint_gives_up_and_full_queue_drops():
    async def body():
        sender = WebhookSender(retries=1, timeout_s=0.5, queue_size=2, backoff_s=0.01)
        dead = await sender.deliver("http://127.0.0.1:9/nothing-listens", b"{}")
        accepted = [sender.submit("http://127.0.0.1:9/x", ROW) for _ in range(5)]
        return dead, accepted, sender

    dead, accepted, sender = asyncio.run(body())
    assert not dead and sender.failed == 1 and sender.sent == 0
    assert accepted == [True, True, False, False, False] and sender.dropped == 3


def test_calc_posts_the_alerts_of_a_rule_with_a_webhook(tmp_path, run):
    hook = Hook()
    try:

        async def body():
            async with running_tp(tmp_path) as (srv, url):
                base = config.load().calc
                rules = [
                    {
                        **{
                            k: getattr(r, k)
                            for k in (
                                "name",
                                "kind",
                                "threshold",
                                "clear",
                                "hysteresis",
                                "window_minutes",
                                "accounts",
                            )
                        },
                        "webhook": hook.url,
                    }
                    for r in base.alerts
                    if r.name == "utilisation-90"
                ]
                async with running_calc(srv.port, tmp_path, alerts=rules) as calc:
                    async with Publisher(url) as pub:  # a big buy pushes MACRO06 over 90% utilisation
                        big = fills(1, 0, accounts=("MACRO06",))
                        big.update(sym=["AAPL"], side=["B"], qty=[40000.0], price=[130.0])
                        await pub.upd("fill", big)
                        await pub.wait_acked()
                    deadline = time.monotonic() + 10
                    while not hook.received and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                return list(calc.today.alerts)

        alerts = run(body())
    finally:
        hook.close()
    posted = [r["alert"] for r in hook.received]
    assert posted, "no webhook call"
    assert all(a["rule"] == "utilisation-90" for a in posted)
    assert posted[0]["account"] == "MACRO06" and posted[0]["state"] == "raised"
    mine = [a for a in alerts if a["rule"] == "utilisation-90"]
    assert [a["account"] for a in posted] == [
        a["account"] for a in mine
    ]  # every alert of the rule, only those
    assert pytest.approx(posted[0]["value"]) == mine[0]["value"]
