"""The protocol logic of calc's websocket API, no sockets: tokens -> desks -> visible accounts,
subscriptions, snapshots, what-ifs, and the fan-out of margin and alert rows to each client.

A token never receives another desk's rows: every path (subscribe, snapshot, what-if, history,
live fan-out) filters through `Client.may_see`. A connection authenticates in its handshake (an
Authorization: Bearer header, programs) or with a first `auth` message (the dashboard); failed tokens
are throttled per address (marginflow/auth.py Gate), and a connection that failed
`access.max_auth_failures` times is closed (`Client.close_reason`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from calc.alerts import ALL_ACCOUNTS
from marginflow import auth
from schemas import calc as api

JSON = msgspec.json.Encoder()
MSGPACK = msgspec.msgpack.Encoder()
JSON_IN = msgspec.json.Decoder(api.Request)
MSGPACK_IN = msgspec.msgpack.Decoder(api.Request)


@dataclass
class Client:
    id: int
    binary: bool  # msgpack (programs) or JSON (browsers)
    desk: str = ""
    allowed: frozenset[str] | None = None  # None: not authenticated; "*" in it: every account
    subscribed: frozenset[str] | None = None  # None: not subscribed; empty: all it may see
    wants: set[str] = field(default_factory=set)
    peer: str = ""  # the remote address (throttling counts failures per address)
    failures: int = 0  # failed authentications on this connection
    close_reason: str = ""  # set: the server closes the connection (code 1008) after sending the replies

    def may_see(self, account: str) -> bool:
        return self.allowed is not None and ("*" in self.allowed or account in self.allowed)

    def follows(self, account: str) -> bool:
        """Whether a row of `account` goes to this client: its subscription's accounts it may see, and rows
        of account "*" (calc.alerts.ALL_ACCOUNTS: data alerts about an instrument) to every subscriber."""
        if self.subscribed is None or self.allowed is None:
            return False
        if account == ALL_ACCOUNTS:
            return True
        if not self.may_see(account):
            return False
        return not self.subscribed or account in self.subscribed


def rows_as_dicts(cols: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    names = list(cols)
    n = len(cols[names[0]]) if names else 0
    return [{k: cols[k][i] for k in names} for i in range(n)]


class Api:
    def __init__(self, gate: auth.Gate, accounts: Sequence[str]):
        self.gate = gate  # credentials, throttle, the role needed (subscriber)
        self.accounts = list(accounts)
        self.clients: dict[int, Client] = {}
        self.ids = itertools.count(1)
        self.refused = 0

    # ---- connections ---------------------------------------------------------------------------------
    def connect(
        self, binary: bool, token: str | None = None, principal: auth.Principal | None = None, peer: str = ""
    ) -> tuple[Client, list[api.ApiMsg]]:
        """A new connection, authenticated already by its handshake (`principal`), or with `token`, or
        not yet."""
        client = Client(next(self.ids), binary, peer=peer)
        self.clients[client.id] = client
        if principal is not None:
            return client, self.admit(client, principal)
        return client, (self.authenticate(client, token) if token else [])

    def disconnect(self, client: Client) -> None:
        self.clients.pop(client.id, None)

    def authenticate(self, client: Client, token: str) -> list[api.ApiMsg]:
        if client.failures >= self.gate.throttle.max_failures:  # (closed by then; never let it in)
            return [api.ApiError(reason="too many failed authentications on this connection")]
        outcome = self.gate.token(client.peer, token)
        if isinstance(outcome, auth.Refusal):
            self.refused += 1
            if outcome.status in (401, 429):
                client.failures += 1
                if outcome.status == 429 or client.failures >= self.gate.throttle.max_failures:
                    client.close_reason = "too many failed authentications"
            return [api.ApiError(reason=outcome.reason)]
        return self.admit(client, outcome)

    def admit(self, client: Client, who: auth.Principal) -> list[api.ApiMsg]:
        if not who.has("subscriber"):
            self.refused += 1
            return [api.ApiError(reason=auth.not_permitted(who, "subscriber", "calc's API") or "")]
        client.desk = who.desk
        client.allowed = frozenset(["*"]) if who.accounts is None else who.accounts
        return [api.AuthReply(desk=who.desk, accounts=self.visible(client))]

    def visible(self, client: Client) -> list[str]:
        return [a for a in self.accounts if client.may_see(a)]

    # ---- requests ------------------------------------------------------------------------------------
    def decode(self, client: Client, data: bytes | str) -> api.ApiMsg | api.ApiError:
        try:
            return (MSGPACK_IN if isinstance(data, bytes) else JSON_IN).decode(data)
        except msgspec.DecodeError as e:
            return api.ApiError(reason=f"bad request: {e}")

    def encode(self, client: Client, msg: api.ApiMsg) -> bytes | str:
        return MSGPACK.encode(msg) if client.binary else JSON.encode(msg).decode()

    def check_accounts(self, client: Client, accounts: Sequence[str]) -> api.ApiError | None:
        if client.allowed is None:
            return api.ApiError(reason="not authenticated: send {type: auth, token} first")
        hidden = [a for a in accounts if not client.may_see(a)]
        if hidden:
            self.refused += 1
            return api.ApiError(reason=f"not permitted for desk {client.desk!r}: {', '.join(hidden)}")
        return None

    def handle(self, client: Client, msg: api.ApiMsg, engine: Any) -> list[api.ApiMsg]:
        """Answer one request; `engine` is the MarginEngine (read-only here)."""
        if isinstance(msg, api.ApiError):
            return [msg]
        if isinstance(msg, api.Auth):
            return self.authenticate(client, msg.token)
        if isinstance(msg, api.Subscribe | api.SnapshotRequest):
            err = self.check_accounts(client, msg.accounts)
            if err:
                return [err]
            if isinstance(msg, api.Subscribe):
                client.subscribed = frozenset(msg.accounts)
            wanted = set(msg.accounts)
            now = time.time_ns()
            rows = [
                dict(r, time=now)
                for r in rows_as_dicts(engine.snapshot())
                if client.may_see(r["account"]) and (not wanted or r["account"] in wanted)
            ]
            return [api.Snapshot(rows=rows)]
        if isinstance(msg, api.WhatIf):
            err = self.check_accounts(client, [msg.account])
            if err:
                err.id = msg.id
                return [err]
            try:  # typed trades (schemas.calc.Trade) straight through
                return [
                    api.WhatIfReply(result=engine.what_if(msg.account, msg.trades, msg.compare), id=msg.id)
                ]
            except Exception as e:  # the engine names the field and the reason
                return [api.ApiError(reason=str(e), id=msg.id)]
        if isinstance(msg, api.HistoryRequest):
            err = self.check_accounts(client, [msg.account])
            if err:
                err.id = msg.id
                return [err]
            return []  # answered asynchronously by the server (it asks the rdb)
        return [api.ApiError(reason=f"unsupported request {type(msg).__name__}")]

    # ---- fan-out -------------------------------------------------------------------------------------
    def fan_out(self, update: type[api.ApiMsg], cols: Mapping[str, Sequence[Any]]) -> dict[int, bytes | str]:
        """Per client, the encoded `update` message (margin or alert rows, as columns) with the rows of the
        accounts it follows. Clients that follow the same rows in the same format share one encoding (a
        hundred dashboards on every account cost one JSON encoding, not a hundred)."""
        accounts = list(cols.get("account", ()))
        rows = rows_as_dicts(cols) if accounts else []
        encoded: dict[tuple[bool, tuple[int, ...]], bytes | str] = {}
        out: dict[int, bytes | str] = {}
        for c in self.clients.values():
            if c.subscribed is None:
                continue
            mine = tuple(i for i, a in enumerate(accounts) if c.follows(a))
            if not mine:
                continue
            key = (c.binary, mine)
            if key not in encoded:
                encoded[key] = self.encode(c, update(rows=[rows[i] for i in mine]))  # type: ignore[call-arg]
            out[c.id] = encoded[key]
        return out
