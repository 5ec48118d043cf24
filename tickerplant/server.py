"""`marginflow tp`: the websocket shell around the tickerplant core and its journal (JournaledCore):
frames in, the core's writes done, then its frames out; a flush timer, an fsync timer.

Each connection has a bounded outgoing queue and its own writer task, so a slow reader only ever
fills its own queue; when that is full the connection is closed with a reason (code 4001). A frame for
a connection with nothing queued and a transport that is not paused is written at once
(`process.write_now`): no queue hop and task switch per frame, which was most of a zero-latency
publish's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
from dataclasses import dataclass

import websockets
from websockets.asyncio.server import ServerConnection, serve

from marginflow import auth, metrics, process
from marginflow import config as configuration
from marginflow.config import AccessConfig, BusConfig, TickerplantConfig
from tickerplant.bus import Bridge
from tickerplant.core import Frames, warm_layouts
from tickerplant.journal_writer import JournaledCore, JournalInUse, JournalLayoutChanged
from tickerplant.kdb import TickerplantKdb

log = logging.getLogger("marginflow.tp")
SLOW_CONSUMER = 4001


@dataclass
class Peer:
    ws: ServerConnection
    queue: asyncio.Queue[bytes]
    writer: asyncio.Task | None = None
    closing: bool = False


class TickerplantServer:
    def __init__(
        self,
        cfg: TickerplantConfig,
        access: AccessConfig | None = None,
        origins: frozenset[str] | None = None,
        bus: BusConfig | None = None,
    ):
        self.cfg = cfg
        self.access = access or configuration.current_access()
        # every connection needs a valid token (roles are checked per message by the core)
        self.gate = auth.Gate(
            self.access, origins if origins is not None else auth.configured_origins(self.access)
        )
        self.tp = JournaledCore(cfg, queue_depth=self._queue_depth)
        self.core = self.tp.core
        self.metrics = metrics.TickerplantMetrics()
        self.metrics.watch(self.core, self.tp.journal.sizes, self._queue_depths)
        self.tp.journal.on_sync = self.metrics.fsync_seconds.observe
        self.peers: dict[int, Peer] = {}
        self.ids = itertools.count(1)
        self.server = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self.kdb = TickerplantKdb(self, cfg.kdb_port) if cfg.kdb_port else None  # kdb+ IPC port
        bus = bus or configuration.current().bus
        self.bus = (
            Bridge(bus, self.core.root, lambda: self.core.journaled_seq) if bus.kind == "nats" else None
        )

    def _queue_depth(self, conn: int) -> tuple[int, int]:
        peer = self.peers.get(conn)
        return (peer.queue.qsize(), self.cfg.subscriber_queue_frames) if peer is not None else (0, 0)

    def _queue_depths(self) -> dict[int, int]:
        return {c: p.queue.qsize() for c, p in self.peers.items() if c in self.core.subs}

    def readiness(self) -> str:
        """/readyz: "" when the journal is open and the port listening, else why not."""
        return "" if self.server is not None and self.tp.journal.files else "journal not open"

    async def start(self) -> None:
        warm_layouts()
        scans = self.tp.open().scans
        for s in scans:
            if s.repaired:
                log.warning("journal %s: %s", s.path, s.repaired)
        log.info(
            "journal %s date %s, continuing after seq %d", self.core.root, self.core.date, self.core.last_seq
        )
        auth.check_bind("tickerplant", self.cfg.host, self.access)
        self.server = await serve(
            self.handle,
            self.cfg.host,
            self.cfg.port,
            max_size=self.cfg.max_message_bytes,
            max_queue=64,
            compression=None,
            process_request=metrics.process_request(self.gate, self.metrics, self.readiness),
            ssl=auth.server_ssl(self.access),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.kdb is not None:
            await self.kdb.port.start()
        if self.bus is not None:  # after journaling, every batch also to NATS JetStream (tickerplant/bus.py)
            self.bus.date = self.core.date
            self.tp.on_written = self.bus.on_written
            await self.bus.start()
        self._tasks.append(asyncio.create_task(self._timer()))
        if self.cfg.fsync == "interval":
            self._tasks.append(asyncio.create_task(self._sync_timer()))
        log.info("tickerplant listening on %s://%s:%d", auth.scheme(self.access), self.cfg.host, self.port)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.send(self.tp.flush())
        if self.kdb is not None:
            await self.kdb.port.stop()
        for peer in list(self.peers.values()):
            await self._drain(peer)
        if self.server:
            self.server.close()
            await self.server.wait_closed()
        self.tp.close()
        if self.bus is not None:
            await self.bus.stop()

    async def _drain(self, peer: Peer, timeout: float = 2.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not peer.queue.empty() and not peer.closing:
                    await asyncio.sleep(0.005)
        except TimeoutError:
            pass

    async def _timer(self) -> None:
        interval = self.cfg.publish_interval_ms / 1000
        while True:
            await asyncio.sleep(interval if interval > 0 else 0.05)
            self.send(self.tp.flush())
            self.send(self.tp.maybe_roll())

    async def _sync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.fsync_interval_ms / 1000)
            self.tp.journal.sync()

    def send(self, frames: Frames) -> None:
        """Frames to their connections (JournaledCore returns them only after their rows are written)."""
        for conn, frame in frames:
            peer = self.peers.get(conn)
            if peer is None or peer.closing:
                if peer is None and self.kdb is not None:
                    self.kdb.deliver(conn, frame)
                continue
            if peer.queue.empty() and process.write_now(peer.ws, frame):
                continue
            try:
                peer.queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.disconnect(
                    conn, f"slow consumer: {peer.queue.maxsize} frames queued; resubscribe and replay"
                )

    def disconnect(self, conn: int, reason: str) -> None:
        peer = self.peers.get(conn)
        if peer is None or peer.closing:
            return
        peer.closing = True
        self.metrics.cutoffs.inc()
        self.core.drop(conn)
        log.warning("disconnecting connection %d (%s): %s", conn, peer.ws.remote_address, reason)
        if peer.writer:
            peer.writer.cancel()
        peer.ws.close_timeout = 1
        asyncio.create_task(peer.ws.close(SLOW_CONSUMER, reason[:120]))

    async def _write(self, peer: Peer) -> None:
        while True:
            frame = await peer.queue.get()
            await peer.ws.send(frame)

    def receive(self, conn: int, data: bytes, name: str) -> None:
        """One frame from a connection (websocket or kdb+ port) into the core; its frames out."""
        self.send(self.tp.on_frame(conn, data, name))
        if self.cfg.publish_interval_ms <= 0:
            self.send(self.tp.flush())

    async def handle(self, ws: ServerConnection) -> None:
        conn = next(self.ids)
        peer = Peer(ws, asyncio.Queue(maxsize=self.cfg.subscriber_queue_frames))
        peer.writer = asyncio.create_task(self._write(peer))
        self.peers[conn] = peer
        self.core.connect(conn, self.gate.principals.get(ws))
        name = f"{ws.remote_address[0]}:{ws.remote_address[1]}" if ws.remote_address else ""
        zero_latency = self.cfg.publish_interval_ms <= 0
        try:
            async for data in ws:
                if isinstance(data, str):
                    data = data.encode()
                self.send(self.tp.on_frame(conn, data, name))
                if zero_latency:
                    self.send(self.tp.flush())
        except websockets.ConnectionClosed as e:
            if e.sent is not None and e.sent.code == 1009:
                self.core.oversized()
                log.warning(
                    "connection %d sent a frame over max_message_bytes=%d", conn, self.cfg.max_message_bytes
                )
        finally:
            self.core.drop(conn)
            if not peer.closing and peer.writer:
                # let queued replies (acks, errors) go out before the writer stops
                await self._drain(peer, 0.5)
                peer.writer.cancel()
            self.peers.pop(conn, None)


async def run(cfg: TickerplantConfig, ready: asyncio.Event | None = None) -> None:
    server = TickerplantServer(cfg)
    await process.serve_until_stopped(
        server,
        lambda: (
            f"tickerplant ready {auth.scheme(server.access)}://{cfg.host}:{server.port} "
            f"journal={cfg.journal_dir}"
        ),
        ready,
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow tp", description=__doc__)
    ap.add_argument("--config", help="config file merged over the embedded defaults")
    ap.add_argument("--port", type=int, help="port (0 = any free port)")
    ap.add_argument("--journal", help="journal folder")
    ap.add_argument("--publish-interval-ms", type=float, help="0 = zero-latency mode")
    args = ap.parse_args(argv)
    overrides: dict = {}
    if args.port is not None:
        overrides["port"] = args.port
    if args.journal:
        overrides["journal_dir"] = args.journal
    if args.publish_interval_ms is not None:
        overrides["publish_interval_ms"] = args.publish_interval_ms
    cfg = configuration.load(args.config, {"tickerplant": overrides}).tickerplant
    process.setup_logging("tp")
    try:
        asyncio.run(run(cfg))
    except (JournalInUse, JournalLayoutChanged) as e:  # refused before it touched a file: a second
        log.error("%s", e)  # tickerplant on the same journal, or a day journaled in other columns
        return 2
    return 0
