"""Alert emails over SMTP (stdlib smtplib / email): each raised or cleared alert of a rule with
`email = [...]` is mailed, plain text, through [calc.email]'s server, by the shared delivery queue
(calc/delivery.py: a thread per send, the webhooks' retries, backoff and bounded queue, counted drops).
Named mail.py so that it does not shadow the standard library's `email` package.

    sender = MailSender(calc_config.email, retries=3, queue_size=1000)
    sender.submit(["desk@example.com"], alert_row)   # never blocks
    await sender.run()                               # the delivery task (calc/server.py starts it)

The password comes from the environment variable `password_env` or the file `password_file`, never
from a config file in the repo.
"""

from __future__ import annotations

import os
import smtplib
import ssl
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from calc.delivery import DeliveryQueue, describe
from marginflow.config import EmailConfig


def _number(x: Any) -> str:
    return f"{x:,.6g}" if isinstance(x, float | int) else str(x)


def subject(row: Mapping[str, Any], prefix: str = "") -> str:
    """One line: prefix, state, rule, account (line breaks in names cannot reach the header)."""
    text = f"{prefix} {row.get('state', '')} {row.get('rule', '')} {row.get('account', '')}".strip()
    return " ".join(text.split())[:200]


def body(row: Mapping[str, Any]) -> str:
    """The alert's text, then its fields one per line."""
    fields = ("account", "rule", "kind", "state", "value", "threshold", "last_seq")
    lines = [str(row.get("message", "")), ""]
    lines += [f"{k}: {_number(row[k])}" for k in fields if k in row]
    return "\n".join(lines) + "\n"


def message(row: Mapping[str, Any], sender: str, recipients: Sequence[str], prefix: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = subject(row, prefix)
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = make_msgid(domain=sender.partition("@")[2] or None)
    msg.set_content(body(row))
    return msg


def password(cfg: EmailConfig) -> str:
    """The SMTP password: $password_env, else the first line of password_file; "" when no login."""
    if not cfg.username:
        return ""
    if cfg.password_env and os.environ.get(cfg.password_env):
        return os.environ[cfg.password_env]
    if cfg.password_file:
        try:
            return Path(cfg.password_file).read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise SystemExit(
                f"config: calc.email.password_file {cfg.password_file}: cannot read: {e}"
            ) from None
    raise SystemExit(
        f"config: calc.email.username {cfg.username!r} needs a password: set ${cfg.password_env} "
        f"or calc.email.password_file"
    )


class SmtpTransport:
    """One SMTP session per message (a relay that closed an idle connection never loses one)."""

    def __init__(self, cfg: EmailConfig):
        self.cfg = cfg
        self.password = password(cfg)

    def send(self, recipients: Sequence[str], msg: EmailMessage) -> str:
        """'' when the server accepted the message for every recipient, else the reason."""
        c = self.cfg
        try:
            if c.tls == "tls":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                    c.host, c.port, timeout=c.timeout_s, context=ssl.create_default_context()
                )
            else:
                smtp = smtplib.SMTP(c.host, c.port, timeout=c.timeout_s)
            with smtp:
                if c.tls == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if c.username:
                    smtp.login(c.username, self.password)
                refused = smtp.send_message(msg, from_addr=c.sender, to_addrs=list(recipients))
            return f"refused recipients: {sorted(refused)}" if refused else ""
        except (smtplib.SMTPException, OSError, TimeoutError) as e:
            return f"{type(e).__name__}: {e}"


class MailSender(DeliveryQueue):
    def __init__(self, cfg: EmailConfig, retries: int = 3, queue_size: int = 1000, backoff_s: float = 0.2):
        self.cfg = cfg
        self.transport = SmtpTransport(cfg)
        super().__init__("email", self.transport.send, retries, queue_size, backoff_s)

    def submit(self, recipients: Sequence[str], row: Mapping[str, Any]) -> bool:
        msg = message(row, self.cfg.sender, recipients, self.cfg.subject_prefix)
        return self.put(tuple(recipients), msg, describe(row))
