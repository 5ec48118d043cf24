"""The rdb's kdb+ IPC port with PyKX as the client (unlicensed, in a child process: see
tests/support/qclient.py): each type and a keyed table as the websocket query path gives them, desk
restriction, credentials, and malformed / async / compressed messages (raw codec client)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from marginflow import config, qipc
from rdb.console import Client
from rdb.query import from_ipc
from rdb.server import Rdb
from rdb.service import Service
from rdb.store import Store
from schemas.rdb import Query, QueryResult
from schemas.tables import TABLES
from schemas.wire import Error
from tests.support.qclient import PyKX, QClient
from tests.support.servers import InThread
from tests.support.tokens import local_token

T0 = 1_705_312_800_000_000_000  # 2024-01-15 10:00 UTC


def trades() -> pa.Table:
    syms = ["IBM", "MSFT", "IBM", "AAPL", "MSFT", "IBM"]
    n = len(syms)
    return pa.table({
        "time": pa.array(T0 + np.arange(n) * 90_000_000_000 + 7, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(np.arange(1, n + 1), pa.int64()),
        "sym": syms,
        "price": [101.5, 20.25, 102.0, 180.0, 21.0, 100.125],
        "size": pa.array([100, 200, 300, 50, 10, 1000], pa.int64()),
    }, schema=TABLES["trade"].arrow_schema)  # fmt: skip


def fills() -> pa.Table:
    accounts = ["TECH01", "DIV02", "TECH01", "MN05"]
    n = len(accounts)
    cols = {
        "time": pa.array(T0 + np.arange(n) * 1000, pa.int64()).cast(pa.timestamp("ns")),
        "seq": pa.array(np.arange(7, 7 + n), pa.int64()),
        "account": accounts,
        "sym": ["IBM"] * n,
        "side": ["B", "S", "B", "S"],
        "qty": [1.0, 2.0, 3.0, 4.0],
        "price": [100.0] * n,
        "order_id": [f"o{i}" for i in range(n)],
        "exec_id": [f"e{i}" for i in range(n)],
    }
    return pa.table(cols, schema=TABLES["fill"].arrow_schema)


@pytest.fixture(scope="module")
def rdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rdb]:
    hdb = Path(tmp_path_factory.mktemp("kdb")) / "hdb"
    cfg = config.load(None, {"rdb": {"port": 0, "kdb_port": -1, "hdb_dir": str(hdb)}}).rdb
    rdb = Rdb(cfg, date="2024-01-15")
    rdb.apply_batch("trade", trades())
    rdb.apply_batch("fill", fills())
    running = InThread(rdb)
    yield rdb
    running.stop()


@pytest.fixture(scope="module")
def pykx() -> Iterator[PyKX]:
    px = PyKX()
    yield px
    px.stop()


def websocket(rdb: Rdb, text: str, role: str = "query") -> QueryResult:
    c = Client(f"ws://127.0.0.1:{rdb.port}", token=local_token(role))
    try:
        lang, body = ("sql", text[2:]) if text.startswith("s)") else ("q", text)
        r = c.query(body, lang)
    finally:
        c.close()
    assert isinstance(r, QueryResult), r
    return r


def plain(v: object) -> object:
    """A value as both sides can give it: instants at microseconds (PyKX's datetime), times as ms."""
    if hasattr(v, "to_pydatetime"):
        v = v.floor("us").to_pydatetime()  # type: ignore[union-attr]
    if isinstance(v, dt.datetime):
        return v.replace(tzinfo=None).isoformat(timespec="microseconds")
    if isinstance(v, dt.time):
        return (v.hour * 3600 + v.minute * 60 + v.second) * 1000 + v.microsecond // 1000
    if isinstance(v, dt.timedelta):
        return round(v / dt.timedelta(milliseconds=1))
    return v


ALL_TYPES = (
    "s) SELECT true AS b, 7::UTINYINT AS x, 3::SMALLINT AS h, 2::INTEGER AS i, 1::BIGINT AS j, "
    "1.5::REAL AS e, 2.25::DOUBLE AS f, 'IBM' AS s, TIMESTAMP_NS '2024-01-15 10:00:00.123456789' AS p, "
    "DATE '2024-01-15' AS d, "
    "TIME '10:00:01.5' AS t, NULL::BIGINT AS jn, 'NaN'::DOUBLE AS fn"
)


def test_each_type_as_the_websocket_path_gives_it(rdb: Rdb, pykx: PyKX) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("query"))
    cls, t, value, types = pykx.query(h, ALL_TYPES)
    assert (cls, t) == ("Table", 98)
    assert types == [
        1,
        4,
        5,
        6,
        7,
        8,
        9,
        11,
        12,
        14,
        19,
        7,
        9,
    ]  # boolean byte short int long real float symbol ...
    want = from_ipc(websocket(rdb, ALL_TYPES).arrow).to_pydict()
    assert list(value) == list(want)
    for name in want:
        got = [plain(v) for v in value[name]]
        exp = [plain(v) for v in want[name]]
        if name == "fn":
            assert np.isnan(got[0]) and np.isnan(exp[0])
        elif name == "jn":
            assert exp == [None] and str(got[0]) in ("None", "<NA>", str(-(2**63)))  # 0Nj
        else:
            assert got == exp, name
    pykx.close(h)


