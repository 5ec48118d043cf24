"""A minimal HTTP/1.1 client over asyncio streams for the REST and metrics tests and benchmarks/bench_rest.py:
one keep-alive connection, Content-Length bodies (or read to EOF), so a measured latency is the server's
and not a client library's."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any


class Http:
    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body); `body` bytes as is, anything else as JSON."""
        if self.writer is None:
            await self.__aenter__()
        assert self.reader is not None and self.writer is not None
        data = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        head = {"Host": f"{self.host}:{self.port}", "Content-Length": str(len(data))}
        if data:
            head["Content-Type"] = "application/json"
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        head.update(headers or {})
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode() + data)
        try:  # the head at once (one wake-up, not one per line)
            head_bytes = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            head_bytes = e.partial
        status_line, *lines = head_bytes.decode("latin-1").split("\r\n")
        got: dict[str, str] = {}
        for line in lines:
            if line:
                k, _, v = line.partition(":")
                got[k.strip().lower()] = v.strip()
        if "content-length" in got:
            payload = await self.reader.readexactly(int(got["content-length"]))
        else:
            payload = await self.reader.read()
            self.writer.close()
            self.writer = None
        return int(status_line.split()[1]), got, payload

    async def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _, payload = await self.request(method, path, body, **kw)
        return status, json.loads(payload) if payload else None


async def get(host: str, port: int, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET on a connection of its own."""
    async with Http(host, port, token) as h:
        return await h.request("GET", path, headers={"Connection": "close"})
