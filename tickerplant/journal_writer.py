"""The tickerplant's disk: the day's journal files and publisher-marks file, written as the core asks.

`JournalWriter` owns the files: at start it repairs the journal (a torn tail cut and kept in a side
file, an end-of-stream marker dropped so appends continue the stream), reads back what the core needs
to continue (`core.JournalState`), and rewrites the day's marks file with the valid marks; then it
performs the core's writes (`core.Append`, `core.AppendMarks`, `core.Roll`) and the fsync policy
(`fsync = "batch"`: after every write, the marks before the rows they mark; "interval": `sync` on the
server's timer; "none": the OS writes them).

One writer per journal folder: `open` takes an exclusive lock on `<journal>/.writer.lock` (flock, released
by the kernel when the process dies, also by SIGKILL) before it repairs anything, so a second tickerplant
started on the same folder stops with `JournalInUse` instead of cutting and interleaving the first one's
files. Readers (replay, subscribers' catch-up, `marginflow journal check`) do not take it. A day whose files
hold a table in other columns than this version's (an upgrade restarted mid-day) is refused the same way,
`JournalLayoutChanged`, before anything is appended to it.

`JournaledCore` is the core with its writer, no sockets: each call runs the core, performs its
writes, and only then returns the frames to send (so an ack leaves only after the rows it
acknowledges are written). The websocket server drives one; the core-level tests and the benchmark
drive one directly.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from marginflow.config import TickerplantConfig
from schemas.tables import TABLES
from tickerplant import dedupe, journal
from tickerplant.core import Append, AppendMarks, Frames, JournalState, Out, Roll, TickerplantCore, Write

LOCK_FILE = ".writer.lock"


class JournalLayoutChanged(RuntimeError):
    """A file of the day being reopened was journaled with other columns than this version's tables."""


def layout_difference(have: pa.Schema, want: pa.Schema) -> str:
    """What a journal file's schema lacks, adds or types otherwise against the table's ('' if the same)."""
    got = {f.name: f.type for f in have}
    need = {f.name: f.type for f in want}
    parts = [f"missing {n}" for n in need if n not in got]
    parts += [f"unknown {n}" for n in got if n not in need]
    parts += [f"{n} is {got[n]}, not {t}" for n, t in need.items() if n in got and got[n] != t]
    if not parts and have.names != want.names:
        parts.append(f"columns in the order {', '.join(have.names)}")
    return "; ".join(parts)


class JournalInUse(RuntimeError):
    """Another live process holds the journal folder's writer lock."""


