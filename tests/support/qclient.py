"""Clients of the kdb+ IPC ports for tests and the benchmark.

`QClient`: a blocking raw-socket client built on marginflow.qipc (for what PyKX cannot do here:
malformed frames, compressed input, reading pushed async messages one by one).
`PyKX`: PyKX's SyncQConnection (RawQConnection for a subscriber) in a child process. PyKX's connect
and receive block in C holding the GIL, so a server running in the test's own process (its event loop
in a thread) would never get to answer: the child imports PyKX once (unlicensed mode) and runs what
the test asks, returning plain Python values (`.py()`) and the q type of the result.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import time
from typing import Any

from marginflow import qipc


class QClient:
    def __init__(
        self, port: int, token: str, user: str = "test", host: str = "127.0.0.1", capability: int = 3
    ):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(qipc.hello(user, token, capability))
        reply = self.sock.recv(1)
        if len(reply) != 1:
            self.sock.close()
            raise ConnectionRefusedError("access: the handshake was refused")
        self.capability = reply[0]
        self.rx = qipc.Receiver()
        self.rx.hello = qipc.Hello(user, token, capability)  # (the server's side of the handshake is done)
        self.pending: list[Any] = []

    def send(self, obj: Any, msgtype: int = qipc.SYNC, compress: bool = False) -> None:
        self.sock.sendall(qipc.frame(obj, msgtype, compress))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, timeout: float = 10.0) -> qipc.Message | qipc.BadMessage:
        self.sock.settimeout(timeout)
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionResetError("closed by the server")
            self.pending += self.rx.feed(data)
        return self.pending.pop(0)

    def call(self, obj: Any, timeout: float = 10.0) -> Any:
        """A sync message and its response (pushed async messages received meanwhile are kept)."""
        self.send(obj, qipc.SYNC)
        kept = []
        while True:
            m = self.recv(timeout)
            if isinstance(m, qipc.Message) and m.msgtype == qipc.RESPONSE:
                self.pending = kept + self.pending
                return m.obj
            kept.append(m)

    def query(self, text: str) -> Any:
        return self.call(qipc.chars(text))

    def close(self) -> None:
        self.sock.close()


def _worker(pipe: Any) -> None:  # runs in the child process
    os.environ["PYKX_UNLICENSED"] = "true"
    os.environ.setdefault("QARGS", "--unlicensed")
    import pykx as kx

    conns: dict[int, Any] = {}
    loop = asyncio.new_event_loop()  # for RawQConnection's awaitables
    while True:
        op, args = pipe.recv()
        try:
            if op == "stop":
                break
            if op == "connect":
                port, user, password = args
                c = kx.SyncQConnection(
                    "127.0.0.1", port, username=user, password=password, no_ctx=True, timeout=20.0
                )
                hid = max(conns, default=0) + 1
                conns[hid] = c
                pipe.send(("ok", hid))
            elif op == "query":
                hid, text = args
                r = conns[hid](text)
                pipe.send(("ok", (type(r).__name__, int(r.t), r.py(), _column_types(kx, r))))
            elif op == "upd":
                hid, table, columns, wait, form = args  # columns: {name: (q type char, values)}
                import pandas as pd

                frame = pd.DataFrame({n: pd.Series(v, dtype=_dtype(t)) for n, (t, v) in columns.items()})
                data = kx.toq(frame)  # (kx.Table(...) needs a licence; a DataFrame converts without one)
                if form == "columns":  # what PyKX's own conn.upd sends: the table's columns as a list
                    data = data._values
                r = conns[hid](b".u.upd", kx.SymbolAtom(table), data, wait=wait)
                pipe.send(("ok", None if r is None else r.py()))
            elif op == "time_query":  # the benchmark: wall seconds of each of n round trips
                hid, text, n = args
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = conns[hid](text)
                    times.append(time.perf_counter() - t0)
                pipe.send(("ok", (times, len(r) if int(r.t) >= 0 else 1)))
            elif op == "upd_many":  # the benchmark: n async .u.upd of one frame, then a sync one
                hid, table, columns, n = args
                import pandas as pd

                frame = pd.DataFrame({k: pd.Series(v, dtype=_dtype(t)) for k, (t, v) in columns.items()})
                data = kx.toq(frame)
                t0 = time.perf_counter()
                for _ in range(n):
                    conns[hid](b".u.upd", kx.SymbolAtom(table), data, wait=False)
                conns[hid](b".u.upd", kx.SymbolAtom(table), data)
                pipe.send(("ok", time.perf_counter() - t0))
            elif op == "subscribe":  # RawQConnection (unlicensed: pushed messages are read with poll_recv)
                port, user, password, table = args
                raw = loop.run_until_complete(_raw_connect(kx, port, user, password))
                fut = raw(b".u.sub", kx.SymbolAtom(table), kx.SymbolAtom(""))
                raw.poll_send()
                answer = loop.run_until_complete(asyncio.wait_for(fut, 20))
                hid = max(conns, default=0) + 1
                conns[hid] = raw
                first, second = answer.py()
                pipe.send(("ok", (hid, first, list(second))))
            elif op == "receive":  # pushed (fn; table; data) messages until `rows` rows or the timeout
                hid, rows, timeout = args
                got: list[tuple[str, str, list[int]]] = []
                deadline = time.monotonic() + timeout
                while sum(len(g[2]) for g in got) < rows and time.monotonic() < deadline:
                    m = conns[hid].poll_recv()  # (its select does not wait: timeout 0)
                    if m is not None:
                        fn, table, data = m.py()
                        got.append((fn, table, list(data["seq"])))
                pipe.send(("ok", got))
            elif op == "close":
                c = conns.pop(args[0])
                if isinstance(c, kx.RawQConnection):
                    loop.run_until_complete(c.close())
                else:
                    c.close()
                pipe.send(("ok", None))
        except BaseException as e:  # the test sees the error's type and text
            pipe.send(("error", f"{type(e).__name__}: {e}"))


async def _raw_connect(kx: Any, port: int, user: str, password: str) -> Any:
    return await kx.RawQConnection(
        "127.0.0.1", port, username=user, password=password, no_ctx=True, timeout=0.0
    )


def _column_types(kx: Any, r: Any) -> list[int]:
    """The q type number of each column of a (keyed) table, keys first; [] for anything else."""
    if isinstance(r, kx.KeyedTable):
        return _column_types(kx, r.keys()) + _column_types(kx, r.values())
    if isinstance(r, kx.Table):
        return [int(col.t) for col in r._values]
    return []


def _dtype(t: str) -> str:
    return {"s": "object", "f": "float64", "j": "int64", "p": "datetime64[ns]"}[t]


class PyKX:
    """PyKX in a child process; each method returns what PyKX gave, or raises RuntimeError with its
    error text."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()

    def _ask(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        self.pipe.send((op, args))
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"PyKX {op}: no answer in {timeout} s")
        status, value = self.pipe.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def connect(self, port: int, password: str, user: str = "pykx") -> int:
        return self._ask("connect", port, user, password)

    def query(self, hid: int, text: str) -> tuple[str, int, Any, list[int]]:
        """(PyKX class name, q type number, value as Python, q types of a table's columns)."""
        return self._ask("query", hid, text)

    def upd(
        self,
        hid: int,
        table: str,
        columns: dict[str, tuple[str, list]],
        wait: bool = True,
        form: str = "table",
    ) -> Any:
        """`.u.upd[`table; data]` with data a PyKX Table (form "table") or its list of columns ("columns",
        as PyKX's conn.upd sends it); sync unless `wait` is False."""
        return self._ask("upd", hid, table, columns, wait, form)

    def time_query(self, hid: int, text: str, n: int) -> tuple[list[float], int]:
        return self._ask("time_query", hid, text, n, timeout=600)

    def upd_many(self, hid: int, table: str, columns: dict[str, tuple[str, list]], n: int) -> float:
        return self._ask("upd_many", hid, table, columns, n, timeout=600)

    def subscribe(self, port: int, password: str, table: str, user: str = "pykx") -> tuple[int, str, list]:
        """`.u.sub[`table; `]` from a PyKX RawQConnection: (its handle, the table's name, its columns)."""
        return self._ask("subscribe", port, user, password, table)

    def receive(self, hid: int, rows: int, timeout: float = 20.0) -> list[tuple[str, str, list[int]]]:
        """The (fn, table, seqs) of the messages pushed to a subscribed connection, until `rows` rows."""
        return self._ask("receive", hid, rows, timeout, timeout=timeout + 30)

    def close(self, hid: int) -> None:
        self._ask("close", hid)

    def stop(self) -> None:
        try:
            self.pipe.send(("stop", ()))
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
