"""rdb service, server and console: the protocol as plain calls (msgpack and JSON), the websocket server on an
ephemeral port, the console piped commands in non-tty mode, and q-style formatting of every value kind."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from marginflow import config
from rdb.console import Client, atom_text, column_text, format_result, format_table, list_text, parse_target
from rdb.query import from_ipc, to_ipc
from rdb.server import Rdb
from rdb.service import Service
from rdb.store import Store
from schemas.rdb import Query, QueryResult
from schemas.tables import TABLES
from schemas.wire import Error, Status, StatusRequest
from tests.support import ROOT  # noqa: E402
from tests.support.servers import rdb_process  # noqa: E402

T0 = 1_705_312_800_000_000_000  # 2024-01-15 10:00 UTC
SYMS = ["IBM", "MSFT", "IBM", "AAPL", "MSFT", "IBM"]
PRICES = [101.5, 20.25, 102.0, 180.0, 21.0, 100.125]
SIZES = [100, 200, 300, 50, 10, 1000]


def trades() -> pa.Table:
    n = len(SYMS)
    return pa.table({
        "time": pa.array(T0 + np.arange(n) * 90_000_000_000 + 1, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(np.arange(1, n + 1), pa.int64()), "sym": SYMS, "price": PRICES,
        "size": pa.array(SIZES, pa.int64()),
    })  # fmt: skip


# ---- formatting ----------------------------------------------------------------------------------
def test_table_format_like_q() -> None:
    t = pa.table({"sym": ["a", "bb"], "px": [1.5, 100.0], "n": pa.array([3, None], pa.int64())})
    assert format_table(t) == ["sym px  n", "--- --- -", "a   1.5 3", "bb  100"]
    assert format_table(t, keys=1) == ["sym| px  n", "---| --- -", "a  | 1.5 3", "bb | 100"]
    assert format_table(t, max_rows=1) == ["sym px  n", "--- --- -", "a   1.5 3", ".."]
    assert format_table(t, width=6)[0] == "sym .."


def test_value_text_like_q() -> None:
    ts = pa.array([T0 + 1, None], pa.int64()).cast(pa.timestamp("ns"))
    assert column_text(ts)[1] == ["2024.01.15D10:00:00.000000001", None]
    assert column_text(pa.array([19737], pa.date32()))[1] == ["2024.01.15"]
    minutes = pa.array([10 * 3600 * 10**6, (10 * 60 + 5) * 60 * 10**6], pa.time64("us"))
    assert column_text(minutes)[1] == ["10:00", "10:05"]
    assert column_text(pa.array([(10 * 3600 + 1) * 10**6 + 500_000], pa.time64("us")))[1] == ["10:00:01.500"]
    assert column_text(pa.array([3.14159265, 1234567.89, 1e-9]))[1] == ["3.141593", "1234568", "1e-09"]
    assert column_text(pa.array([300 * 10**9], pa.duration("ns")))[1] == ["0D00:05:00.000000000"]
    assert list_text("sym", ["a", "b"]) == "`a`b"
    assert list_text("float", ["1", "2"]) == "1 2f"
    assert list_text("float", ["1.5", None]) == "1.5 0n"
    assert list_text("int", ["7"]) == ",7"
    assert list_text("bool", ["1", "0", "1"]) == "101b"
    assert (
        atom_text("sym", "IBM") == "`IBM"
        and atom_text("float", "12") == "12f"
        and atom_text("int", None) == "0N"
    )


def test_format_result_shapes() -> None:
    t = pa.table({"sym": ["a", "b"], "price": [1.0, 2.5]})

    def res(table: pa.Table, shape: str, keys: int = 0, truncated: bool = False) -> QueryResult:
        return QueryResult(id=1, columns=table.column_names, types=[], rows=table.num_rows, elapsed_ms=0.0,
                           truncated=truncated, arrow=to_ipc(table), keys=keys, shape=shape)  # fmt: skip

    assert format_result(res(t.select(["price"]), "list")) == "1 2.5"
    assert format_result(res(t.select(["sym"]).slice(1), "atom")) == "`b"
    assert format_result(res(t, "dict")) == "sym  | `a`b\nprice| 1 2.5"
    assert format_result(res(t, "table", keys=1)) == "sym| price\n---| -----\na  | 1\nb  | 2.5"
    assert format_result(res(t, "dict", keys=1)) == "a| 1\nb| 2.5"  # exec price by sym: a q dictionary
    lists = pa.table({"sym": ["a", "bb"], "price": [[1.0, 2.0], [3.5]]})
    assert format_result(res(lists, "dict", keys=1)) == "a | 1 2f\nbb| ,3.5"  # as q shows a general list
    assert format_result(res(t, "table", truncated=True)).endswith(".. (first 2 rows)")


def test_parse_target() -> None:
    assert parse_target(None, "h", 1) == ("h", 1)
    assert parse_target("localhost:5011", "h", 1) == ("localhost", 5011)
    assert parse_target(":7", "h", 1) == ("h", 7)
    assert parse_target("9", "h", 1) == ("h", 9)
    with pytest.raises(ValueError, match="is not host:port"):
        parse_target("h:x", "h", 1)


# ---- the service as plain calls ------------------------------------------------------------------
@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    store = Store(tmp_path / "hdb", date="2024-01-15", memory_limit="512MB")
    store.append("trade", trades())
    yield Service(store, timeout_s=5.0, max_rows=4)
    store.close()


def ask(service: Service, msg: msgspec.Struct) -> object:
    reply = service.handle(msgspec.msgpack.encode(msg))
    assert isinstance(reply, bytes)
    return msgspec.msgpack.decode(reply, type=QueryResult | Error | Status)


def test_service_sql_and_q_answers(service: Service) -> None:
    r = ask(service, Query(sql="SELECT sym, price FROM trade ORDER BY seq", id=7))
    assert isinstance(r, QueryResult) and r.id == 7
    assert r.columns == ["sym", "price"] and r.types == ["VARCHAR", "DOUBLE"]
    assert r.rows == 4 and r.truncated  # the server's max_rows (4) cut 6 rows
    assert from_ipc(r.arrow).column("price").to_pylist() == PRICES[:4]
    r = ask(service, Query(sql="select last price by sym from trade", lang="q"))
    assert (r.keys, r.shape) == (1, "table")
    assert from_ipc(r.arrow).to_pylist() == [
        {"sym": "AAPL", "price": 180.0}, {"sym": "IBM", "price": 100.125}, {"sym": "MSFT", "price": 21.0},
    ]  # fmt: skip
    assert "latest" in r.sql  # answered from the last row per key the store keeps
    r = ask(service, Query(sql="select * from trade where size > 250", lang="q", max_rows=1))  # SQL in q mode
    assert r.rows == 1 and r.truncated and r.sql == "select * from trade where size > 250"


def test_service_json_frames(service: Service) -> None:
    reply = service.handle(json.dumps({"type": "query", "sql": "count trade", "lang": "q", "format": "json"}))
    assert isinstance(reply, str)
    body = json.loads(reply)
    assert body["type"] == "query_result" and body["data"] == [[6]] and body["shape"] == "atom"
    bad = json.loads(service.handle('{"type": "query", "sql": "SELECT 1", "format": "csv"}'))
    assert bad["type"] == "error" and "format" in bad["reason"]


def test_service_errors_and_status(service: Service) -> None:
    r = ask(service, Query(sql="DROP TABLE trade", id=3))
    assert (
        isinstance(r, Error) and r.id == 3 and r.reason.startswith("refused: DROP statements are not allowed")
    )
    r = ask(service, Query(sql="select nope from trade", lang="q"))
    assert isinstance(r, Error) and r.reason.startswith("nope: no such column")
    r = service.handle(b"\x93garbage")
    assert msgspec.msgpack.decode(r, type=Error).reason.startswith("bad request:")
    s = ask(service, StatusRequest())
    assert isinstance(s, Status) and s.process == "rdb" and s.rows["trade"] == 6 and s.last_seq == 6
    assert s.bad_messages == {"refused": 1, "q": 1, "bad request": 1}


# ---- the server and the console ------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[Rdb]:
    cfg = config.load(None, {"rdb": {"port": 0, "host": "127.0.0.1", "hdb_dir": str(tmp_path / "hdb")}}).rdb
    rdb = Rdb(cfg, date="2024-01-15")
    rdb.apply_batch("trade", trades())
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(rdb.start())
        ready.set()
        loop.run_forever()

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    assert ready.wait(10)
    yield rdb
    asyncio.run_coroutine_threadsafe(rdb.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    th.join(10)


def console(port: int, commands: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "marginflow.cli", "q", f"127.0.0.1:{port}"],
        input=commands, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_console_non_tty_prints_each_result(server: Rdb) -> None:
    commands = "\n".join([
        "count trade",
        "select last price, n:count i by sym from trade",
        "select from trade where i<2",
        "exec price from trade where sym=`IBM",
        "s) SELECT max(size) AS m FROM trade",
        "\\t select from trade",
        "",
        "tables[]",
    ]) + "\n"  # fmt: skip
    r = console(server.port, commands)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "6"
    assert out[1:6] == [
        "sym | price   n",
        "----| ------- -",
        "AAPL| 180     1",
        "IBM | 100.125 3",
        "MSFT| 21      2",
    ]
    assert out[6:10] == [
        "time                          seq sym  price size",
        "----------------------------- --- ---- ----- ----",
        "2024.01.15D10:00:00.000000001 1   IBM  101.5 100",
        "2024.01.15D10:01:30.000000001 2   MSFT 20.25 200",
    ]  # fmt: skip
    assert out[10] == "101.5 102 100.125"
    assert out[11:14] == ["m", "----", "1000"]
    assert out[14].isdigit()  # \t: milliseconds
    assert out[15] == "".join(f"`{t}" for t in sorted(TABLES))
    assert len(out) == 16


def test_end_of_day_through_rdb_then_one_query_spans_days(server: Rdb) -> None:
    with pytest.raises(ValueError, match="holds rows of 2024-01-15; end that day before 2024-01-16"):
        server.start_day("2024-01-16")
    server.start_day("2024-01-15")  # the day it holds: nothing to do
    rep = server.end_of_day(next_date="2024-01-16")  # while the server thread keeps serving
    assert rep.rows["trade"] == 6 and rep.date == "2024-01-15"
    nxt = trades().slice(0, 2)
    nxt = nxt.set_column(
        0, "time", pa.array(T0 + 86_400 * 10**9 + np.arange(2), pa.int64()).cast(pa.timestamp("ns"))
    )
    server.start_day("2024-01-16")  # what it holds already
    assert server.apply_batch("trade", nxt) == 2  # seq 1, 2 again: a new day, nothing held yet
    r = console(
        server.port,
        "select n:count i, s:sum size by date from days.trade\ncount trade\n"
        "select last price by sym from trade\n",
    )
    assert r.stdout.splitlines() == [
        "date      | n s", "----------| - ----", "2024.01.15| 6 1660", "2024.01.16| 2 300", "2",
        "sym | price", "----| -----", "IBM | 101.5", "MSFT| 20.25",
    ], r.stderr  # fmt: skip


def test_console_errors_one_line_and_quit(server: Rdb) -> None:
    r = console(server.port, "select nope from trade\ns) COPY trade TO '/tmp/x.csv'\n\\\\\ncount trade\n")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "'nope: no such column; columns are time, seq, sym, price, size",
        "'refused: COPY statements are not allowed; only SELECT, WITH, DESCRIBE, SHOW, EXPLAIN, "
        "SUMMARIZE (read-only)",
    ]  # fmt: skip  (nothing after \\)


def test_console_cannot_connect() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "marginflow.cli", "q", "127.0.0.1:1"],
        input="count trade\n", capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.startswith("'connect ws://127.0.0.1:1:")


def test_client_completion_names(server: Rdb) -> None:
    c = Client(f"ws://127.0.0.1:{server.port}")
    try:
        names = c.names()
    finally:
        c.close()
    assert {"trade", "quote", "days.trade", "price", "bid_size", "date"} <= set(names)


def test_rdb_main_serves_on_ephemeral_port_and_stops(tmp_path: Path) -> None:
    with rdb_process(tmp_path / "hdb") as (_, url):
        port = int(url.rsplit(":", 1)[1])
        r = console(port, "count trade\ncount days.quote\n")
        assert r.stdout.splitlines() == ["0", "0"], r.stderr
    assert (tmp_path / "hdb").is_dir()
    assert os.listdir(tmp_path / "hdb") == []


def test_start_day_on_an_empty_rdb(tmp_path: Path) -> None:
    cfg = config.load(None, {"rdb": {"port": 0, "hdb_dir": str(tmp_path / "hdb")}}).rdb
    rdb = Rdb(cfg, date="2024-01-15")
    rdb.start_day("2024-02-01")
    assert rdb.store.date == "2024-02-01"
    rdb.apply_batch("trade", trades())
    got = rdb.service.query(Query(sql="SELECT DISTINCT date FROM days.trade", format="json"))
    assert isinstance(got, QueryResult) and got.data == [["2024-02-01"]]
    rdb.store.close()


def test_completer_words() -> None:
    from rdb.console import completer

    c = completer(["trade", "days.trade", "time", "tables[]", "trade"])
    assert [c("t", i) for i in range(4)] == ["tables[]", "time", "trade", None]
    assert c("days.", 0) == "days.trade"


def test_completion_words_are_the_dialect_s_own() -> None:
    """The console completes qsql's own words (derived, not a list of its own): each once, the clock names
    translate, and what the console used to list by hand is all there."""
    from rdb import qsql

    words = qsql.words()
    assert len(words) == len(set(words))
    for z in qsql.CLOCK:
        assert qsql.translate(f"select from trade where time < {z}" if z[-1] in "pP" else z).sql
    old = """select exec update delete by from where count each meta tables[] aj aj0 wj wj1 lj ij xasc
        xdesc xkey fby first last sum avg min max wavg wsum xbar within like in not distinct med dev
        .z.p .z.d .z.t"""
    assert set(old.split()) <= set(words)
    assert "tables" not in words and "#" not in words


def test_console_at_a_terminal_history_and_completion(server: Rdb, tmp_path: Path) -> None:
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginflow.cli", "q", f"127.0.0.1:{server.port}"], stdin=slave, stdout=slave,
        stderr=slave, cwd=ROOT, env={**os.environ, "HOME": str(tmp_path)}, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    buf = b""

    def read_until(token: bytes, timeout: float = 30) -> bytes:
        nonlocal buf
        end = time.monotonic() + timeout
        while token not in buf:
            assert time.monotonic() < end, buf
            if select.select([master], [], [], 0.2)[0]:
                buf += os.read(master, 65536)
        i = buf.index(token) + len(token)
        out, buf = buf[:i], buf[i:]
        return out

    try:
        read_until(b"q)")
        os.write(master, b"count tra\t\r")  # tab completes the table name
        out = read_until(b"q)")
        assert b"count trade" in out and b"\r\n6\r\n" in out
        os.write(master, b"select last price by sym from trade\r")
        out = read_until(b"q)")
        assert b"sym | price" in out and b"IBM | 100.125" in out
        os.write(master, b"\\\\\r")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    history = (tmp_path / ".marginflow_q_history").read_text()
    assert "count trade" in history and "select last price by sym from trade" in history


def test_one_row_dict_shows_atoms_and_width_cuts_lists() -> None:
    t = pa.table({"sym": ["IBM"], "price": [101.5], "n": pa.array([3], pa.int64())})

    def res(table: pa.Table, shape: str) -> QueryResult:
        return QueryResult(id=1, columns=table.column_names, types=[], rows=table.num_rows, elapsed_ms=0.0,
                           truncated=False, arrow=to_ipc(table), shape=shape)  # fmt: skip

    assert format_result(res(t, "dict")) == "sym  | `IBM\nprice| 101.5\nn    | 3"  # first t: a row of atoms
    two = pa.table({"sym": ["a", "b"]})
    assert format_result(res(two, "dict")) == "sym| `a`b"
    long = pa.table({"x": pa.array(range(100), pa.int64())})
    assert format_result(res(long, "list"), width=12) == "0 1 2 3 4 .."


def test_console_load_file_and_console_size(server: Rdb, tmp_path: Path) -> None:
    script = tmp_path / "day.q"
    script.write_text(
        "/ a comment line\ncount trade\n\nselect nope from trade\nexec distinct sym from trade\n\\l other.q\n"
    )
    commands = "\n".join([
        f"\\l {script}",
        "\\l nope.q",
        "\\c",
        "\\c 10 30",
        "select from trade",
        "\\c",
        "\\c 5 5",
    ]) + "\n"  # fmt: skip
    r = console(server.port, commands)
    assert r.returncode == 1, r.stderr  # an error happened (in the file, the missing file, \c 5 5)
    out = r.stdout.splitlines()
    assert out[:4] == [
        "6",
        f"'{script}:4: nope: no such column; columns are time, seq, sym, price, size",
        "`IBM`MSFT`AAPL",
        f"'{script}:6: \\l other.q: a loaded file cannot load another",
    ]
    out = out[1:]
    assert out[3].startswith("'\\l nope.q: No such file")
    assert out[4] == "25 80i"  # q's default size when not at a terminal (results are not cut then)
    assert out[5:13] == format_table(trades(), max_rows=5, width=30)  # 10 rows - 5, 30 columns
    assert out[5].endswith("..") and len(out[5]) == 30 and out[12] == ".."
    assert out[13] == "10 30i"
    assert out[14] == "'\\c 5 5: rows and columns are two whole numbers from 10 to 2000, e.g. \\c 25 80"
    assert len(out) == 15


def test_console_new_forms_end_to_end(server: Rdb) -> None:
    commands = "\n".join([
        "first trade",
        "count each (trade;quote)",
        "2#`price xdesc trade",
        "-1#select sym, price from trade",
        "select from trade where price=(max;price) fby sym",
        "update v:price*size from trade where sym=`AAPL",
        "count delete from trade where sym=`IBM",
        "count trade",
        ".z.d",
        "wj[w;`sym`time;trade;(quote;(max;`ask))]",
    ]) + "\n"  # fmt: skip
    r = console(server.port, commands)
    assert r.returncode == 1  # the wj (w undefined: the console has no variables)
    head = [
        "time                          seq sym  price size",
        "----------------------------- --- ---- ----- ----",
    ]
    row = {  # trades() as the console shows them (price and size padded to the widest in the result)
        3: "2024.01.15D10:03:00.000000001 3   IBM  102   300",
        4: "2024.01.15D10:04:30.000000001 4   AAPL 180   50",
        5: "2024.01.15D10:06:00.000000001 5   MSFT 21    10",
    }
    assert r.stdout.splitlines() == [
        "time | 2024.01.15D10:00:00.000000001", "seq  | 1", "sym  | `IBM", "price| 101.5", "size | 100",
        "6 0",
        *head, row[4], row[3],
        "sym price", "--- -------", "IBM 100.125",
        *head, row[3], row[4], row[5],
        "time                          seq sym  price   size v",
        "----------------------------- --- ---- ------- ---- ----",
        "2024.01.15D10:00:00.000000001 1   IBM  101.5   100",
        "2024.01.15D10:01:30.000000001 2   MSFT 20.25   200",
        "2024.01.15D10:03:00.000000001 3   IBM  102     300",
        "2024.01.15D10:04:30.000000001 4   AAPL 180     50   9000",
        "2024.01.15D10:06:00.000000001 5   MSFT 21      10",
        "2024.01.15D10:07:30.000000001 6   IBM  100.125 1000",
        "3", "6",
        f"{dt.datetime.now(dt.UTC):%Y.%m.%d}",
        "'type: wj's window is a pair of offsets from t's time: lo hi+\\:t.time, (lo;hi) or lo hi, each a "
        "timespan or a whole number, e.g. -0D00:00:02 0D00:00:01",
    ], r.stderr  # fmt: skip