@pytest.mark.parametrize(
    "text, cls, qtype",
    [
        ("select from trade", "Table", 98),
        ("select from trade where sym=`IBM", "Table", 98),
        ("select from trade where size>5000", "Table", 98),  # empty
        ("s) SELECT sym, sum(size) AS n FROM trade GROUP BY sym ORDER BY sym", "Table", 98),
    ],
)
def test_tables_match_the_websocket_path(rdb: Rdb, pykx: PyKX, text: str, cls: str, qtype: int) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("query"))
    got_cls, t, value, types = pykx.query(h, text)
    want = from_ipc(websocket(rdb, text).arrow).to_pydict()
    assert (got_cls, t) == (cls, qtype)
    assert {k: [plain(v) for v in vs] for k, vs in value.items()} == {
        k: [plain(v) for v in vs] for k, vs in want.items()
    }
    if "time" in want:
        assert types[0] == 12  # time as a q timestamp
    pykx.close(h)


def test_keyed_table_atom_list_and_dict(rdb: Rdb, pykx: PyKX) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("query"))
    text = "select last price, n:count i by sym from trade"
    cls, t, value, types = pykx.query(h, text)
    ws = websocket(rdb, text)
    assert (cls, t, ws.keys) == ("KeyedTable", 99, 1)
    rows = from_ipc(ws.arrow).to_pylist()
    assert value == {(r["sym"],): {"price": r["price"], "n": r["n"]} for r in rows}
    assert types == [11, 9, 7]
    assert pykx.query(h, "count trade")[:3] == ("LongAtom", -7, 6)
    assert pykx.query(h, "exec price from trade where sym=`IBM")[:3] == (
        "FloatVector",
        9,
        [101.5, 102.0, 100.125],
    )
    cls, t, value, _ = pykx.query(h, "exec sym, price from trade")
    assert (cls, t, value["sym"][:2]) == ("Dictionary", 99, ["IBM", "MSFT"])
    text = "exec last price by sym from trade"  # q: a dictionary from each sym to its last price
    cls, t, value, _ = pykx.query(h, text)
    rows = from_ipc(websocket(rdb, text).arrow).to_pylist()
    assert (cls, t) == ("Dictionary", 99) and value == {r["sym"]: r["price"] for r in rows} and len(rows) >= 2
    pykx.close(h)


def test_errors_are_q_errors_and_the_connection_goes_on(rdb: Rdb, pykx: PyKX) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("query"))
    with pytest.raises(RuntimeError, match="QError: nope: no such column"):
        pykx.query(h, "select nope from trade")
    with pytest.raises(RuntimeError, match="QError: refused: DROP"):
        pykx.query(h, "s) DROP TABLE trade")
    assert pykx.query(h, "count trade")[2] == 6
    pykx.close(h)


def test_desk_restriction_as_on_the_websocket(rdb: Rdb, pykx: PyKX) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("desk:equity-tech"))
    _, _, value, _ = pykx.query(h, "select from fill")
    assert value["account"] == ["TECH01", "TECH01"]
    want = from_ipc(websocket(rdb, "select from fill", "desk:equity-tech").arrow).to_pydict()
    assert value["exec_id"] == want["exec_id"] == ["e0", "e2"]
    assert pykx.query(h, "s) SELECT count(*) AS n FROM fill")[2] == {"n": [2]}
    pykx.close(h)


