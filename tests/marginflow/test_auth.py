"""Authentication and authorization on every port (marginflow/auth.py): real servers on 127.0.0.1.

Tokens in the Authorization header of the handshake (or calc's first `auth` message), roles per request
(publisher: upd, subscriber: sub and calc's API, query: the rdb, admin: end of day and param events), a
desk's token sees only its accounts, Origin allow-list on every websocket and HTTP endpoint, failed
authentications throttled, rotation without restart, TLS.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pyarrow as pa
import pytest
import websockets
from websockets.asyncio.client import connect

from marginflow import auth, config
from rdb.console import Client as RdbClient
from rdb.query import from_ipc
from rdb.server import Rdb
from rdb.subscription import follow
from schemas import rdb as rdbwire
from schemas import wire
from tests.support import ROOT
from tests.support.rows import trades
from tests.support.servers import running_calc, running_tp, tp_config
from tests.support.tokens import local_token, with_token
from tickerplant.client import FROM_TP, Publisher, Subscriber
from tickerplant.server import TickerplantServer

EVIL = "https://evil.example"


def fills(accounts: list[str], start: int = 0) -> dict[str, list]:
    n = len(accounts)
    return {
        "account": accounts,
        "sym": ["AAPL"] * n,
        "side": ["B"] * n,
        "qty": [10.0] * n,
        "price": [100.0] * n,
        "order_id": [f"O{start + i}" for i in range(n)],
        "exec_id": [f"AUTH{time.time_ns()}-{start + i}" for i in range(n)],
    }


def margins(accounts: list[str]) -> dict[str, list]:
    n = len(accounts)
    return {
        "account": accounts,
        "model": ["var"] * n,
        "margin": [1.0] * n,
        "var": [1.0] * n,
        "es": [0.0] * n,
        "stress": [0.0] * n,
        "collateral": [10.0] * n,
        "utilisation": [0.1] * n,
        "change": [0.0] * n,
        "drivers": ["[]"] * n,
        "components": ["{}"] * n,
        "last_seq": [1] * n,
        "param_id": [""] * n,
    }


def isolated_access(tmp_path: Path, **over) -> config.AccessConfig:
    """An [access] section with its own credential files (rotation tests must not touch the shared ones)."""
    base = config.load().access
    return msgspec.structs.replace(
        base,
        credentials_file=str(tmp_path / "creds.json"),
        client_credentials_file=str(tmp_path / "local.json"),
        **over,
    )


async def refused_status(url: str, **kw) -> int:
    """The HTTP status of a refused websocket handshake (0 if it was accepted)."""
    try:
        async with connect(url, open_timeout=5, **kw):
            return 0
    except websockets.InvalidStatus as e:
        return e.response.status_code


async def http_status(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}Connection: close\r\n\r\n".encode()
    )
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(data.split(b" ", 2)[1])


async def request(ws, msg: wire.Msg):
    await ws.send(wire.encode(msg))
    return FROM_TP.decode(await asyncio.wait_for(ws.recv(), 5))


# ---- the tickerplant ------------------------------------------------------------------------------------
def test_tickerplant_refuses_unauthenticated_and_wrong_roles(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            no_token = await refused_status(url)
            bad_token = await refused_status(url, **with_token(token="not-a-token"))
            date = srv.core.date
            async with (
                connect(url, **with_token("subscriber")) as sub_ws,
                connect(url, **with_token("publisher")) as pub_ws,
                connect(url, **with_token("query")) as q_ws,
            ):
                upd = wire.Upd(table="trade", cols=msgspec.Raw(wire.encode(trades(3))), id=1)
                replies = {
                    "subscriber upd": await request(sub_ws, upd),
                    "publisher sub": await request(pub_ws, wire.Sub(tables=["trade"])),
                    "publisher eod": await request(pub_ws, wire.EndOfDayRequest()),
                    "publisher param": await request(
                        pub_ws,
                        wire.Upd(
                            table="param",
                            id=2,
                            cols=msgspec.Raw(
                                wire.encode(
                                    {
                                        "kind": ["span"],
                                        "file_id": ["x"],
                                        "content_hash": ["0" * 64],
                                        "source": ["x"],
                                    }
                                )
                            ),
                        ),
                    ),
                    "query upd_arrow": await request(q_ws, wire.UpdArrow(table="trade", id=3, ipc=b"")),
                }
                status = await request(q_ws, wire.StatusRequest())  # any authenticated connection
                await asyncio.sleep(0.05)
            srv.send(srv.tp.flush())
            rows, bad, date_after = dict(srv.core.rows), dict(srv.core.bad), srv.core.date
            async with Publisher(url, token=local_token("admin")) as admin:
                await admin.send_raw(wire.encode(wire.EndOfDayRequest()))  # admin: to the real next date
                await asyncio.sleep(0.1)
                rolled = srv.core.date
                await admin.send_raw(wire.encode(wire.EndOfDayRequest()))  # a second would pass the real date
                await asyncio.sleep(0.2)
                again = admin.errors[0] if admin.errors else None
            return (
                no_token,
                bad_token,
                replies,
                status,
                rows,
                bad,
                date,
                date_after,
                rolled,
                again,
                srv.core.date,
            )

    no_token, bad_token, replies, status, rows, bad, date, date_after, rolled, again, final = run(body())
    assert no_token == 401 and bad_token == 401
    for what, reply in replies.items():
        assert isinstance(reply, wire.Error) and reply.reason.startswith("not permitted:"), (what, reply)
    assert "publisher needed for upd trade" in replies["subscriber upd"].reason
    assert "subscriber needed for sub" in replies["publisher sub"].reason
    assert "admin needed for end_of_day_request" in replies["publisher eod"].reason
    assert "admin needed for upd param" in replies["publisher param"].reason
    assert replies["subscriber upd"].id == 1 and replies["subscriber upd"].table == "trade"
    assert isinstance(status, wire.Status)
    assert bad == {"unauthorized": 5} and sum(rows.values()) == 0 and date_after == date
    assert rolled > date
    assert isinstance(again, wire.Error) and "real next date" in again.reason and final == rolled


def test_desk_restricted_sub_gets_only_its_accounts(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            tech = with_token(token=local_token("desk:equity-tech"))
            async with connect(url, max_size=None, **tech) as ws:
                other = await request(ws, wire.Sub(tables=["fill", "margin"], keys=["DIV02"]))
                reply = await request(ws, wire.Sub(tables=["fill", "margin", "trade"]))
                async with Publisher(url) as pub:
                    await pub.upd("fill", fills(["TECH01", "DIV02", "TECH01", "MN05"]))
                    await pub.upd("margin", margins(["DIV02", "TECH01", "MN05"]))
                    await pub.upd("trade", trades(4))
                    await pub.wait_acked()
                    assert not pub.errors, pub.errors
                seen: dict[str, list] = {}
                async with asyncio.timeout(5):
                    while len(seen) < 3:
                        msg = FROM_TP.decode(await ws.recv())
                        for b in msg.batches:
                            rb = pa.ipc.read_record_batch(
                                pa.py_buffer(b.ipc), wire.deserialize_schema(reply.schemas[b.table])
                            )
                            seen.setdefault(b.table, []).extend(
                                rb.column("sym" if b.table == "trade" else "account").to_pylist()
                            )
            return other, seen

    other, seen = run(body())
    assert isinstance(other, wire.Error) and "DIV02" in other.reason and "equity-tech" in other.reason
    assert seen["fill"] == ["TECH01", "TECH01"]  # the desk's own accounts only
    assert seen["margin"] == ["TECH01"]
    assert len(seen["trade"]) == 4  # market data is not account-keyed: all of it


# ---- the rdb --------------------------------------------------------------------------------------------
def test_rdb_refuses_queries_without_a_query_token(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url):
            rdb = Rdb(
                config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb")}}).rdb,
                date=srv.core.date,
            )
            await rdb.start()
            ready = asyncio.Event()
            following = asyncio.create_task(follow(rdb, url, ready))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                async with Publisher(url) as pub:
                    await pub.upd("fill", fills(["TECH01", "DIV02"]))
                    await pub.wait_acked()
                await asyncio.sleep(0.3)
                rurl = f"ws://127.0.0.1:{rdb.port}"
                statuses = [
                    await refused_status(rurl),
                    await refused_status(rurl, **with_token("subscriber")),
                    await refused_status(rurl, **with_token("publisher")),
                ]
                sql = "select distinct account from fill order by 1"
                full = await asyncio.to_thread(lambda: RdbClient(rurl).query(sql, "sql"))
                desk = await asyncio.to_thread(
                    lambda: RdbClient(rurl, token=local_token("desk:equity-tech")).query(sql, "sql")
                )
            finally:
                following.cancel()
                await rdb.stop()
            return statuses, full, desk

    statuses, full, desk = run(body())
    assert statuses == [401, 403, 403]
    assert isinstance(full, rdbwire.QueryResult) and full.rows == 2
    # a desk's token never reads another desk's rows: refused, or only its own accounts
    assert isinstance(desk, wire.Error) or desk.rows <= 1


# ---- calc -----------------------------------------------------------------------------------------------
def test_calc_refuses_no_token_and_a_token_in_the_url(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, _), running_calc(srv.port, tmp_path) as calc:
            base = f"ws://127.0.0.1:{calc.port}/ws"
            risk = local_token("desk:risk")
            url_token = await refused_status(f"{base}?token={risk}")
            page_token = await http_status(calc.port, f"/?token={risk}")
            publisher_only = await refused_status(base, **with_token("publisher"))
            async with connect(base) as ws:  # no token: connected, but nothing answered before `auth`
                await ws.send(json.dumps({"type": "snapshot_request"}))
                unauth = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "auth", "token": risk}))
                hello = json.loads(await ws.recv())
            return url_token, page_token, publisher_only, unauth, hello

    url_token, page_token, publisher_only, unauth, hello = run(body())
    assert url_token == 400 and page_token == 400
    assert publisher_only == 403
    assert unauth["type"] == "error" and "not authenticated" in unauth["reason"]
    assert hello["type"] == "auth_reply" and hello["desk"] == "risk"


def test_foreign_origin_refused_on_every_port(tmp_path, run):
    async def body():
        async with running_tp(tmp_path) as (srv, url), running_calc(srv.port, tmp_path) as calc:
            rdb = Rdb(config.load(overrides={"rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb")}}).rdb)
            await rdb.start()
            try:
                own = f"http://127.0.0.1:{calc.port}"
                ports = {
                    "tp": (url, with_token("subscriber")),
                    "rdb": (f"ws://127.0.0.1:{rdb.port}", with_token("query")),
                    "calc": (f"ws://127.0.0.1:{calc.port}/ws", with_token(token=local_token("desk:risk"))),
                }
                out = {}
                for name, (u, kw) in ports.items():
                    out[name] = (await refused_status(u, origin=EVIL, **kw), await refused_status(u, **kw))
                for path in ("/", "/health", "/app.js"):
                    out[path] = (
                        await http_status(calc.port, path, {"Origin": EVIL}),
                        await http_status(calc.port, path),
                        await http_status(calc.port, path, {"Origin": own}),
                    )
                out["calc own"] = await refused_status(ports["calc"][0], origin=own, **ports["calc"][1])
                tp_own = sorted(srv.gate.origins)[0]  # calc's configured address
                out["tp own"] = await refused_status(url, origin=tp_own, **with_token("subscriber"))
            finally:
                await rdb.stop()
            return out

    out = run(body())
    for name in ("tp", "rdb", "calc"):
        assert out[name] == (403, 0), name
    for path in ("/", "/health", "/app.js"):
        assert out[path] == (403, 200, 200), path
    assert out["calc own"] == 0 and out["tp own"] == 0


def test_origins_default_to_calcs_own_address():
    access = config.load().access
    assert auth.allowed_origins(access, "127.0.0.1", 5012) == {
        "http://127.0.0.1:5012",
        "http://localhost:5012",
        "http://[::1]:5012",
    }
    assert auth.allowed_origins(access, "10.1.2.3", 443) == {"http://10.1.2.3:443"}
    custom = msgspec.structs.replace(access, allowed_origins=["https://risk.example/"])
    assert auth.allowed_origins(custom, "127.0.0.1", 5012) == {"https://risk.example"}
    assert auth.origin_allowed(None, frozenset()) and not auth.origin_allowed(
        "null", frozenset({"http://a:1"})
    )


# ---- throttling -----------------------------------------------------------------------------------------
def test_guessing_is_throttled_and_the_connection_closed(tmp_path, run):
    """The issue measured ~4,900 guesses/s on one connection, then a valid token worked on it: now a
    connection gets max_auth_failures (3) guesses, then is closed; the address is blocked for a while,
    valid token or not."""

    async def body():
        async with running_tp(tmp_path) as (srv, url), running_calc(srv.port, tmp_path) as calc:
            base = f"ws://127.0.0.1:{calc.port}/ws"
            risk = local_token("desk:risk")
            answers, code = [], None
            t0 = time.perf_counter()
            async with connect(base) as ws:
                for i in range(200):
                    try:
                        await ws.send(json.dumps({"type": "auth", "token": f"guess-{i}"}))
                    except websockets.ConnectionClosed:
                        break
                try:
                    await ws.send(json.dumps({"type": "auth", "token": risk}))  # the right one, too late
                    async for frame in ws:
                        answers.append(json.loads(frame))
                except websockets.ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                code = code or (ws.close_rcvd.code if ws.close_rcvd else None)
            elapsed = time.perf_counter() - t0
            blocked_ws = await refused_status(base, **with_token(token=risk))  # a new connection, valid token
            blocked_bare = await refused_status(base)  # (to send an auth message): refused before any look-up
            # the tickerplant: one handshake per guess
            tp_statuses = [await refused_status(url, **with_token(token=f"guess-{i}")) for i in range(8)]
            tp_valid = await refused_status(url, **with_token("subscriber"))
            return (
                answers,
                code,
                elapsed,
                blocked_ws,
                blocked_bare,
                tp_statuses,
                tp_valid,
                calc.gate.throttle.refused,
            )

    answers, code, elapsed, blocked_ws, blocked_bare, tp_statuses, tp_valid, refused = run(body())
    assert [a["reason"] for a in answers] == ["invalid token"] * 3, answers  # a handful, not thousands
    assert not any(a["type"] == "auth_reply" for a in answers)
    assert code == 1008 and elapsed < 5
    assert blocked_ws == 429 and blocked_bare == 429
    assert tp_statuses[:3] == [401] * 3 and set(tp_statuses[3:]) == {429}
    assert tp_valid == 429  # blocked for the back-off, whatever the token
    assert refused >= 2


def test_throttle_backs_off_exponentially_and_forgets():
    now = [0.0]
    t = auth.Throttle(max_failures=3, window_s=60, backoff_s=2, backoff_max_s=10, clock=lambda: now[0])
    assert not t.failure("a") and not t.failure("a") and t.failure("a")
    assert t.blocked("a") == 2 and t.blocked("b") == 0
    now[0] = 2.5
    assert t.blocked("a") == 0
    t.failure("a"), t.failure("a"), t.failure("a")
    assert t.blocked("a") == pytest.approx(4)  # doubled
    for _ in range(3):  # each time the block ends, three more failures: 8, then capped at 10
        now[0] += t.blocked("a") + 0.1
        for _ in range(3):
            t.failure("a")
    assert t.blocked("a") == pytest.approx(10)  # capped
    now[0] += 100  # quiet: failures outside the window do not add up, the back-off level decays
    t.failure("a"), t.failure("a")
    now[0] += 61
    assert not t.failure("a") and t.blocked("a") == 0


# ---- credentials: local tokens, rotation -----------------------------------------------------------------
def test_local_tokens_are_created_once_by_racing_processes(tmp_path):
    code = (
        "import json, sys; from marginflow import auth, config; "
        "a = config.load(overrides={'access': {'credentials_file': sys.argv[1], "
        "'client_credentials_file': sys.argv[2]}})"
        ".access; print(json.dumps(auth.ensure_local(a)[0]))"
    )
    creds, local = tmp_path / "var" / "creds.json", tmp_path / "var" / "local.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(creds), str(local)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        for _ in range(6)
    ]
    outs = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    assert all(o == outs[0] for o in outs) and set(outs[0]) >= {
        "admin",
        "publisher",
        "subscriber",
        "query",
        "desk:risk",
        "desk:equity-tech",
    }
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600 and stat.S_IMODE(local.stat().st_mode) == 0o600
    stored = json.loads(creds.read_text())
    assert all(outs[0][k] not in creds.read_text() for k in outs[0])  # hashes only
    assert {c["name"] for c in stored} >= {"local-admin", "desk-equity-income"}
    income = next(c for c in stored if c["name"] == "desk-equity-income")
    assert income["accounts"] == ["DIV02", "MN05"] and income["token_sha256"] == auth.token_hash(
        outs[0]["desk:equity-income"]
    )
    creds.unlink()  # a deleted credentials file: the local tokens' hashes come back (same tokens)
    a = config.load(
        overrides={"access": {"credentials_file": str(creds), "client_credentials_file": str(local)}}
    ).access
    assert auth.ensure_local(a) == (outs[0], False)
    assert auth.CredentialStore(creds).authenticate(outs[0]["publisher"]).roles == {"publisher"}
    config.load()
    text = (ROOT / "config.toml").read_text()  # no plaintext token in the repository's config
    assert "demo-risk" not in text and re.search(r"^\s*(tokens?)\s*=", text, re.M) is None


def test_rotation_and_revocation_take_effect_without_restart(tmp_path, run):
    access = isolated_access(tmp_path)

    async def body():
        srv = TickerplantServer(tp_config(tmp_path / "journal"), access=access)
        await srv.start()
        url = f"ws://127.0.0.1:{srv.port}"
        try:
            token = auth.create(access, "ops-feed", ["publisher"])
            first = await refused_status(url, **with_token(token=token))
            auth.revoke(access, "ops-feed")
            revoked = await refused_status(url, **with_token(token=token))
            token2 = auth.create(access, "ops-feed", ["publisher"])
            rotated = auth.rotate(access, "ops-feed")
            old = await refused_status(url, **with_token(token=token2))
            async with Publisher(url, token=rotated) as pub:
                await pub.upd("trade", trades(2))
                seq = await pub.wait_acked()
        finally:
            await srv.stop()
        return first, revoked, old, seq

    first, revoked, old, seq = run(body())
    assert (first, revoked, old) == (0, 401, 401) and seq == 2
    listing = subprocess.run(
        [sys.executable, "-m", "marginflow.cli", "tokens", "list"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        env=dict(
            os.environ,
            MARGINFLOW_OVERRIDES=json.dumps(
                {
                    "access": {
                        "credentials_file": access.credentials_file,
                        "client_credentials_file": access.client_credentials_file,
                    }
                }
            ),
        ),
    )
    assert listing.returncode == 0 and "ops-feed" in listing.stdout and "publisher" in listing.stdout


# ---- TLS --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command to make a test certificate")
def test_tls_round_trip_on_every_server(tmp_path, run):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    cfg = config.load(
        overrides={
            "access": tls,
            "tickerplant": {"port": 0, "journal_dir": str(tmp_path / "j")},
            "rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb")},
        }
    )

    async def body():
        srv = TickerplantServer(cfg.tickerplant, access=cfg.access)
        await srv.start()
        url = f"wss://127.0.0.1:{srv.port}"
        rdb = Rdb(cfg.rdb, date=srv.core.date, access=cfg.access)
        await rdb.start()
        ready = asyncio.Event()
        following = asyncio.create_task(follow(rdb, url, ready))  # the rdb subscribes over wss
        try:
            await asyncio.wait_for(ready.wait(), 10)
            plaintext = None
            try:
                async with connect(f"ws://127.0.0.1:{srv.port}", open_timeout=3, **with_token("subscriber")):
                    plaintext = "accepted"
            except (websockets.InvalidHandshake, OSError, TimeoutError, EOFError) as e:
                plaintext = type(e).__name__
            async with running_calc(srv.port, tmp_path / "j", access=tls) as calc:
                events = Subscriber(url, tables=["trade"], reconnect=False).events()
                assert (await anext(events)).kind == "live"
                async with Publisher(url) as pub:
                    await pub.upd("trade", trades(3))
                    await pub.wait_acked()
                ev = await asyncio.wait_for(anext(events), 5)
                await events.aclose()
                status, body = await __import__("marginflow.up", fromlist=["http_get"]).http_get(
                    "127.0.0.1", calc.port
                )
                calc_tp = calc.tp_url
            await asyncio.sleep(0.3)
            rurl = f"wss://127.0.0.1:{rdb.port}"
            counted = await asyncio.to_thread(
                lambda: RdbClient(rurl).query("select count(*) from trade", "sql")
            )
        finally:
            following.cancel()
            await rdb.stop()
            await srv.stop()
        return plaintext, ev.batch.num_rows, status, json.loads(body)["ok"], calc_tp, from_ipc(counted.arrow)

    try:
        plaintext, rows, status, ok, calc_tp, counted = run(body())
    finally:
        config.load()  # back to the plaintext defaults for the tests after this one
    assert plaintext != "accepted"
    assert rows == 3 and status == 200 and ok is True
    assert calc_tp.startswith("wss://")  # calc's own clients speak TLS to the tickerplant
    assert counted.column(0).to_pylist() == [3]  # the rdb followed over wss and answered a query over wss


def test_binding_beyond_loopback_needs_tls(tmp_path):
    access = config.load().access
    with pytest.raises(SystemExit, match="without TLS"):
        auth.check_bind("tickerplant", "0.0.0.0", access)
    auth.check_bind("tickerplant", "127.0.0.1", access)
    auth.check_bind("tickerplant", "0.0.0.0", msgspec.structs.replace(access, allow_plaintext_remote=True))
    conf = tmp_path / "remote.toml"
    conf.write_text(f'[tickerplant]\nhost = "0.0.0.0"\nport = 0\njournal_dir = "{tmp_path / "j"}"\n')
    for cmd in (
        ["tp"],
        ["rdb", "--no-subscribe", "--port", "0", "--hdb", str(tmp_path / "hdb"), "--host", "0.0.0.0"],
    ):
        r = subprocess.run(
            [sys.executable, "-m", "marginflow.cli", *cmd, "--config", str(conf)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode != 0 and "refusing to bind '0.0.0.0' without TLS" in r.stdout + r.stderr, r


# ---- marginflow up: the dashboard link once -------------------------------------------------------------
@pytest.mark.slow
def test_up_prints_the_dashboard_token_once_in_the_fragment(tmp_path, monkeypatch):
    from tests.support.up import UpProcess

    creds, local = tmp_path / "var" / "credentials.json", tmp_path / "var" / "client-credentials.json"
    over = json.loads(os.environ.get(config.OVERRIDES_ENV) or "{}")
    over["access"] = {
        "credentials_file": str(creds),
        "client_credentials_file": str(local),
    }  # a machine of its own
    monkeypatch.setenv(config.OVERRIDES_ENV, json.dumps(over))
    lines = []
    for _ in range(2):
        up = UpProcess(tmp_path / "up")
        try:
            lines.append(next(x for x in up.output if x.split()[:1] == ["dashboard"]))
            health = subprocess.run(
                [sys.executable, "-m", "marginflow.cli", "tokens", "url"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            ).stdout.strip()
        finally:
            assert up.stop() == 0
    risk = json.loads(local.read_text())["desk:risk"]
    assert f"/#token={risk}" in lines[0] and "?token" not in lines[0]  # first start: once, in the fragment
    assert "token=" not in lines[1] and "tokens url" in lines[1]  # later starts: how to get it
    assert health.endswith(f"/#token={risk}")
