"""rdb limits and bad input: results capped in bytes before they are materialised (the 100,000 x 10 kB
repeat() attack answers at once, in bounded memory, over a real server), and every malformed, oversized or
unexpected request frame gets an Error reply on a connection that keeps working."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from websockets.sync.client import connect

from rdb import query, sandbox
from rdb.service import Service
from rdb.store import Store
from schemas.rdb import Error, Query, QueryResult, Status, StatusRequest
from tests.support.servers import rdb_process
from tests.support.tokens import with_token

ATTACK = "select repeat('x',10000) from range(100000)"  # 1 GB of strings; 4.9 GB through the old reply path
DECODE = msgspec.msgpack.Decoder(QueryResult | Error | Status)


def test_byte_cap_cuts_and_says_so(store: Store) -> None:
    cap = 1 << 20
    ans = query.run(
        store, "SELECT i, i * 0.5 AS x FROM range(1000000) t(i)", max_rows=1_000_000, max_bytes=cap
    )
    assert ans.truncated and ans.table is not None
    assert 0 < ans.rows < 1_000_000 and ans.table.nbytes <= cap
    assert ans.table.nbytes > cap * 0.9  # cut near the cap, not far below it
    assert ans.note.startswith(f"cut by bytes: at {ans.rows} rows, the byte limit of {cap} bytes")
    assert query.from_ipc(ans.arrow).column("i").to_pylist() == list(range(ans.rows))  # a prefix, in order
    small = query.run(store, "SELECT i FROM range(1000) t(i)", max_rows=1_000_000, max_bytes=cap)
    assert not small.truncated and small.rows == 1000 and small.note == ""
    rows = query.run(store, "SELECT i FROM range(1000) t(i)", max_rows=10, max_bytes=cap)
    assert rows.truncated and rows.rows == 10 and rows.note == "cut at 10 rows (the row limit)"


def test_one_value_over_the_cap_gives_no_rows(store: Store) -> None:
    ans = query.run(store, "SELECT repeat('y', 3000000) AS v", max_rows=10, max_bytes=1 << 20)
    assert ans.rows == 0 and ans.truncated and "cut by bytes" in ans.note


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_one_watchdog_interrupts_each_query_at_its_own_deadline(store: Store) -> None:
    """Two never-ending queries at once with different time limits, quick queries with a short limit
    beside them: each slow one is interrupted at its own limit, no quick one ever is."""
    slow = "SELECT count(*) FROM range(1000000000000) a(i) WHERE i % 7 = 3"
    took: dict[float, float] = {}

    def timed_out(limit: float) -> None:
        t0 = time.perf_counter()
        with pytest.raises(sandbox.QueryError, match=r"^timeout: "):
            query.run(store, slow, timeout_s=limit)
        took[limit] = time.perf_counter() - t0

    threads = [threading.Thread(target=timed_out, args=(s,)) for s in (1.2, 0.4)]
    for t in threads:
        t.start()
    for _ in range(30):  # each released well before its 0.25 s limit
        assert query.run(store, "SELECT 42 AS x", timeout_s=0.25).rows == 1
    for t in threads:
        t.join(20)
    assert 0.4 <= took[0.4] < took[1.2] and 1.2 <= took[1.2] < 10
    time.sleep(0.3)  # past every quick query's deadline: none of their cursors is interrupted late
    assert query.run(store, "SELECT 42 AS x", timeout_s=0.25).rows == 1


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_repeat_attack_in_process_is_quick(store: Store) -> None:
    service = Service(store, timeout_s=10, max_rows=100_000, max_bytes=64 << 20)
    for fmt in ("arrow", "json"):
        t0 = time.perf_counter()
        reply = service.handle(msgspec.msgpack.encode(Query(sql=ATTACK, format=fmt)))  # type: ignore[arg-type]
        elapsed = time.perf_counter() - t0
        r = DECODE.decode(reply)
        assert isinstance(r, QueryResult) and r.truncated and "cut by bytes" in r.note
        assert 0 < r.rows < 10_000 and len(reply) < (64 << 20) * 1.1
        assert elapsed < 3.0, (fmt, elapsed)


def _vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def rdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str]]:
    """One rdb process for the module's tests (each bad frame's test also finds it alive after the others)."""
    with rdb_process(tmp_path_factory.mktemp("limits") / "hdb") as running:
        yield running


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_repeat_attack_over_the_server_bounded_time_and_memory(
    rdb_server: tuple[subprocess.Popen, str],
) -> None:
    """Before: 12 s (past the 10 s limit) and ~3 GB in the rdb (more to encode and send the 1 GB reply).
    Now: cut at max_result_bytes (64 MiB) in well under a second, the server's peak RSS a few hundred MiB."""
    proc, url = rdb_server
    with connect(url, max_size=None, **with_token("query")) as ws:
        ws.send(msgspec.msgpack.encode(Query(sql="SELECT 1", id=1)))
        assert isinstance(DECODE.decode(ws.recv()), QueryResult)
        before = _vm_hwm_mib(proc.pid)
        t0 = time.perf_counter()
        ws.send(msgspec.msgpack.encode(Query(sql=ATTACK, id=2)))
        r = DECODE.decode(ws.recv(timeout=30))
        elapsed = time.perf_counter() - t0
        peak = _vm_hwm_mib(proc.pid)
        print(f"repeat attack: {elapsed:.2f} s, rdb peak RSS {before:.0f} -> {peak:.0f} MiB, {r.rows} rows")
        assert isinstance(r, QueryResult) and r.truncated and "cut by bytes" in r.note
        assert elapsed < 5.0
        assert peak - before < 600, (before, peak)
        ws.send(msgspec.msgpack.encode(Query(sql="SELECT 42 AS x", id=3, format="json")))
        ok = DECODE.decode(ws.recv())
        assert isinstance(ok, QueryResult) and ok.data == [[42]]


