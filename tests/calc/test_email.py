"""Alert emails: plain-text mail through a real SMTP server on 127.0.0.1 (aiosmtpd, started here), the
webhooks' retries and bounded queue (calc/delivery.py), and end to end from calc's alert rules and its data
alerts ([calc.data_alerts]: a tick held outside its price band, a refused parameter file); a dead SMTP
server is retried, then given up and counted, and margin rows keep flowing."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket

import pytest
from aiosmtpd.controller import Controller

from calc import mail
from calc.delivery import Routes
from calc.history import load_prices
from marginflow import config
from tests.support import PRICES_FILE, until
from tests.support.rows import ALERT_ROW, fills
from tests.support.servers import running_calc, running_tp
from tickerplant.client import Publisher

ROW = ALERT_ROW


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Inbox:
    """An SMTP server on 127.0.0.1 that refuses the first `fail` messages (451), then keeps them."""

    def __init__(self, fail: int = 0):
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []
        self.attempts = 0
        inbox = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                inbox.attempts += 1
                if inbox.attempts <= fail:
                    return "451 try again later"
                msg = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
                inbox.messages.append((list(envelope.rcpt_tos), msg))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def inbox():
    box = Inbox(fail=1)
    yield box
    box.close()


def email_config(port: int, **kw) -> config.EmailConfig:
    return config.EmailConfig(host="127.0.0.1", port=port, timeout_s=2.0, sender="calc@test.example", **kw)


def test_message_has_the_alert_text_plain():
    msg = mail.message(ROW, "calc@test.example", ["desk@test.example"], "[mf]")
    assert msg["Subject"] == "[mf] raised utilisation-90 TECH01"
    assert msg.get_content_type() == "text/plain"
    text = msg.get_content()
    assert text.startswith("TECH01: utilisation 93.0% above 90.0%\n")
    for line in ("account: TECH01", "rule: utilisation-90", "state: raised", "value: 0.93", "threshold: 0.9"):
        assert line in text
    # a name with a line break cannot add a header
    assert "\n" not in mail.subject(dict(ROW, account="X\nBcc: evil@x"), "[mf]")


def test_retried_then_delivered_to_the_smtp_server(inbox):
    async def body():
        sender = mail.MailSender(email_config(inbox.port), retries=2, queue_size=10, backoff_s=0.01)
        assert sender.submit(["desk@test.example", "risk@test.example"], ROW)
        task = asyncio.create_task(sender.run())
        assert await until(lambda: sender.sent + sender.failed > 0, 10)
        task.cancel()
        return sender

    sender = asyncio.run(body())
    assert sender.sent == 1 and sender.failed == 0 and sender.attempts == 2 and inbox.attempts == 2
    ((to, msg),) = inbox.messages
    assert to == ["desk@test.example", "risk@test.example"]
    assert msg["From"] == "calc@test.example" and "raised utilisation-90 TECH01" in msg["Subject"]
    assert "TECH01: utilisation 93.0% above 90.0%" in msg.get_content()


def test_dead_server_retries_then_gives_up_and_a_full_queue_drops():
    async def body():
        sender = mail.MailSender(email_config(free_port()), retries=2, queue_size=2, backoff_s=0.01)
        dead = await sender.deliver(("desk@test.example",), mail.message(ROW, "a@b", ["desk@test.example"]))
        accepted = [sender.submit(["desk@test.example"], ROW) for _ in range(4)]
        return dead, accepted, sender

    dead, accepted, sender = asyncio.run(body())
    assert not dead and sender.attempts == 3 and sender.failed == 1 and sender.sent == 0
    assert "ConnectionRefusedError" in sender.last_error
    assert accepted == [True, True, False, False] and sender.dropped == 2


def test_login_needs_a_password_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MF_TEST_SMTP_PW", raising=False)
    cfg = email_config(25, username="calc", password_env="MF_TEST_SMTP_PW")
    with pytest.raises(
        SystemExit, match=r"calc.email.username 'calc' needs a password: set \$MF_TEST_SMTP_PW"
    ):
        mail.password(cfg)
    monkeypatch.setenv("MF_TEST_SMTP_PW", "s3cret")
    assert mail.password(cfg) == "s3cret"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.delenv("MF_TEST_SMTP_PW")
    assert mail.password(email_config(25, username="calc", password_file=str(secret))) == "from-file"


def test_a_rule_with_email_needs_an_smtp_server_and_plain_addresses():
    rule = {"name": "u", "kind": "utilisation", "threshold": 0.9, "email": ["desk@test.example"]}
    with pytest.raises(SystemExit, match=r"calc.alerts\['u'\]: email needs an SMTP server"):
        config.load(overrides={"calc": {"alerts": [rule]}})
    with pytest.raises(SystemExit, match="email must list addresses"):
        config.load(overrides={"calc": {"alerts": [dict(rule, email=["Desk <desk@x>, evil@y"])]}})


UTIL_RULE = {"name": "utilisation-90", "kind": "utilisation", "threshold": 0.9, "clear": 0.85}


async def big_fill(url: str, calc) -> None:
    """A big buy pushes MACRO06 over 90% utilisation (as in test_webhook)."""
    async with Publisher(url) as pub:
        big = fills(1, 0, accounts=("MACRO06",))
        big.update(sym=["AAPL"], side=["B"], qty=[40000.0], price=[130.0])
        await pub.upd("fill", big)
        await pub.wait_acked()


def test_calc_mails_the_alerts_of_a_rule_with_email(tmp_path, run, inbox):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            rules = [dict(UTIL_RULE, email=["desk@test.example"])]
            smtp = {"host": "127.0.0.1", "port": inbox.port, "timeout_s": 2.0}
            async with running_calc(srv.port, tmp_path, alerts=rules, email=smtp) as calc:
                await big_fill(url, calc)
                assert await until(lambda: inbox.messages, 15), "no email"
                # (the server has the message before the sender has its reply and counts it sent)
                await until(lambda: calc.mail.counts()["sent"] >= 1, 5)
                return list(calc.today.alerts), calc.mail.counts()

    alerts, counts = run(body())
    (to, msg), *_ = inbox.messages
    mine = [a for a in alerts if a["rule"] == "utilisation-90"]
    assert to == ["desk@test.example"] and mine[0]["account"] == "MACRO06"
    assert msg["Subject"] == "[marginflow] raised utilisation-90 MACRO06"
    assert mine[0]["message"] in msg.get_content()  # the alert's own text
    assert counts["sent"] >= 1 and counts["failed"] == 0


def test_dead_smtp_server_is_given_up_and_margin_goes_on(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            rules = [dict(UTIL_RULE, email=["desk@test.example"])]
            smtp = {"host": "127.0.0.1", "port": free_port(), "timeout_s": 1.0}
            async with running_calc(srv.port, tmp_path, alerts=rules, email=smtp, webhook_retries=2) as calc:
                await big_fill(url, calc)
                assert await until(lambda: calc.mail.failed == 1, 15)
                rows = calc.published_rows
                async with Publisher(url) as pub:  # margin still flows
                    await pub.upd("fill", fills(6, 10))
                    await pub.wait_acked()
                assert await until(lambda: calc.published_rows > rows, 10)
                return calc.mail

    sender = run(body())
    assert sender.attempts == 3 and sender.failed == 1 and sender.sent == 0


def test_routes_send_a_rule_alert_by_its_rule_and_a_data_alert_by_calc_data_alerts():
    rules = [
        config.AlertRuleConfig(
            name="utilisation-90", kind="utilisation", threshold=0.9, email=["desk@x.example"]
        ),
        config.AlertRuleConfig(name="quiet", kind="level", threshold=1.0),
    ]
    data = config.DataAlertsConfig(webhook="http://127.0.0.1:9/hook", email=["ops@x.example"])
    routes = Routes(rules, data)
    band = dict(ROW, account="*", rule="price-band:AAPL", kind="data")
    assert routes.email(ROW) == ["desk@x.example"] and routes.webhook(ROW) == ""
    assert routes.email(band) == ["ops@x.example"] and routes.webhook(band) == "http://127.0.0.1:9/hook"
    assert routes.email(dict(ROW, rule="quiet", kind="level")) == []
    assert routes.has_emails and routes.has_webhooks
    nothing = Routes(rules[1:], config.DataAlertsConfig())
    assert not nothing.has_emails and not nothing.has_webhooks and nothing.email(band) == []
    with pytest.raises(SystemExit, match=r"calc.data_alerts: email needs an SMTP server"):
        config.load(overrides={"calc": {"data_alerts": {"email": ["ops@x.example"]}}})
    with pytest.raises(SystemExit, match=r"calc.data_alerts: webhook must be an http"):
        config.load(overrides={"calc": {"data_alerts": {"webhook": "ftp://x"}}})


def test_calc_mails_data_alerts_to_calc_data_alerts_and_rule_alerts_to_their_rule(tmp_path, run, inbox):
    """A tick 100x the last price (held by the price band) and a malformed parameter file dropped into the
    watched folder raise data alerts: each is mailed, with its text, to [calc.data_alerts]' addresses only;
    the rule's alert to the rule's."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    watched = {"folders": {"span": str(folder)}, "poll_interval_s": 0.2, "settle_s": 0.1}
    aapl = float(load_prices(PRICES_FILE).latest["AAPL"])

    async def body():
        async with running_tp(tmp_path) as (srv, url):
            smtp = {"host": "127.0.0.1", "port": inbox.port, "timeout_s": 2.0}
            async with running_calc(
                srv.port,
                tmp_path,
                params={"watch": watched},
                params_dir=str(tmp_path / "params"),
                alerts=[dict(UTIL_RULE, email=["desk@test.example"])],
                data_alerts={"email": ["ops@test.example"]},
                email=smtp,
            ) as calc:
                assert await until(lambda: calc.live, 30)
                async with Publisher(url) as pub:
                    await pub.upd("trade", {"sym": ["AAPL"], "price": [aapl * 100], "size": [10]})
                    await pub.wait_acked()
                (folder / "bad.spn").write_bytes(b"<not a span file")
                await big_fill(url, calc)
                assert await until(lambda: len(inbox.messages) >= 3, 20), inbox.messages
                return list(calc.today.alerts)

    alerts = run(body())
    mailed = {msg["Subject"]: (to, msg.get_content()) for to, msg in inbox.messages}
    for rule, to in (
        ("price-band:AAPL *", ["ops@test.example"]),
        ("params:span:bad.spn *", ["ops@test.example"]),
        ("utilisation-90 MACRO06", ["desk@test.example"]),
    ):
        alert = next(a for a in alerts if f"{a['rule']} {a['account']}" == rule)
        got_to, text = mailed[f"[marginflow] raised {rule}"]
        assert got_to == to and alert["message"] in text, (rule, text)
