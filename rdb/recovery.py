"""Whether the rdb holds the whole day yet: "recovering" from start until its subscription has replayed the
tickerplant's journal (the first `live` event), and again during each replay after a reconnect; "live" then.
A query never answers from a partial day: it waits for recovery to finish (up to a limit) or gets an Error
saying the rdb is recovering, with the progress so far. Plain state, thread-safe (queries wait in worker
threads; the subscription updates it from the event loop).

States: "standalone" (no tickerplant followed: the rows are whatever was applied), "recovering", "live",
"failed" (the subscription stopped on an error, e.g. the tickerplant refused it: queries say so, never answer
from what was applied before).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from schemas.wire import JournalPosition


class Recovery:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.state = "standalone"
        self.reason = ""  # why recovering: "starting", "reconnected"
        self.position: JournalPosition | None = None  # the tickerplant's position the replay runs up to
        self.replayed = 0  # rows applied from the journal during this replay
        self.replayed_seq = -1  # highest seq applied during this replay
        self.recoveries = 0  # replays finished (1 after start, +1 per reconnect that replayed rows)
        self.since = time.monotonic()
        self.last_replay_s = 0.0

    # ---- driven by the subscription ------------------------------------------------------------------
    def begin(self, reason: str, position: JournalPosition | None = None) -> None:
        """Queries wait from now until `done`."""
        with self._cond:
            self.state, self.reason, self.position = "recovering", reason, position
            self.replayed, self.replayed_seq = 0, -1
            self.since = time.monotonic()

    def session(self, position: JournalPosition | None) -> None:
        """A new subscription session replays up to `position` (still recovering if it was)."""
        with self._cond:
            self.position = position

    def progress(self, rows: int, last_seq: int) -> None:
        with self._cond:
            self.replayed += rows
            self.replayed_seq = max(self.replayed_seq, last_seq)

    def done(self) -> None:
        """Replay finished: the rdb holds every row up to the position; waiting queries go on."""
        with self._cond:
            if self.state == "recovering":
                self.recoveries += 1
                self.last_replay_s = time.monotonic() - self.since
            self.state = "live"
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """The subscription stopped: every query gets an Error naming `reason` until a new `begin`."""
        with self._cond:
            self.state, self.reason = "failed", " ".join(reason.split())[:300]
            self._cond.notify_all()

    # ---- asked by queries ----------------------------------------------------------------------------
    @property
    def recovering(self) -> bool:
        return self.state == "recovering"

    def wait(self, timeout_s: float) -> bool:
        """True once not recovering (at once if not), False if still recovering after `timeout_s`."""
        with self._cond:
            self._cond.wait_for(lambda: self.state != "recovering", timeout=max(0.0, timeout_s))
            return self.state in ("live", "standalone")

    def describe(self) -> str:
        """One line for an Error: what is being replayed and how far it got."""
        with self._cond:
            if self.state == "failed":
                return (
                    f"failed: the rdb stopped following the tickerplant ({self.reason}); its tables may miss "
                    "rows, so it answers no query until it is restarted"
                )
            p = self.position
            where = (
                f"the tickerplant's journal of {p.date} up to seq {p.last_seq}"
                if p is not None
                else "the tickerplant's journal (not reached yet)"
            )
            return (
                f"recovering: the rdb is replaying {where} ({self.reason}); {self.replayed} rows replayed "
                f"so far, up to seq {self.replayed_seq}, for {time.monotonic() - self.since:.1f} s; "
                "no answer from a partial day, try again shortly"
            )

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            p = self.position
            return {
                "state": self.state,
                "reason": self.reason,
                "replayed_rows": self.replayed,
                "replayed_seq": self.replayed_seq,
                "position": None if p is None else {"date": p.date, "last_seq": p.last_seq},
                "recoveries": self.recoveries,
                "last_replay_s": round(self.last_replay_s, 3),
            }


class LiveLag:
    """How far the rdb's rows trail the tickerplant once live. The subscription reads live batches in
    chunks (rdb.live_chunk_ms): a chunk is the batches read in one go, ending at the first batch with no
    more behind it. Per chunk: the age of its oldest row (the tickerplant's `time` stamp) when the chunk was
    applied, in ms. Plain state, read by the status request from worker threads."""

    def __init__(self, chunk_ms: float = 0.0) -> None:
        self.chunk_ms = chunk_ms
        self.chunks = 0  # chunks applied
        self.batches = 0  # live batches applied
        self.last_ms = 0.0  # the last chunk's lag
        self.max_ms = 0.0  # the largest lag of any chunk so far
        self.applied_at = 0.0  # time.time() the last chunk was applied (0: none yet)
        self._oldest_ns = 0  # time stamp of the current chunk's oldest row (0: no chunk open)

    def batch(self, first_time_ns: int, more: bool, now_ns: int | None = None) -> None:
        """A live batch whose first row was stamped `first_time_ns` was applied; `more`: batches are read
        behind it (the chunk goes on)."""
        self.batches += 1
        if not self._oldest_ns:
            self._oldest_ns = first_time_ns
        if more:
            return
        now_ns = time.time_ns() if now_ns is None else now_ns
        self.last_ms = max(0.0, (now_ns - self._oldest_ns) / 1e6)
        self.max_ms = max(self.max_ms, self.last_ms)
        self.chunks += 1
        self.applied_at = now_ns / 1e9
        self._oldest_ns = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "chunk_ms": self.chunk_ms,
            "chunks": self.chunks,
            "batches": self.batches,
            "lag_ms": round(self.last_ms, 3),
            "max_lag_ms": round(self.max_ms, 3),
            "applied_at": round(self.applied_at, 3),
        }
