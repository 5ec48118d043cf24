"""The thin asyncio shell of a kdb+ IPC port (asyncio.start_server), shared by the tickerplant's and
the rdb's (tickerplant/kdb.py, rdb/kdb.py): bytes in through marginflow.qipc.Receiver, the handshake
checked by the process's auth.Gate (the password is a marginflow token, the user part only says
who; failures throttled per address as on the websocket port), then each message handed to the
process's `on_message`; replies and pushes out through a bounded queue per connection.

A message that does not decode gets a q error (sync) or is counted and logged (async) and the
connection goes on; when the framing itself is lost (a bad header or length, a message over the
size limit) the error is sent and the connection closed: there is no way to find the next message.
A connection whose queue fills (a subscriber that does not read) is cut off, as on the websocket port.
Replies are compressed as kdb+ does: over 2,000 bytes, only to a peer not on this machine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from marginflow import auth, qipc

log = logging.getLogger("marginflow.kdb")
DIRECT_WRITE_BYTES = 1 << 20  # written at once while the transport holds less than this unsent


@dataclass(eq=False)
class KdbConn:
    id: int
    writer: asyncio.StreamWriter
    addr: str
    principal: auth.Principal | None = None
    compress: bool = False  # the peer is remote and agreed to a capability with compression
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(4096))
    task: asyncio.Task | None = None
    closing: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # the process's own per-connection state

    def push(self, obj: Any, msgtype: int = qipc.ASYNC) -> bool:
        """Queue one message; False (and the connection cut off) when its queue is full."""
        return self.push_bytes(qipc.frame(obj, msgtype, self.compress))

    def push_bytes(self, data: bytes) -> bool:
        if self.closing:
            return False
        transport = self.writer.transport
        if self.queue.empty() and not transport.is_closing():
            if transport.get_write_buffer_size() < DIRECT_WRITE_BYTES:
                self.writer.write(data)
                return True
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.cut_off(f"slow consumer: {self.queue.maxsize} messages queued")
            return False
        return True

    def cut_off(self, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        log.warning("kdb+ connection %d (%s): %s; closing", self.id, self.addr, reason)
        if self.task is not None:
            self.task.cancel()
        self.writer.transport.abort()

    async def write_queued(self) -> None:
        while True:
            data = await self.queue.get()
            self.writer.write(data)
            await self.writer.drain()


Handler = Callable[[KdbConn, int, Any], Awaitable[Any]]


class KdbPort:
    """One kdb+ IPC listening socket. `on_message(conn, msgtype, obj)` returns the reply of a sync
    message (a q object; a qipc.QError for a refusal); it is awaited one message at a time per
    connection. `on_open` / `on_close` let the process track its connections."""

    def __init__(
        self,
        what: str,
        host: str,
        port: int,
        gate: auth.Gate,
        on_message: Handler,
        *,
        max_bytes: int,
        queue_frames: int = 4096,
        ids: Iterator[int] | None = None,
        on_open: Callable[[KdbConn], None] | None = None,
        on_close: Callable[[KdbConn], None] | None = None,
    ):
        self.what, self.host, self.port = what, host, port
        self.gate = gate
        self.on_message = on_message
        self.max_bytes = max_bytes
        self.queue_frames = queue_frames
        self.ids = ids or itertools.count(1)
        self.on_open, self.on_close = on_open, on_close
        self.conns: dict[int, KdbConn] = {}
        self.bad: Counter[str] = Counter()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, 0 if self.port < 0 else self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("%s kdb+ IPC listening on %s:%d", self.what, self.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns.values()):
            conn.cut_off("server stopping")
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        addr = str(peer[0])
        conn = KdbConn(next(self.ids), writer, addr, queue=asyncio.Queue(self.queue_frames))
        rx = qipc.Receiver(max_bytes=self.max_bytes)
        try:
            while not conn.closing:
                data = await reader.read(1 << 20)
                if not data:
                    break
                for ev in rx.feed(data):
                    if isinstance(ev, qipc.Hello):
                        if not self._admit(conn, ev):
                            return
                    elif isinstance(ev, qipc.BadMessage):
                        self._bad(conn, ev)
                    else:
                        await self._message(conn, ev)
                if rx.dead:
                    await self._close_after_send(conn)
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._closed(conn)

    def _admit(self, conn: KdbConn, hello: qipc.Hello) -> bool:
        outcome = self.gate.token(conn.addr, hello.password)
        if isinstance(outcome, auth.Refusal):
            self.bad["unauthorized"] += 1
            log.warning(
                "%s kdb+ handshake from %s (user %r) refused: %s",
                self.what,
                conn.addr,
                hello.user,
                outcome.reason,
            )
            conn.writer.transport.abort()  # as kdb+ does: no reply byte ('access at the client)
            return False
        conn.principal = outcome
        conn.compress = hello.capability >= 1 and not auth.is_loopback(conn.addr)
        conn.writer.write(qipc.hello_reply(hello.capability))
        conn.task = asyncio.create_task(conn.write_queued())
        self.conns[conn.id] = conn
        if self.on_open is not None:
            self.on_open(conn)
        return True

    def _bad(self, conn: KdbConn, ev: qipc.BadMessage) -> None:
        self.bad["bad_message"] += 1
        log.warning("%s kdb+ connection %d (%s): %s", self.what, conn.id, conn.addr, ev.reason)
        if ev.msgtype == qipc.SYNC or ev.fatal:
            conn.push(qipc.QError(qipc.error_text(ev.reason)), qipc.RESPONSE)

    async def _message(self, conn: KdbConn, ev: qipc.Message) -> None:
        try:
            reply = await self.on_message(conn, ev.msgtype, ev.obj)
        except Exception as e:  # a bug: one q error, logged, never a dead port
            log.exception("%s kdb+ message failed", self.what)
            reply = qipc.QError(f"internal: {type(e).__name__}: {qipc.error_text(str(e))[:300]}")
        if ev.msgtype == qipc.SYNC:
            conn.push(qipc.NULL if reply is None else reply, qipc.RESPONSE)
        elif isinstance(reply, qipc.QError):
            self.bad["async_error"] += 1
            log.warning("%s kdb+ async message from %d refused: %s", self.what, conn.id, reply.text)

    async def _close_after_send(self, conn: KdbConn) -> None:
        try:
            async with asyncio.timeout(1.0):
                while not conn.queue.empty() and not conn.closing:
                    await asyncio.sleep(0.005)
                await conn.writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        conn.writer.close()

    def _closed(self, conn: KdbConn) -> None:
        if self.conns.pop(conn.id, None) is not None and self.on_close is not None:
            self.on_close(conn)
        if conn.task is not None:
            conn.task.cancel()
        conn.closing = True
        if not conn.writer.transport.is_closing():
            conn.writer.close()
