"""The tickerplant's kdb+ IPC port: a PyKX publisher's `.u.upd` lands in the journal exactly as a native
upd (same rows, same error for a bad row, nothing of it journaled); a kdb+ subscriber after `.u.sub`
gets every row in seq order, none twice, then `.u.end`; roles, credentials, malformed frames and a
subscriber that does not read; a client that starts as kx's r.q does (the char-vector query, the q
log replayed, then the pushes) while a publisher publishes. PyKX runs in a child process
(tests/support/qclient.py). A PyKX subscriber works unlicensed with RawQConnection: `.u.sub`'s answer
is its awaited future, the pushes come from poll_recv() polled in a loop (its select does not wait);
SyncQConnection has no receive of pushed messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest
from websockets.sync.client import connect

from marginflow import qipc
from schemas import wire
from schemas.tables import TABLES
from tests.support.qclient import PyKX, QClient
from tests.support.servers import InThread, tp_config
from tests.support.tokens import local_token, with_token
from tickerplant.journal_reader import read_table
from tickerplant.server import TickerplantServer


class Running(InThread):
    def __init__(self, journal: Path, **cfg):
        super().__init__(TickerplantServer(tp_config(journal, kdb_port=-1, **cfg)))
        self.srv = self.server
        self.port = self.srv.kdb.port.port
        self.url = f"ws://127.0.0.1:{self.srv.port}"

    def journal(self, table: str):
        self.call(lambda: self.srv.send(self.srv.tp.flush()))
        return read_table(self.srv.core.root, self.srv.core.date, table)


@pytest.fixture(scope="module")
def tp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    r = Running(Path(tmp_path_factory.mktemp("kdbtp")) / "journal", subscriber_queue_frames=32)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def pykx() -> Iterator[PyKX]:
    px = PyKX()
    yield px
    px.stop()


def native(tp: Running, table: str, cols: dict, msg_id: int = 1) -> wire.Ack | wire.Error:
    """A websocket upd of `cols` (the native path) and its answer."""
    with connect(tp.url, **with_token("publisher")) as ws:
        ws.send(wire.encode(wire.Upd(table=table, cols=msgspec.Raw(msgspec.msgpack.encode(cols)), id=msg_id)))
        reply = msgspec.msgpack.decode(ws.recv(10), type=wire.FromTickerplant)
    assert isinstance(reply, wire.Ack | wire.Error)
    return reply


def native_arrow(tp: Running, table: str, data, msg_id: int = 1) -> wire.Ack | wire.Error:
    from rdb.query import to_ipc

    with connect(tp.url, **with_token("publisher")) as ws:
        ws.send(wire.encode(wire.UpdArrow(table=table, ipc=to_ipc(data), id=msg_id)))
        return msgspec.msgpack.decode(ws.recv(10), type=wire.FromTickerplant)


SUB_TRADE = qipc.QList([qipc.sym(".u.sub"), qipc.sym("trade"), qipc.sym("")])


def upd_msg(table: str, data) -> qipc.QList:
    return qipc.QList([qipc.sym(".u.upd"), qipc.sym(table), data])


def test_pykx_upd_lands_in_the_journal_exactly_like_a_native_upd(tp: Running, pykx: PyKX) -> None:
    h = pykx.connect(tp.port, local_token("publisher"))
    rows = {"sym": ["KX1", "KX2", "KX1"], "price": [10.5, 20.25, 11.0], "size": [100, 200, 300]}
    before = tp.journal("trade").num_rows
    cols = {"sym": ("s", rows["sym"]), "price": ("f", rows["price"]), "size": ("j", rows["size"])}
    assert pykx.upd(h, "trade", cols) is None
    assert pykx.upd(h, "trade", cols, form="columns") is None
    assert isinstance(native(tp, "trade", rows), wire.Ack)
    j = tp.journal("trade").slice(before)
    assert j.num_rows == 9
    kdb_rows, as_cols, ws_rows = j.slice(0, 3), j.slice(3, 3), j.slice(6, 3)
    assert as_cols.drop_columns(["time", "seq"]).equals(ws_rows.drop_columns(["time", "seq"]))
    for col in ("sym", "price", "size"):
        assert kdb_rows.column(col).to_pylist() == ws_rows.column(col).to_pylist() == rows[col]
    assert kdb_rows.schema == ws_rows.schema
    seqs = j.column("seq").to_pylist()
    assert seqs == list(range(seqs[0], seqs[0] + 9))  # stamped in order, once each
    pykx.close(h)


def test_a_bad_row_gets_the_native_error_and_nothing_is_journaled(tp: Running, pykx: PyKX) -> None:
    h = pykx.connect(tp.port, local_token("publisher"))
    bad = {"sym": ("s", ["KX1", "KX2"]), "price": ("f", [10.0, -1.0]), "size": ("j", [1, 2])}
    before = tp.journal("trade").num_rows
    with pytest.raises(RuntimeError) as e:
        pykx.upd(h, "trade", bad)
    import pyarrow as pa

    same = native_arrow(tp, "trade", pa.table({"sym": ["KX1", "KX2"], "price": [10.0, -1.0], "size": [1, 2]}))
    assert isinstance(same, wire.Error) and same.row == 1 and same.field == "price"
    assert f"QError: {same.reason}" in str(e.value)
    assert "table trade, row 1, field price" in str(e.value)
    with pytest.raises(RuntimeError, match="field size: expected long"):
        pykx.upd(h, "trade", {"sym": ("s", ["A"]), "price": ("f", [1.0]), "size": ("f", [1.5])})
    bad_before = tp.srv.core.bad["bad_value"]
    pykx.upd(h, "trade", bad, wait=False)  # async: counted and logged, no reply
    deadline = time.time() + 5
    while tp.srv.core.bad["bad_value"] == bad_before and time.time() < deadline:
        time.sleep(0.01)
    assert tp.srv.core.bad["bad_value"] == bad_before + 1
    assert tp.journal("trade").num_rows == before
    pykx.close(h)


def test_list_of_columns_one_row_and_feed_time_forms(tp: Running) -> None:
    c = QClient(tp.port, local_token("publisher"))
    before = tp.journal("trade").num_rows
    cols = qipc.QList([qipc.symbols(["L1", "L2"]), qipc.vector(9, [1.0, 2.0]), qipc.vector(6, [5, 6])])
    assert c.call(upd_msg("trade", cols)) is qipc.NULL
    row = qipc.QList(
        [qipc.Atom(-16, 123), qipc.sym("L3"), qipc.Atom(-9, 3.0), qipc.Atom(-7, 7)]
    )  # time first
    assert c.call(upd_msg("trade", row)) is qipc.NULL
    err = c.call(upd_msg("trade", qipc.QList([qipc.symbols(["x"])])))
    assert isinstance(err, qipc.QError) and err.text.startswith(
        "table trade: length: table trade takes 3 columns"
    )
    assert "unknown table 'nope'" in c.call(upd_msg("nope", cols)).text
    j = tp.journal("trade").slice(before)
    assert j.column("sym").to_pylist() == ["L1", "L2", "L3"] and j.column("size").to_pylist() == [5, 6, 7]
    c.close()


def test_subscriber_gets_every_row_in_seq_order_none_twice(tp: Running, pykx: PyKX) -> None:
    sub = QClient(tp.port, local_token("subscriber"))
    name, empty = sub.call(SUB_TRADE).items
    assert name == qipc.sym("trade") and len(empty) == 0
    assert empty.columns == ["time", "seq", "sym", "price", "size"]
    assert [c.t for c in empty.data] == [12, 7, 11, 9, 7]
    ibm = QClient(tp.port, local_token("subscriber"))
    ibm.call(qipc.QList([qipc.sym(".u.sub"), qipc.sym("trade"), qipc.symbols(["S1"])]))
    h = pykx.connect(tp.port, local_token("publisher"))
    n_msgs, per = 20, 5
    for i in range(n_msgs):
        syms = [f"S{k % 3}" for k in range(per)]
        cols = {"sym": ("s", syms), "price": ("f", [1.0 + i] * per), "size": ("j", [i + 1] * per)}
        pykx.upd(h, "trade", cols, wait=i % 2 == 0)  # sync and async alike
    got: list[int] = []
    while len(got) < n_msgs * per:
        m = sub.recv()
        assert m.msgtype == qipc.ASYNC
        fn, table, data = m.obj.items
        assert (fn, table) == (qipc.sym("upd"), qipc.sym("trade"))
        assert [c.t for c in data.data] == [12, 7, 11, 9, 7]
        got += data.column("seq").data.tolist()
    assert got == sorted(got) and len(set(got)) == len(got) == n_msgs * per
    j = tp.journal("trade")
    assert got == [s for s in j.column("seq").to_pylist() if s >= got[0]]
    only: list[str] = []
    while len(only) < n_msgs * 2:  # S1 is 2 of every 5 rows
        only += ibm.recv().obj.items[2].column("sym").data
    assert set(only) == {"S1"}
    sub.close()
    ibm.close()
    pykx.close(h)


def test_a_pykx_subscriber_gets_every_row_in_seq_order_none_twice(tp: Running, pykx: PyKX) -> None:
    hid, name, columns = pykx.subscribe(tp.port, local_token("subscriber"), "trade")
    assert (name, columns) == ("trade", ["time", "seq", "sym", "price", "size"])
    before = tp.journal("trade").num_rows
    n_msgs, per = 30, 4

    def publish() -> None:  # the native path: websocket upds, each acked
        with connect(tp.url, **with_token("publisher")) as ws:
            for i in range(n_msgs):
                cols = {"sym": [f"P{k}" for k in range(per)], "price": [1.0 + i] * per, "size": [i + 1] * per}
                raw = msgspec.Raw(msgspec.msgpack.encode(cols))
                ws.send(wire.encode(wire.Upd(table="trade", cols=raw, id=i + 1)))
                assert isinstance(msgspec.msgpack.decode(ws.recv(10), type=wire.FromTickerplant), wire.Ack)
                time.sleep(0.002)

    publisher = threading.Thread(target=publish)
    publisher.start()
    got = pykx.receive(hid, n_msgs * per)
    publisher.join()
    assert {(fn, table) for fn, table, _ in got} == {("upd", "trade")}
    seqs = [s for _, _, chunk in got for s in chunk]
    journaled = tp.journal("trade").column("seq").to_pylist()[before:]
    assert seqs == journaled and len(seqs) == n_msgs * per  # every row, in seq order, none twice
    pykx.close(hid)


def test_every_table_sub_and_roles(tp: Running) -> None:
    sub = QClient(tp.port, local_token("subscriber"))
    pairs = sub.call(qipc.QList([qipc.sym(".u.sub"), qipc.sym(""), qipc.sym("")]))
    assert [p.items[0].value for p in pairs.items] == list(TABLES)
    margin = next(p.items[1] for p in pairs.items if p.items[0].value == "margin")
    assert margin.data[margin.columns.index("drivers")] == qipc.QList([])  # text: a list of strings
    refused = sub.call(upd_msg("trade", qipc.QList([qipc.sym("A"), qipc.Atom(-9, 1.0), qipc.Atom(-7, 1)])))
    assert isinstance(refused, qipc.QError) and "not permitted: publisher needed" in refused.text
    pub = QClient(tp.port, local_token("publisher"))
    assert "not permitted: subscriber needed" in pub.call(SUB_TRADE).text
    assert "nyi: the tickerplant takes" in pub.query("1+1").text
    sub.close()
    pub.close()
    with pytest.raises(ConnectionRefusedError):
        QClient(tp.port, "wrong-token")


def test_malformed_frames_answered_and_the_port_keeps_serving(tp: Running) -> None:
    c = QClient(tp.port, local_token("publisher"))
    c.send_raw(bytes.fromhex("01010000") + (10).to_bytes(4, "little") + bytes([0xE0, 0]))  # type -32
    assert "unknown type byte -32" in c.recv().obj.text
    c.send_raw(bytes.fromhex("01010000") + (15).to_bytes(4, "little") + bytes.fromhex("0b0002000000ab"))
    assert "truncated" in c.recv().obj.text
    assert (
        c.call(upd_msg("trade", qipc.QList([qipc.sym("M1"), qipc.Atom(-9, 1.0), qipc.Atom(-7, 1)])))
        is qipc.NULL
    )
    c.send_raw(bytes.fromhex("01010000") + (1 << 30).to_bytes(4, "little"))  # over max_message_bytes
    assert "limit: message of 1073741824 bytes" in c.recv().obj.text
    with pytest.raises((ConnectionResetError, OSError)):
        c.recv(5)
    again = QClient(tp.port, local_token("publisher"))
    assert (
        again.call(upd_msg("trade", qipc.QList([qipc.sym("M2"), qipc.Atom(-9, 1.0), qipc.Atom(-7, 1)])))
        is qipc.NULL
    )
    again.close()


def test_a_subscriber_that_does_not_read_is_cut_off(tp: Running) -> None:
    slow = QClient(tp.port, local_token("subscriber"))
    slow.call(SUB_TRADE)
    pub = QClient(tp.port, local_token("publisher"))
    n = 5000
    cols = qipc.QList([qipc.symbols([f"Z{i % 50}" for i in range(n)]), qipc.vector(9, np.full(n, 2.0)),
                       qipc.vector(7, np.arange(1, n + 1))])  # fmt: skip
    deadline = time.time() + 60
    while any(c.id for c in tp.srv.kdb.port.conns.values() if c.state.get("subs")) and time.time() < deadline:
        assert pub.call(upd_msg("trade", cols)) is qipc.NULL
        if len([c for c in tp.srv.kdb.port.conns.values() if c.state.get("subs")]) == 0:
            break
    assert not [c for c in tp.srv.kdb.port.conns.values() if c.state.get("subs")], (
        "the slow subscriber is still on"
    )
    pub.close()
    slow.close()


def rq_start(rdb: QClient) -> tuple[dict[str, list], int]:
    """What kx's r.q does on start: `.u.rep .(h)"(.u.sub[`;`];`.u `i`L)"`: each (table; empty) set,
    then -11!(.u.i; .u.L) replays the log's first .u.i messages (read here with the codec); the tables'
    chunks by name and the count."""
    answer = rdb.query("(.u.sub[`;`];`.u `i`L)")
    pairs, globals_ = answer.items
    count, log = globals_.items
    assert count.t == -7 and log.t == -11 and log.value.startswith(":/")
    assert Path(log.value[1 : -len("2026.12.02")]).is_dir()  # r.q's `system "cd ",1_-10_string L`
    tables: dict[str, list] = {p.items[0].value: [p.items[1]] for p in pairs.items}
    assert list(tables) == list(TABLES)
    for item in qipc.read_log(Path(log.value[1:]).read_bytes(), count.value):
        fn, table, data = item.items
        assert fn == qipc.sym("upd")
        tables[table.value].append(data)
    return tables, count.value


def seqs_of(chunks: list) -> list[int]:
    return [s for c in chunks for s in c.column("seq").data.tolist()]


def test_an_rq_shaped_rdb_gets_every_row_once_while_a_publisher_publishes(tp: Running) -> None:
    pub = QClient(tp.port, local_token("publisher"))
    stop = threading.Event()

    def publish() -> None:
        i = 0
        while not stop.is_set():
            cols = qipc.QList([qipc.symbols([f"R{i % 4}"] * 3), qipc.vector(9, [1.0 + i] * 3),
                               qipc.vector(7, [i + 1] * 3)])  # fmt: skip
            pub.send(upd_msg("trade", cols), qipc.ASYNC)
            i += 1
            time.sleep(0.0005)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        time.sleep(0.1)  # publishing is under way when the rdb starts
        rdb = QClient(tp.port, local_token("subscriber"))
        tables, count = rq_start(rdb)
        time.sleep(0.1)
    finally:
        stop.set()
        publisher.join()
    one = qipc.QList([qipc.sym("R9"), qipc.Atom(-9, 1.0), qipc.Atom(-7, 1)])
    assert pub.call(upd_msg("trade", one)) is qipc.NULL  # sync: every row before it is journaled
    journaled = tp.journal("trade").column("seq").to_pylist()
    in_log = seqs_of(tables["trade"])
    assert count > 0 and in_log and in_log[-1] < journaled[-1]
    while not seqs_of(tables["trade"]) or seqs_of(tables["trade"])[-1] < journaled[-1]:
        m = rdb.recv()
        fn, table, data = m.obj.items
        assert m.msgtype == qipc.ASYNC and fn == qipc.sym("upd")
        tables[table.value].append(data)
    assert seqs_of(tables["trade"]) == journaled  # every row of the day once, in seq order
    assert len(seqs_of(tables["trade"])) > len(in_log)  # (and some of them came as pushes)
    rdb.close()
    pub.close()


def test_u_globals_and_a_two_step_subscribe(tp: Running) -> None:
    pub = QClient(tp.port, local_token("publisher"))
    one = qipc.QList([qipc.sym("G1"), qipc.Atom(-9, 1.0), qipc.Atom(-7, 1)])
    assert pub.call(upd_msg("trade", one)) is qipc.NULL  # a row in the log whatever ran before (alone, -n 2)
    rdb = QClient(tp.port, local_token("subscriber"))
    name, empty = rdb.query(".u.sub[`trade;`]").items
    assert name == qipc.sym("trade") and len(empty) == 0
    assert pub.call(upd_msg("trade", one)) is qipc.NULL
    count, log = rdb.query("`.u `i`L").items  # asked after more rows: still the .u.sub answer's position
    assert (rdb.query(".u.i"), rdb.query(".u.L")) == (count, log)
    chunks = qipc.read_log(Path(log.value[1:]).read_bytes(), count.value)
    pushed = rdb.recv().obj.items[2]
    logged = seqs_of([c.items[2] for c in chunks if c.items[1].value == "trade"])
    assert logged[-1] + 1 == seqs_of([pushed])[0]  # the log ends where the pushes begin
    assert rdb.query(".u.t") == qipc.symbols(list(TABLES))
    assert rdb.query(".u.d").t == -14
    w = rdb.query(".u.w")
    assert w.keys == qipc.symbols(list(TABLES))
    assert any(h.items[1] == qipc.sym("") for h in w.values.items[list(TABLES).index("trade")].items)
    ibm = rdb.query(".u.sub[`trade;`IBM`MSFT]")
    assert ibm.items[0] == qipc.sym("trade")
    assert "nyi: the tickerplant takes" in rdb.query("2+2").text
    assert "nyi" in rdb.query("`.u `x").text and "nyi" in rdb.query(".u.sub[`trade]").text
    assert "not permitted: subscriber needed for .u.L" in pub.query(".u.L").text
    desk = QClient(tp.port, local_token("desk:equity-tech"))
    assert desk.query(".u.L").text.startswith("access: .u.L: the q log holds every account's rows")
    for c in (rdb, pub, desk):
        c.close()


def test_end_of_day_is_pushed_as_u_end(tp: Running) -> None:
    sub = QClient(tp.port, local_token("subscriber"))
    sub.call(SUB_TRADE)
    date = tp.srv.core.date
    tp.call(lambda: tp.srv.send(tp.srv.tp.end_of_day()))
    m = sub.recv()
    fn, d = m.obj.items
    assert fn == qipc.sym(".u.end") and d.t == -14
    assert str(np.datetime64("2000-01-01") + np.timedelta64(d.value, "D")) == date
    sub.close()