def test_bad_credentials_and_roles_are_refused(rdb: Rdb, pykx: PyKX) -> None:
    port = rdb.kdb.port.port
    with pytest.raises(RuntimeError, match="Authentication error|access"):
        pykx.connect(port, "not-a-token")
    with pytest.raises(ConnectionRefusedError):
        QClient(port, local_token("publisher"))  # no role query
    with pytest.raises(ConnectionRefusedError):
        QClient(port, "")
    assert rdb.kdb.port.bad["unauthorized"] >= 3


def test_malformed_frames_get_an_error_and_the_server_keeps_serving(rdb: Rdb) -> None:
    c = QClient(rdb.kdb.port.port, local_token("query"))
    c.send_raw(bytes.fromhex("01010000") + (14).to_bytes(4, "little") + bytes([0x4D, 0, 0, 0, 0, 0]))
    assert "unknown type byte 77" in c.recv().obj.text
    c.send_raw(bytes.fromhex("01010000") + (18).to_bytes(4, "little") + bytes.fromhex("07000300000001000000"))
    assert "truncated message" in c.recv().obj.text
    assert c.query("count trade") == qipc.Atom(-7, 6)  # same connection, still served
    c.send(qipc.vector(7, [1, 2]))
    assert "nyi: the rdb answers a query as a string" in c.recv().obj.text
    c.send_raw(bytes.fromhex("01010000") + (3).to_bytes(4, "little"))  # bad length: the framing is lost
    m = c.recv()
    assert m.obj.text == "bad length 3"
    with pytest.raises((ConnectionResetError, OSError)):
        c.recv(5)
    again = QClient(rdb.kdb.port.port, local_token("query"))
    assert again.query("count trade") == qipc.Atom(-7, 6)
    again.close()


def test_async_is_evaluated_without_reply_and_compressed_input_is_read(rdb: Rdb) -> None:
    c = QClient(rdb.kdb.port.port, local_token("query"))
    c.send(qipc.chars("count trade"), qipc.ASYNC)
    c.send(qipc.chars("select nope from trade"), qipc.ASYNC)  # an async error: logged, no reply
    long_query = "select from trade where sym in `IBM`MSFT" + " " * 4000
    c.send(qipc.chars(long_query), qipc.SYNC, compress=True)
    m = c.recv()
    assert m.msgtype == qipc.RESPONSE and isinstance(m.obj, qipc.Table)
    assert qipc.to_arrow(m.obj).column("sym").to_pylist() == ["IBM", "MSFT", "IBM", "MSFT", "IBM"]
    c.close()


def test_replies_to_a_remote_peer_are_compressed_as_kdb_does() -> None:
    big = qipc.from_arrow(trades().take([0, 1, 2, 3, 4, 5] * 200))
    plain_msg = qipc.frame(big)
    assert plain_msg[2] == 0 and len(plain_msg) > qipc.COMPRESS_MIN
    packed = qipc.frame(big, compress=True)  # what KdbConn.push sends when the peer is not loopback
    assert packed[2] == 1 and qipc.unframe(packed)[1].columns == big.columns


def test_a_cut_result_is_a_limit_error_never_a_partial_table(rdb: Rdb) -> None:
    from rdb.kdb import reply_of

    whole = websocket(rdb, "select from trade")
    assert isinstance(reply_of(whole), qipc.Table) and len(reply_of(whole)) == 6
    cut = rdb.service.query(
        Query(sql="select from trade", lang="q", max_rows=2)
    )  # as rdb.max_result_rows = 2
    assert isinstance(cut, QueryResult) and cut.truncated and cut.rows == 2
    err = reply_of(cut)
    assert isinstance(err, qipc.QError) and err.text.startswith("limit: cut at 2 rows")


def count_in(res: QueryResult | Error | None) -> int:
    assert isinstance(res, QueryResult), res
    return from_ipc(res.arrow).column(0)[0].as_py()