BAD_FRAMES: list[tuple[bytes | str, str]] = [
    (b"\x93garbage", "bad request:"),
    (b"", "bad request:"),
    (b"\xc1", "bad request:"),
    (msgspec.msgpack.encode({"type": "query"}), "bad request: Object missing required field `sql`"),
    (msgspec.msgpack.encode({"type": "query", "sql": 5}), "bad request: Expected `str`"),
    (msgspec.msgpack.encode({"type": "query", "sql": "SELECT 1", "max_rows": -1}), "bad request:"),
    (msgspec.msgpack.encode({"type": "query", "sql": "SELECT 1", "id": "7"}), "bad request: Expected `int`"),
    (msgspec.msgpack.encode({"type": "nope"}), "bad request:"),
    (msgspec.msgpack.encode([1, 2, 3]), "bad request:"),
    ("{", "bad request:"),
    ("[" * 100_000 + "]" * 100_000, "bad request:"),
    ('{"type": "query", "sql": "SELECT 1", "format": "csv"}', "bad request:"),
    (json.dumps({"type": "query", "sql": "x" * 1_000_001}), "bad request:"),
    (b"\x00" * (2 << 20), "bad request: 2097152 bytes, over the limit of 1048576 bytes per request"),
]


@pytest.mark.parametrize(("frame", "text"), BAD_FRAMES, ids=range(len(BAD_FRAMES)))
def test_bad_frames_get_an_error_and_the_connection_lives(
    rdb_server: tuple[subprocess.Popen, str], frame: bytes | str, text: str
) -> None:
    _, url = rdb_server
    with connect(url, max_size=None, **with_token("query")) as ws:
        ws.send(frame)
        reply = ws.recv(timeout=10)
        body = json.loads(reply) if isinstance(reply, str) else msgspec.msgpack.decode(reply)
        assert body["type"] == "error" and body["reason"].startswith(text), body["reason"][:200]
        assert "Traceback" not in body["reason"] and "\n" not in body["reason"]
        ws.send(msgspec.msgpack.encode(StatusRequest()))
        s = DECODE.decode(ws.recv(timeout=10))
        assert isinstance(s, Status) and s.bad_messages.get("bad request", 0) >= 1


def test_internal_failure_is_an_error_not_a_dead_service(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = Service(store, timeout_s=5, max_rows=10)

    def boom(*a: object, **k: object) -> None:
        raise MemoryError("out of memory in a test")

    monkeypatch.setattr(sandbox, "_execute", boom)
    r = DECODE.decode(service.handle(msgspec.msgpack.encode(Query(sql="SELECT 1", id=9))))
    assert isinstance(r, Error) and r.id == 9 and r.reason == "internal: MemoryError: out of memory in a test"
    monkeypatch.undo()
    assert isinstance(
        DECODE.decode(service.handle(msgspec.msgpack.encode(Query(sql="SELECT 1")))), QueryResult
    )
    assert service.errors["internal"] == 1


def test_the_sandbox_remembers_accepted_texts_only() -> None:
    """An accepted query's check is remembered by its text; a refused one is refused every time."""
    import duckdb

    con = duckdb.connect()
    ok = "SELECT 42 AS answer_remembered"
    sandbox._ACCEPTED.pop(ok, None)
    assert sandbox.check(con, ok) == ok and sandbox._ACCEPTED[ok] == ok
    assert sandbox.check(con, ok) == ok  # from memory
    bad = "CREATE TABLE stolen AS SELECT 1"
    for _ in range(2):
        with pytest.raises(sandbox.QueryError):
            sandbox.check(con, bad)
    assert bad not in sandbox._ACCEPTED