def lock_journal(root: Path) -> int:
    """The journal folder's writer lock (an open descriptor holding flock LOCK_EX; it names this process);
    JournalInUse naming the holder when another process has it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "a process that did not say"
        os.close(fd)
        raise JournalInUse(
            f"journal {root} is being written by another tickerplant ({holder}); "
            "a second writer would corrupt it: stop that one, or give this one another journal_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    return fd


def check_layouts(files: dict[str, Path]) -> None:
    """JournalLayoutChanged if a table's file begins with another schema than the table's: this version's
    batches appended to it would leave a file no reader can read (acked rows lost)."""
    for name, path in files.items():
        if name not in TABLES or path.stat().st_size == 0:
            continue
        have = journal.file_schema(path)
        diff = "" if have is None else layout_difference(have, TABLES[name].arrow_schema)
        if diff:
            raise JournalLayoutChanged(
                f"journal {path}: table {name} was journaled with other columns than this version's "
                f"({diff}); a table's columns can change only at a day's boundary: run the version that "
                "wrote it until the day ends, or give this one a journal_dir of its own"
            )


class JournalWriter:
    """The journal files of the current day (one per table) and its publishers' marks file."""

    def __init__(self, cfg: TickerplantConfig):
        self.root = Path(cfg.journal_dir)
        self.fsync = cfg.fsync
        self.files: dict[str, journal.JournalFile] = {}
        self.marks: dedupe.MarksFile | None = None
        self.on_sync: Callable[[float], None] | None = None  # told each sync's seconds (the fsync metric)
        self._lock: int | None = None  # the writer lock's descriptor while open

    def open(self, today: str) -> JournalState:
        """Reopen the latest journal day (or start `today`, if later): cut a torn tail (kept in a side
        file), drop an end-of-stream marker so appends continue the stream, and read the last seq, the
        day's rows, the valid marks and the day's exec_ids. JournalInUse if another process writes it,
        JournalLayoutChanged if the day's files hold a table in other columns than this version's."""
        if self._lock is None:
            self._lock = lock_journal(self.root)
        dates = journal.journal_dates(self.root)
        state = JournalState(dates[-1] if dates and dates[-1] > today else today)
        if state.date in dates:
            try:
                check_layouts(journal.day_files(self.root, state.date))
            except JournalLayoutChanged:
                self.close()  # (the lock released: nothing was touched)
                raise
        marks: dict[str, dedupe.Mark] = {}
        for date in reversed(dates):
            files = journal.day_files(self.root, date)
            if not files:
                continue
            for path in files.values():
                s = journal.repair(path)
                if s.closed and date == state.date:
                    os.truncate(path, s.valid_bytes - len(journal.END_OF_STREAM))
                state.scans.append(s)
                state.last_seq = max(state.last_seq, s.last_seq)
                if date == state.date:
                    state.rows[path.stem] = state.rows.get(path.stem, 0) + s.rows
            marks = dedupe.load_marks(
                dedupe.marks_path(self.root, date), {s.path.stem: s.last_seq for s in state.scans}
            )
            break
        # the valid marks, rewritten as today's file: a mark dropped as unjournaled stays dropped once
        # later rows reach its seqs
        state.marks = {p: dedupe.Mark(p, m.id, m.first_seq, m.last_seq) for p, m in marks.items()}
        dedupe.MarksFile.rewrite(dedupe.marks_path(self.root, state.date), state.marks.values())
        state.exec_ids = dedupe.exec_ids_from_journal(self.root, state.date)
        self._open_day(state.date)
        return state

    def _open_day(self, date: str) -> None:
        for name, t in TABLES.items():
            self.files[name] = journal.JournalFile(journal.table_path(self.root, date, name), t.arrow_schema)
        self.marks = dedupe.MarksFile(dedupe.marks_path(self.root, date))

    def _close_day(self, end_of_stream: bool) -> None:
        for f in self.files.values():
            f.close(end_of_stream=end_of_stream)
        self.files.clear()
        if self.marks is not None:
            self.marks.close()
            self.marks = None

    def write(self, writes: list[Write]) -> None:
        """Perform the core's writes in order; with fsync "batch", each marks write is synced before
        the rows it marks, and everything once at the end."""
        if not writes:
            return
        for w in writes:
            if type(w) is Append:
                self.files[w.table].append(w.ipc)
            elif type(w) is AppendMarks:
                assert self.marks is not None
                self.marks.append(w.marks)
                if self.fsync == "batch":
                    self.marks.sync()
            else:
                assert type(w) is Roll
                self._roll(w)
        if self.fsync == "batch":
            self.sync()

    def _roll(self, roll: Roll) -> None:
        """Close the day's files with the end-of-stream marker; open the next day's."""
        self._close_day(end_of_stream=True)
        dedupe.MarksFile.rewrite(dedupe.marks_path(self.root, roll.date), roll.marks)
        self._open_day(roll.date)

    def sync(self) -> None:
        t0 = time.perf_counter()
        if self.marks is not None:
            self.marks.sync()
        for f in self.files.values():
            f.sync()
        if self.on_sync is not None:
            self.on_sync(time.perf_counter() - t0)

    def sizes(self) -> dict[str, int]:
        """Bytes of each table's journal file (for the status)."""
        return {t: f.bytes for t, f in self.files.items()}

    def close(self) -> None:
        """Close the files without the end-of-stream marker (the day goes on after a restart); release
        the writer lock."""
        self._close_day(end_of_stream=False)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


class JournaledCore:
    """A TickerplantCore and its JournalWriter, driven synchronously: every call performs the core's
    writes before it returns the frames to send. `now_ns` and `monotonic` are the clocks the core
    reads; `queue_depth(conn)` -> (frames queued, limit) is asked of the server for the status."""

    def __init__(
        self,
        cfg: TickerplantConfig,
        now_ns: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        queue_depth: Callable[[int], tuple[int, int]] | None = None,
    ):
        self.journal = JournalWriter(cfg)
        self.core = TickerplantCore(
            cfg, now_ns, monotonic, queue_depth=queue_depth, journal_bytes=self.journal.sizes
        )
        self.on_written: Callable[[list[Write]], None] | None = (
            None  # told each call's writes, once done (the bus)
        )

    def open(self) -> JournalState:
        """Repair and reopen the journal; the core continues from it."""
        state = self.journal.open(self.core.date)
        self.core.restore(state)
        return state

    def perform(self, out: Out) -> Frames:
        """The writes of `out`, done; its frames, to send now."""
        self.journal.write(out.writes)
        if self.on_written is not None and out.writes:
            self.on_written(out.writes)
        return out.send

    def on_frame(self, conn: int, data: bytes, peer: str = "") -> Frames:
        return self.perform(self.core.on_frame(conn, data, peer))

    def flush(self) -> Frames:
        return self.perform(self.core.flush())

    def maybe_roll(self) -> Frames:
        return self.perform(self.core.maybe_roll())

    def end_of_day(self, new_date: str | None = None) -> Frames:
        return self.perform(self.core.end_of_day(new_date))

    def close(self) -> Frames:
        """The last flush, then the files closed (no end-of-stream marker: the day continues)."""
        frames = self.perform(self.core.flush())
        self.journal.close()
        return frames