def test_a_known_count_is_the_same_answer_and_follows_new_rows(store: Store) -> None:
    svc = Service(store, max_rows=100)
    store.append("trade", trades().slice(0, 4))
    store.append("fill", fills())
    q = Query(sql="count trade", lang="q")
    assert svc.quick(q) is None  # never counted yet
    first = svc.query(q)
    known = svc.quick(q)
    assert count_in(first) == 4 and known is not None and known.arrow == first.arrow
    assert isinstance(first, QueryResult) and first.sql == 'SELECT count(*) AS x FROM "trade"'
    same = ("columns", "types", "rows", "truncated", "shape", "keys", "sql", "note")
    assert [getattr(known, f) for f in same] == [getattr(first, f) for f in same]
    store.append("trade", trades().slice(4))  # new rows: the count is not known any more
    assert svc.quick(q) is None
    assert count_in(svc.query(q)) == 6 == count_in(svc.quick(q))
    store.append("trade", trades())  # the same rows again (dropped as already held): still known
    assert count_in(svc.quick(q)) == 6
    as_json = Query(sql="count trade", lang="q", format="json")
    assert svc.quick(as_json) is None  # known per format
    assert svc.query(as_json).data == [[6]] == svc.quick(as_json).data  # type: ignore[union-attr]
    # a desk counts its own rows only, never the unrestricted count (nor another desk's)
    qf, tech = Query(sql="count fill", lang="q"), frozenset({"TECH01"})
    assert count_in(svc.query(qf)) == 4 == count_in(svc.quick(qf))
    assert svc.quick(qf, tech) is None
    assert count_in(svc.query(qf, tech)) == 2 == count_in(svc.quick(qf, tech))
    assert svc.quick(qf, frozenset({"DIV02"})) is None
    for _ in range(2):  # the desk rewrite is remembered per statement: the same rows, the same refusal
        rows = svc.query(Query(sql="select from fill", lang="q"), tech)
        assert isinstance(rows, QueryResult) and from_ipc(rows.arrow)["account"].to_pylist() == ["TECH01"] * 2
        e = svc.query(Query(sql="SELECT * FROM duckdb_tables()"), tech)
        assert isinstance(e, Error) and "duckdb_tables() is not available to a desk-restricted" in e.reason
    # refusals: the same every time, never remembered
    for text in ("count nosuch", "count trade where", "count trade; count fill"):
        errs = [svc.query(Query(sql=text, lang="q")) for _ in range(2)]
        assert isinstance(errs[0], Error) and errs[0].reason == errs[1].reason  # type: ignore[union-attr]
        assert svc.quick(Query(sql=text, lang="q")) is None
    svc.recovery.begin("test: replaying")  # while the rdb recovers nothing is answered at once
    assert svc.quick(q) is None
    svc.recovery.done()
    assert count_in(svc.quick(q)) == 6
    store.roll("2024-01-16")  # a new day: counted again
    assert svc.quick(q) is None and count_in(svc.query(q)) == 0


def test_a_text_that_reads_the_clock_is_translated_each_time(store: Store) -> None:
    svc = Service(store)
    a = svc.translate(".z.p")
    time.sleep(0.002)
    b = svc.translate(".z.p")
    assert a is not None and b is not None and a.clock and a.sql != b.sql
    assert svc.translate("count trade") is svc.translate("count trade")  # remembered


def test_count_through_pykx_is_known_after_the_first_and_per_desk(rdb: Rdb, pykx: PyKX) -> None:
    h = pykx.connect(rdb.kdb.port.port, local_token("query"))
    assert pykx.query(h, "count fill")[2] == 4
    assert rdb.service.quick(Query(sql="count fill", lang="q")) is not None
    assert pykx.query(h, "count fill")[:3] == ("LongAtom", -7, 4) == pykx.query(h, "count (fill)")[:3]
    d = pykx.connect(rdb.kdb.port.port, local_token("desk:equity-tech"))
    assert pykx.query(d, "count fill")[2] == 2 == pykx.query(d, "count fill")[2]
    assert from_ipc(websocket(rdb, "count fill", "desk:equity-tech").arrow).column(0).to_pylist() == [2]
    assert pykx.query(h, "count fill")[2] == 4
    pykx.close(d)
    pykx.close(h)
