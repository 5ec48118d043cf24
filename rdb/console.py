"""`marginflow q [host:port]`: a q-like console onto the rdb — a `q)` prompt taking the qSQL subset
(rdb.qsql) or plain SQL (also after `s)`), results printed as q prints them, errors on one line like
q's 'type.

At a terminal: readline history (~/.marginflow_q_history) and tab completion of table and column names.
With stdin not a terminal it reads one command per line and prints each result (exit status 1 if any
failed), so `printf 'count trade\\n' | marginflow q localhost:5011` works in scripts. `\\t expr` times
expr (ms); `\\l file` runs a file of queries (one a line; `/` comment lines skipped; an error prints one line
naming the file and line); `\\c rows cols` sets the console size the results are cut to (`\\c` shows it;
default: the terminal's, none when not a terminal); `\\\\` quits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect

from marginflow import auth
from marginflow import config as configuration
from rdb import qsql
from rdb.query import from_ipc
from schemas.rdb import Query, QueryResult, RdbReply
from schemas.wire import Error

HISTORY = Path.home() / ".marginflow_q_history"
EPOCH = dt.date(1970, 1, 1)
_DECODER = msgspec.msgpack.Decoder(RdbReply)


# ---- q-style text for values -------------------------------------------------------------------------------
def _ts(ns: int) -> str:
    s, frac = divmod(ns, 10**9)
    t = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=s)
    return f"{t:%Y.%m.%dD%H:%M:%S}.{frac:09d}"


def _span(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    days, rest = divmod(abs(ns), 86_400 * 10**9)
    s, frac = divmod(rest, 10**9)
    return f"{sign}{days}D{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{frac:09d}"


def _float(x: float) -> str:
    if x != x:
        return "0n"
    if x in (float("inf"), float("-inf")):
        return "0w" if x > 0 else "-0w"
    return f"{x:.7g}"


_NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
_NULL = {
    "float": "0n",
    "int": "0N",
    "ts": "0Np",
    "date": "0Nd",
    "time": "0Nt",
    "span": "0Nn",
    "bool": "0b",
    "sym": "",
}


def _kind(t: pa.DataType) -> str:
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "float"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_timestamp(t):
        return "ts"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_duration(t) or pa.types.is_interval(t):
        return "span"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "sym"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return "list"
    return "other"


def column_text(col: pa.ChunkedArray | pa.Array) -> tuple[str, list[str | None]]:
    """The column's kind and each value as q shows it in a table (None for null)."""
    t = col.type
    kind = _kind(t)
    if kind == "ts":
        mult = _NS_PER[t.unit]
        return kind, [None if v is None else _ts(v * mult) for v in col.cast(pa.int64()).to_pylist()]
    if kind == "date":
        return kind, [
            None if v is None else f"{EPOCH + dt.timedelta(days=v):%Y.%m.%d}"
            for v in col.cast(pa.int32()).to_pylist()
        ]
    if kind == "time":
        us = [None if v is None else v * _NS_PER[t.unit] // 1000 for v in col.cast(pa.int64()).to_pylist()]
        vals = [v for v in us if v is not None]
        if all(v % 60_000_000 == 0 for v in vals):
            fmt = lambda v: f"{v // 3_600_000_000:02d}:{v // 60_000_000 % 60:02d}"  # noqa: E731 - q's minute
        elif all(v % 1_000_000 == 0 for v in vals):
            fmt = lambda v: f"{v // 3_600_000_000:02d}:{v // 60_000_000 % 60:02d}:{v // 1_000_000 % 60:02d}"  # noqa: E731
        else:
            ms = all(v % 1000 == 0 for v in vals)
            fmt = lambda v: (  # noqa: E731
                f"{v // 3_600_000_000:02d}:{v // 60_000_000 % 60:02d}:{v // 1_000_000 % 60:02d}."
                + (f"{v // 1000 % 1000:03d}" if ms else f"{v % 1_000_000:06d}")
            )
        return kind, [None if v is None else fmt(v) for v in us]
    if kind == "span":
        if pa.types.is_duration(t):
            return kind, [
                None if v is None else _span(v * _NS_PER[t.unit]) for v in col.cast(pa.int64()).to_pylist()
            ]
        out: list[str | None] = []
        for v in col.to_pylist():
            if v is None:
                out.append(None)
            else:
                months, days, ns = v.months, v.days, v.nanoseconds
                out.append(
                    _span(days * 86_400 * 10**9 + ns)
                    if months == 0
                    else f"{months}m {_span(days * 86_400 * 10**9 + ns)}"
                )
        return kind, out
    if kind == "float":
        return kind, [None if v is None else _float(v) for v in col.cast(pa.float64()).to_pylist()]
    if kind == "bool":
        return kind, [None if v is None else ("1" if v else "0") for v in col.to_pylist()]
    if kind == "list":
        flat = pc.list_flatten(col)
        inner_kind, inner = column_text(flat)
        lengths = pc.list_value_length(col).to_pylist()
        out, i = [], 0
        for n in lengths:
            if n is None:
                out.append(None)
                continue
            out.append(list_text(inner_kind, inner[i : i + n]))
            i += n
        return kind, out
    if kind == "sym":
        return kind, [None if v is None else str(v) for v in col.cast(pa.string()).to_pylist()]
    return kind, [None if v is None else str(v) for v in col.to_pylist()]


def list_text(kind: str, vals: Sequence[str | None]) -> str:
    """A q list: `a`b`c, 1 2 3, 1 2 3f, 101b, ,x for one item."""
    if not vals:
        return "()"
    null = _NULL.get(kind, "")
    if kind == "sym":
        body = "".join("`" + (v or "") for v in vals)
    elif kind == "bool":
        body = "".join(v or "0" for v in vals) + "b"
    else:
        body = " ".join(null if v is None else v for v in vals)
        if kind == "float" and all(v is not None and re.fullmatch(r"-?\d+", v) for v in vals):
            body += "f"
    return ("," if len(vals) == 1 else "") + body


def atom_text(kind: str, v: str | None) -> str:
    if v is None:
        return _NULL.get(kind, "::")
    if kind == "sym":
        return "`" + v
    if kind == "bool":
        return v + "b"
    if kind == "float" and re.fullmatch(r"-?\d+", v):
        return v + "f"
    return v


def format_table(
    table: pa.Table, keys: int = 0, max_rows: int | None = None, width: int | None = None
) -> list[str]:
    """Lines of a q table (header, dashes, rows, columns left-aligned); a keyed table puts `|` after the keys.
    `max_rows` / `width` cut long or wide output with `..`, as q does at the console size."""
    n = table.num_rows if max_rows is None else min(table.num_rows, max_rows)
    cols = []
    for name, col in zip(table.column_names, table.columns, strict=True):
        _, vals = column_text(col.slice(0, n))
        cells = ["" if v is None else v for v in vals]
        w = max([len(name), *map(len, cells)])
        cols.append((name, w, cells))

    def join(parts: list[str], sep_at: int) -> str:
        if 0 < sep_at < len(parts):
            return " ".join(parts[:sep_at]) + "| " + " ".join(parts[sep_at:])
        return " ".join(parts)

    header = join([name.ljust(w) for name, w, _ in cols], keys)
    dashes = join(["-" * w for _, w, _ in cols], keys)
    lines = [header, dashes]
    lines += [join([cells[i].ljust(w) for _, w, cells in cols], keys) for i in range(n)]
    lines = [ln.rstrip() for ln in lines]
    if n < table.num_rows:
        lines.append("..")
    if width is not None:
        lines = [ln if len(ln) <= width else ln[: max(width - 2, 1)] + ".." for ln in lines]
    return lines


def _cut(text: str, width: int | None) -> str:
    """Lines longer than the console width end in `..`, as q cuts them."""
    if width is None:
        return text
    return "\n".join(ln if len(ln) <= width else ln[: max(width - 2, 1)] + ".." for ln in text.split("\n"))


def format_result(res: QueryResult, max_rows: int | None = None, width: int | None = None) -> str:
    """The text q would print for a QueryResult (its rows as Arrow). A dict of one row (first t, last t, an
    exec of aggregates) shows atoms; of more rows, lists."""
    table = from_ipc(res.arrow) if res.arrow else pa.table({c: [] for c in res.columns})
    if res.shape == "atom" and table.num_rows == 1 and table.num_columns == 1:
        kind, vals = column_text(table.column(0))
        return _cut(atom_text(kind, vals[0]), width)
    if res.shape == "list" and table.num_columns == 1:
        kind, vals = column_text(table.column(0))
        return _cut(list_text(kind, vals), width) + ("\n.." if res.truncated else "")
    if res.shape == "dict" and res.keys == 1 and table.num_columns == 2:  # exec c by k: k| c per row
        keys, values = (column_text(c)[1] for c in table.columns)
        w = max((len(k or "") for k in keys), default=0)
        lines = [f"{(k or '').ljust(w)}| {v or ''}".rstrip() for k, v in zip(keys, values, strict=True)]
        return _cut("\n".join(lines), width) + ("\n.." if res.truncated else "")
    if res.shape == "dict":
        one = table.num_rows == 1
        texts = []
        for name, col in zip(table.column_names, table.columns, strict=True):
            kind, vals = column_text(col)
            texts.append((name, atom_text(kind, vals[0]) if one else list_text(kind, vals)))
        w = max(len(n) for n, _ in texts) if texts else 0
        return _cut("\n".join(f"{n.ljust(w)}| {t}" for n, t in texts), width)
    lines = format_table(table, res.keys, max_rows, width)
    if res.truncated and lines[-1] != "..":
        lines.append(f".. (first {res.rows} rows{'; ' + res.note if 'bytes' in res.note else ''})")
    return "\n".join(lines)


def error_text(reason: str) -> str:
    """One line, as q prints an error: 'reason."""
    return "'" + " ".join(reason.split())


# ---- the connection ----------------------------------------------------------------------------------------
class Client:
    """A blocking connection to an rdb's query service."""

    def __init__(self, url: str, timeout: float = 5.0, token: str | None = None) -> None:
        self.url = url
        # entered at once: this connection lives as long as the console, not inside one `with` block
        self.ws: ClientConnection = connect(
            url,
            max_size=None,
            compression=None,
            open_timeout=timeout,
            **auth.client_options(url, "query", token),
        ).__enter__()
        self.next_id = 0

    def query(self, text: str, lang: str = "q") -> QueryResult | Error:
        self.next_id += 1
        self.ws.send(msgspec.msgpack.encode(Query(sql=text, lang=lang, format="arrow", id=self.next_id)))
        reply = _DECODER.decode(self.ws.recv())
        if not isinstance(reply, QueryResult | Error):
            return Error(reason=f"unexpected reply {type(reply).__name__}")
        return reply

    def names(self) -> list[str]:
        """Table and column names, for tab completion."""
        r = self.query(
            "SELECT DISTINCT CASE WHEN table_schema = 'main' THEN table_name "
            "ELSE table_schema || '.' || table_name END, column_name FROM information_schema.columns "
            "WHERE table_schema NOT IN ('information_schema', 'pg_catalog')",
            "sql",
        )
        if not isinstance(r, QueryResult) or not r.arrow:
            return []
        t = from_ipc(r.arrow)
        return sorted({*t.column(0).to_pylist(), *t.column(1).to_pylist()})

    def close(self) -> None:
        self.ws.close()


# ---- the console -------------------------------------------------------------------------------------------
class Console:
    """Reads commands and prints what q would. `run(line)` returns (text to print or None, ok)."""

    def __init__(self, client: Client, out: TextIO, terminal: bool = False) -> None:
        self.client, self.out, self.terminal = client, out, terminal
        self.size: tuple[int, int] | None = None  # \c rows cols; None: the terminal's (none off a terminal)
        self.loading = False  # inside \l (a file does not load files)

    def limits(self) -> tuple[int | None, int | None]:
        r"""(rows, columns) a result is cut to: \c's, else the terminal's, else none."""
        if self.size is not None:
            rows, cols = self.size
        elif self.terminal:
            got = shutil.get_terminal_size((80, 25))
            rows, cols = got.lines, got.columns
        else:
            return None, None
        return max(rows - 5, 5), cols

    def console_size(self, args: list[str]) -> tuple[str | None, bool]:
        r"""\c: show the console size; \c rows cols: set it (each 10..2000, as q's)."""
        if not args:
            got = shutil.get_terminal_size((80, 25))
            rows, cols = self.size or ((got.lines, got.columns) if self.terminal else (25, 80))
            return f"{rows} {cols}i", True
        if len(args) != 2 or not all(a.isdigit() and 10 <= int(a) <= 2000 for a in args):
            return error_text(
                f"\\c {' '.join(args)}: rows and columns are two whole numbers from 10 to 2000, "
                "e.g. \\c 25 80"
            ), False
        self.size = (int(args[0]), int(args[1]))
        return None, True

    def load(self, name: str) -> tuple[str | None, bool]:
        r"""\l file: run each line of the file as if typed (blank and / comment lines skipped); results are
        printed in order, an error as one line naming the file and the line number."""
        if not name:
            return error_text("\\l needs a file, e.g. \\l queries.q"), False
        if self.loading:
            return error_text(f"\\l {name}: a loaded file cannot load another"), False
        path = Path(name).expanduser()
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            return error_text(f"\\l {name}: {getattr(e, 'strerror', None) or e}"), False
        out: list[str] = []
        ok_all = True
        self.loading = True
        try:
            for n, line in enumerate(lines, 1):
                text = line.strip()
                if not text or text.startswith("/"):
                    continue
                if text == "\\\\":
                    break
                got, ok = self.run(text)
                ok_all &= ok
                if got is not None:
                    out.append(got if ok else error_text(f"{name}:{n}: {got[1:]}"))
        finally:
            self.loading = False
        return ("\n".join(out) if out else None), ok_all

    def run(self, line: str) -> tuple[str | None, bool]:
        text = line.strip()
        if not text:
            return None, True
        cmd, _, rest = text.partition(" ")
        if cmd == "\\l":
            return self.load(rest.strip())
        if cmd == "\\c":
            return self.console_size(rest.split())
        timing = False
        if text.startswith("\\t ") or text == "\\t":
            timing, text = True, text[2:].strip()
            if not text:
                return error_text("\\t needs an expression, e.g. \\t select count i from trade"), False
        elif text.startswith("\\"):
            return error_text(
                f"{text.split()[0]}: unknown command (\\t expr times it, \\l file runs a file, \\c rows cols "
                "sets the console size, \\\\ quits)"
            ), False
        lang = "q"
        if text.startswith("s)"):
            lang, text = "sql", text[2:].strip()
        elif text.startswith("q)"):
            text = text[2:].strip()
        try:
            reply = self.client.query(text, lang)
        except (ConnectionClosed, OSError) as e:
            return error_text(f"connection: {e}"), False
        if isinstance(reply, Error):
            return error_text(reply.reason), False
        if timing:
            return str(round(reply.elapsed_ms)), True
        rows, cols = self.limits()
        return format_result(reply, max_rows=rows, width=cols), True

    def run_lines(self, lines: Iterable[str]) -> int:
        ok_all = True
        for line in lines:
            if line.strip() == "\\\\":
                break
            text, ok = self.run(line)
            ok_all &= ok
            if text is not None:
                print(text, file=self.out, flush=True)
        return 0 if ok_all else 1

    def interactive(self) -> int:
        try:
            import readline
        except ImportError:  # pragma: no cover - platforms without readline
            readline = None  # type: ignore[assignment]
        if readline is not None:
            readline.set_completer_delims(" \t\n`~!@#$%^&*()-=+[{]}\\|;:'\",<>/?")
            readline.set_completer(completer([*qsql.words(), *self.client.names()]))
            readline.parse_and_bind("tab: complete")
            try:
                readline.read_history_file(HISTORY)
            except OSError:
                pass
        try:
            while True:
                try:
                    line = input("q)")
                except EOFError:
                    print(file=self.out)
                    break
                except KeyboardInterrupt:
                    print(file=self.out)
                    continue
                if line.strip() == "\\\\":
                    break
                text, _ = self.run(line)
                if text is not None:
                    print(text, file=self.out, flush=True)
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(HISTORY)
                except OSError:
                    pass
        return 0


def completer(words: Iterable[str]) -> Callable[[str, int], str | None]:
    """A readline completer over `words` (table and column names, q keywords): the state-th word starting
    with the typed prefix."""
    vocab = sorted(set(words))

    def complete(prefix: str, state: int) -> str | None:
        hits = [w for w in vocab if w.startswith(prefix)]
        return hits[state] if state < len(hits) else None

    return complete


def parse_target(target: str | None, host: str, port: int) -> tuple[str, int]:
    """host:port, :port, port or host -> (host, port), defaults from the config."""
    if not target:
        return host, port
    h, sep, p = target.rpartition(":")
    if not sep:
        return (host, int(target)) if target.isdigit() else (target, port)
    if not p.isdigit():
        raise ValueError(f"target: {target!r} is not host:port")
    return (h or host), int(p)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="marginflow q", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("target", nargs="?", help="rdb address host:port (default from config [rdb])")
    ap.add_argument("--config", help="config file merged over the embedded defaults")
    args = ap.parse_args(argv)
    cfg = configuration.load(args.config).rdb
    try:
        host, port = parse_target(args.target, cfg.host, cfg.port)
    except ValueError as e:
        print(error_text(str(e)), file=sys.stderr)
        return 2
    url = f"{auth.scheme(configuration.current_access())}://{host}:{port}"
    try:
        client = Client(url)
    except (OSError, InvalidURI, InvalidHandshake, TimeoutError) as e:
        print(error_text(f"connect {url}: {e}"), file=sys.stderr)
        return 2
    try:
        terminal = sys.stdin.isatty() and sys.stdout.isatty() and not os.environ.get("MARGINFLOW_Q_PLAIN")
        console = Console(client, sys.stdout, terminal)
        return console.interactive() if terminal else console.run_lines(sys.stdin)
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as q does
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (so the interpreter's final flush does not fail)
        return 0
    finally:
        client.close()
