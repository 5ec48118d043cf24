"""calc's websocket protocol as plain functions (calc/api.py): the live fan-out sends each client only
the rows of accounts its desk may see and it follows, and clients that follow the same rows in the
same format share one encoding."""

from __future__ import annotations

import json

import msgspec

from calc.api import Api
from marginflow import auth, config
from schemas.calc import AlertUpdate, MarginUpdate

ACCOUNTS = ["TECH01", "DIV02", "NRG03", "MN05"]


def margin_rows(accounts: list[str]) -> dict[str, list]:
    return {
        "account": accounts,
        "margin": [1000.0 + i for i in range(len(accounts))],
        "last_seq": [7] * len(accounts),
    }


def subscribed(api: Api, token: str, binary: bool, accounts: list[str] | None = None):
    client, replies = api.connect(binary, token)
    assert type(replies[0]).__name__ == "AuthReply"
    client.subscribed = frozenset(accounts or [])
    return client


def decoded(frame: bytes | str) -> dict:
    return msgspec.msgpack.decode(frame) if isinstance(frame, bytes) else json.loads(frame)


def test_fan_out_filters_per_desk_and_shares_encodings():
    access = config.load().access
    api = Api(auth.Gate(access, frozenset(), role="subscriber"), ACCOUNTS)
    risk, tech_token, income_token = (
        auth.local_token(f"desk:{d}", access) for d in ("risk", "equity-tech", "equity-income")
    )
    risk_json = subscribed(api, risk, False)
    risk_json_2 = subscribed(api, risk, False)
    risk_msgpack = subscribed(api, risk, True)
    income = subscribed(api, income_token, False)  # DIV02 and MN05 only
    income_mn = subscribed(api, income_token, False, ["MN05"])
    tech = subscribed(api, tech_token, False, ["TECH01"])
    not_subscribed, _ = api.connect(False, risk)

    rows = margin_rows(["TECH01", "DIV02", "NRG03"])
    alerts = {"account": ["NRG03"], "rule": ["level"], "state": ["raised"]}
    out: dict[int, list] = {}  # per client, its frames in the order calc sends them
    for update, cols in ((MarginUpdate, rows), (AlertUpdate, alerts)):
        for cid, frame in api.fan_out(update, cols).items():
            out.setdefault(cid, []).append(frame)

    assert not_subscribed.id not in out
    assert income_mn.id not in out  # follows MN05 only: nothing moved
    seen = {
        cid: [(m["type"], [r["account"] for r in m["rows"]]) for m in map(decoded, frames)]
        for cid, frames in out.items()
    }
    everything = [("margin", ["TECH01", "DIV02", "NRG03"]), ("alert", ["NRG03"])]
    assert seen[risk_json.id] == seen[risk_json_2.id] == seen[risk_msgpack.id] == everything
    assert seen[income.id] == [("margin", ["DIV02"])]
    assert seen[tech.id] == [("margin", ["TECH01"])]
    # one encoding per (format, rows): the two JSON risk clients get the very same frames
    assert all(a is b for a, b in zip(out[risk_json.id], out[risk_json_2.id], strict=True))
    assert isinstance(out[risk_msgpack.id][0], bytes) and isinstance(out[risk_json.id][0], str)
    assert out[income.id][0] is not out[risk_json.id][0]
    assert decoded(out[income.id][0])["rows"][0]["margin"] == 1001.0


def test_data_alerts_reach_every_subscribed_desk():
    """An alert row of account "*" (a suspect price: calc.alerts.ALL_ACCOUNTS) goes to every subscribed
    client whatever its desk; an account alert only to the desks that may see that account."""
    access = config.load().access
    api = Api(auth.Gate(access, frozenset(), role="subscriber"), ACCOUNTS)
    tech = subscribed(api, auth.local_token("desk:equity-tech", access), False)
    income = subscribed(api, auth.local_token("desk:equity-income", access), False, ["DIV02"])
    api.connect(False, auth.local_token("desk:risk", access))  # authenticated, not subscribed: nothing
    frames = api.fan_out(
        AlertUpdate, {"account": ["*", "TECH01", "DIV02"], "rule": ["price-band:AAPL", "r", "r"]}
    )
    assert set(frames) == {tech.id, income.id}
    assert [r["account"] for r in decoded(frames[tech.id])["rows"]] == ["*", "TECH01"]
    assert [r["account"] for r in decoded(frames[income.id])["rows"]] == ["*", "DIV02"]
