"""Translate the console's qSQL subset to DuckDB SQL: a pure function from text (and a catalog of tables and
column types) to a `Translation` (the SQL, plus how q would show the result: table, keyed table, list, atom).

Supported (q evaluates right to left, without precedence; so does this):
  select [cols] [by cols] from t [where c1, c2, ...]    select[n] / select[-n] (first / last n rows)
  exec [cols] [by k] from t [where ...]                  a list (one column), an atom, or a dictionary (of
                                                         columns; exec c by k: from each k to its c)
  select distinct ... / exec distinct c                  first occurrences, in order
  update c:e, ... [by k] from t [where ...]              a changed copy of t (never written)
  delete c, ... from t | delete from t where ...         a copy without those columns / rows
  count t | count select ...,  count each (t1;t2),  meta t,  tables[],  t (a bare table name)
  table dyads, right to left: n#t -n#t (take; more than t has cycles, as q's), `c`d xasc t, `c xdesc t
            (stable), `k xkey t, n!t (keyed tables), t lj kt, t ij kt (kt: keyed, e.g. select ... by k)
  first t | last t (one row as a dictionary),  aj[`sym`time; t; q],  aj0[...]
  wj[w; `sym`time; t; (q; (f0;`c0); (f1;`c1))], wj1[...]  w: offsets from t's time, lo hi+\\:t.time
            (q's idiom), (lo;hi) or lo hi (timespans, or whole numbers: ns of a timestamp); f an aggregate
  aggregates: first last sum avg min max count med dev sdev var svar wavg wsum, `count distinct x`, `count i`
  operators: + - * % = <> < > <= >= & | and or not null neg abs in within like mod div xbar ^ (fill)
            (agg;c) fby g,  x in (exec c from t),  x within (lo;hi) with any expressions as bounds
  literals: 1 1.5 1e3 -2 `sym `a`b "text" 2024.01.15 2024.01.15D09:30:00.000 09:30 09:30:00.000
            0D00:05:00 1b 0N,  .z.p .z.d .z.t .z.n (UTC; .z.P .z.D .z.T .z.N local) as of translation
  attributes of a timestamp: .date .time .minute .second .hh .mm .ss .year

Semantics kept from q: `first`/`last` follow arrival order (the table's `seq`, after `date` in `days.*`
views), never DuckDB's unspecified order; `by` results are keyed and sorted by the key; where-constraints
apply left to right (an aggregate in a constraint sees only rows the earlier ones kept); `select by k`
with no columns is the last row of each group; a non-aggregate column in a `by` select is a list per
group; `xbar` on times buckets from midnight; aj keeps every row of t in t's order and takes the last
(by time, then arrival) row of q at or before each t row, q's values replacing t's in common columns
when matched (aj0 also takes q's time); lj / ij match the key (nulls equal) to the first row of kt with it,
kt's values replacing t's in common columns when matched; xasc / xdesc / distinct keep the order of ties,
nulls sort first; `like` is q's glob (* ? [abc] [a-z] [^abc], [*] a literal star), case-sensitive; update /
delete where take the constraints left to right, aggregates in update see the rows the where keeps (per by
group). An unnamed column is named after the first column it mentions (`x` if none); repeated names get
1, 2, ... appended. wj / wj1 are q's ww: per row of t, q's rows of its keys (in time, then arrival order)
from the window's first to the last with time <= time+hi; wj's first is the prevailing row (the last with
time <= time+lo: of ties at that time only the last, as q's bin), wj1's the first with time >= time+lo; an
empty window gives q's aggregates of nothing (max -0W / -0w, min 0W / 0w, sum and count 0, others null);
an aggregate's column replaces t's of that name. A table's order is its stored order (arrival, in the rdb).
Not supported: functions (wj's (::;c), multi-column aggregates such as wavg), assignment, exec by more than
one column or key.

`select [last c, ...] by k from t`, k being t's key and no where, reads `latest.t` (the last row per key that
rdb.store keeps at every flush) when the catalog has it, instead of scanning the day; same answer.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from marginflow.sql import ident, sql_str
from schemas.tables import DUCKDB_TYPES, TABLES

Shape = Literal["table", "list", "atom", "dict"]
Catalog = Mapping[str, Mapping[str, str]]  # table name (or schema.table) -> {column: DuckDB type}


class QError(Exception):
    """A qSQL text that cannot be translated; `str()` is one line, like q's 'type errors."""


@dataclass(frozen=True)
class Translation:
    sql: str
    keys: int = 0  # leading key columns (a keyed table, printed `k| v`)
    shape: Shape = "table"
    columns: tuple[str, ...] = ()  # result column names, when known
    clock: bool = False  # reads the clock (.z.p ...): the same text translates differently later
    count_of: str = ""  # `count t` of a bare table t: its name (the answer is t's row count), else ""


def default_catalog() -> dict[str, dict[str, str]]:
    """The catalog the rdb serves, derived from schemas.tables: each table, its `days.` view (with the
    partition `date` first) and, for keyed tables, its `latest.` table (the last row of each key)."""
    out: dict[str, dict[str, str]] = {}
    for name, t in TABLES.items():
        cols = {c.name: DUCKDB_TYPES[c.kind] for c in t.columns}
        out[name] = cols
        out[f"days.{name}"] = {"date": "DATE", **cols}
        if t.key:
            out[f"latest.{name}"] = dict(cols)
    return out


# ---- tokens ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<syms>(?:`[A-Za-z0-9_.:/]*)+)
  | (?P<timestamp>\d{4}\.\d{2}\.\d{2}D\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)
  | (?P<date>\d{4}\.\d{2}\.\d{2})
  | (?P<timespan>\d+D\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)
  | (?P<time>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,3})?)?)
  | (?P<null>0[Nn]|0[Ww])\b
  | (?P<z>\.z\.[pdtnPDTN](?![A-Za-z0-9_.]))
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:e[+-]?\d+)?[bjhife]?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|<>|\\:|[-+*%=<>&|,()\[\];:^~!#$@?])
    """,
    re.VERBOSE,
)
NOUN_END = {"string", "syms", "timestamp", "date", "timespan", "time", "null", "number", "name", "z"}


@dataclass(frozen=True)
class Tok:
    kind: str
    text: str
    pos: int
    space_before: bool = False


def tokenize(text: str) -> list[Tok]:
    out: list[Tok] = []
    i, space = 0, False
    while i < len(text):
        # q comments: ` /` to the end of the line
        if text[i] == "/" and (i == 0 or text[i - 1].isspace()):
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
            continue
        m = _TOKEN.match(text, i)
        if not m:
            raise QError(f"parse: unexpected {text[i]!r} at position {i}")
        kind = m.lastgroup
        if kind == "ws":
            space, i = True, m.end()
            continue
        tok = Tok(kind, m.group(), i, space)
        # a negative number: '-' glued to digits, not right after a noun (x-1 is a minus), or after a number
        # with a space before the '-' (1 -2 3 is a vector)
        if (
            kind == "op"
            and tok.text == "-"
            and m.end() < len(text)
            and (text[m.end()].isdigit() or text[m.end()] == ".")
        ):
            prev = out[-1] if out else None
            after_noun = prev is not None and (prev.kind in NOUN_END or prev.text in (")", "]"))
            if not after_noun or (space and prev.kind == "number"):
                m2 = _TOKEN.match(text, m.end())
                if m2 and m2.lastgroup in ("number", "timespan"):
                    out.append(Tok(m2.lastgroup, "-" + m2.group(), i, space))
                    space, i = False, m2.end()
                    continue
        out.append(tok)
        space, i = False, m.end()
    return out


# ---- syntax tree -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lit:
    sql: str
    typ: str  # int float bool sym str date ts time span null
    value: object = None


@dataclass(frozen=True)
class Vec:
    items: tuple[Lit, ...]


@dataclass(frozen=True)
class Lst:
    """A general list (a;b;...) holding expressions, e.g. within's bounds or fby's (agg;column)."""

    items: tuple


@dataclass(frozen=True)
class Col:
    name: str
    attr: str = ""  # minute, date, ... for time.minute


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple


@dataclass(frozen=True)
class Sub:
    """A parenthesized qSQL query (or table expression: 5#t, `c xasc t, t lj u ...) used as a table."""

    query: object


@dataclass(frozen=True)
class TOp:
    """A dyad between tables read right to left: n#t, `c xasc t, `k xkey t, n!t, t lj u, t ij u."""

    op: str
    left: object
    right: object


@dataclass(frozen=True)
class AJ:
    fn: str  # aj | aj0 | wj | wj1
    args: tuple


AGGS = {"first", "last", "sum", "avg", "min", "max", "count", "med", "dev", "sdev", "var", "svar"}
MONADS = AGGS | {"neg", "abs", "not", "sqrt", "exp", "log", "floor", "ceiling", "reciprocal", "signum",
                 "string", "upper", "lower", "distinct", "null"}  # fmt: skip
DYAD_WORDS = {"and", "or", "in", "within", "like", "mod", "div", "xbar", "wavg", "wsum", "fby"}
DYAD_OPS = {"+", "-", "*", "%", "=", "<>", "<", ">", "<=", ">=", "&", "|", "^"}
DYAD_AGGS = {"wavg", "wsum"}
ATTRS = {"date", "time", "minute", "second", "hh", "mm", "ss", "year"}
VERBS = {"select", "exec", "update", "delete"}
KEYWORDS = VERBS | {"by", "from", "where"}
TABLE_DYADS = {"#", "!", "xasc", "xdesc", "xkey", "lj", "ij"}


def _lit(tok: Tok) -> Lit:
    k, s = tok.kind, tok.text
    if k == "string":
        body = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), s[1:-1])
        return Lit(sql_str(body), "str", body)
    if k == "date":
        return Lit(f"DATE '{s.replace('.', '-')}'", "date", s)
    if k == "timestamp":
        d, t = s.split("D")
        return Lit(f"TIMESTAMP_NS '{d.replace('.', '-')} {_hms(t)}'", "ts", s)
    if k == "time":
        return Lit(f"TIME '{_hms(s)}'", "time", _span_ns("0D" + s))
    if k == "timespan":
        ns = -_span_ns(s[1:]) if s.startswith("-") else _span_ns(s)
        return Lit(f"INTERVAL '{ns // 1000} microseconds'", "span", ns)
    if k == "null":
        return Lit("'inf'::DOUBLE" if s[1] in "Ww" else "NULL", "float" if s[1] in "Ww" else "null", None)
    if k == "number":
        suffix = s[-1] if s[-1] in "bjhife" else ""
        body = s[:-1] if suffix else s
        if suffix == "b":
            if body not in ("0", "1"):
                raise QError(f"parse: {s} is not a boolean (0b or 1b)")
            return Lit("TRUE" if body == "1" else "FALSE", "bool", body == "1")
        if suffix in ("f", "e") or any(c in body for c in ".e"):
            return Lit(f"{float(body)!r}::DOUBLE", "float", float(body))
        return Lit(str(int(body)), "int", int(body))
    raise QError(f"parse: {s!r} is not a literal")


def _zlit(name: str, now_ns: int | None) -> Lit:
    """.z.p / .z.d / .z.t / .z.n (UTC, as q's) and .z.P / .z.D / .z.T / .z.N (local): the clock at translation
    time as a literal, to the nanosecond (.z.t: the millisecond, q's time)."""
    ns = time.time_ns() if now_ns is None else now_ns
    kind = name[-1]
    if kind.isupper():
        secs = ns // 10**9
        ns += int(dt.datetime.fromtimestamp(secs).astimezone().utcoffset().total_seconds()) * 10**9
    day, nsm = divmod(ns, DAY_NS)
    date = dt.date(1970, 1, 1) + dt.timedelta(days=day)
    s, frac = divmod(nsm, 10**9)
    hms = f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"
    kind = kind.lower()
    if kind == "p":
        return Lit(f"TIMESTAMP_NS '{date.isoformat()} {hms}.{frac:09d}'", "ts", ns)
    if kind == "d":
        return Lit(f"DATE '{date.isoformat()}'", "date", date)
    if kind == "t":
        return Lit(f"TIME '{hms}.{frac // 10**6:03d}'", "time", nsm // 10**6 * 10**6)
    return Lit(f"INTERVAL '{nsm // 1000} microseconds'", "span", nsm)


def _hms(t: str) -> str:
    return t if t.count(":") == 2 else t + ":00"


def _span_ns(s: str) -> int:
    days, _, hms = s.partition("D")
    parts = _hms(hms).split(":")
    sec, _, frac = parts[2].partition(".")
    return ((int(days) * 24 + int(parts[0])) * 3600 + int(parts[1]) * 60 + int(sec)) * 10**9 + int(
        (frac + "0" * 9)[:9]
    )


def table_ref(name: str) -> str:
    return ".".join(ident(p) for p in name.split("."))


# ---- parser ------------------------------------------------------------------------------------------------
class _Parser:
    def __init__(self, toks: list[Tok], text: str, now_ns: int | None = None) -> None:
        self.toks, self.i, self.text = toks, 0, text
        self.now_ns = now_ns  # .z.p and friends: the clock when the text was translated (UTC nanoseconds)

    def table_ahead(self) -> bool:
        """Whether the tokens from here to the matching ')' read as a table expression (a query verb or a
        table dyad such as # xasc lj at the top level), not a list of values."""
        depth, j = 0, self.i
        while j < len(self.toks):
            t = self.toks[j]
            if t.text in ("(", "["):
                depth += 1
            elif t.text in (")", "]"):
                if depth == 0:
                    return False
                depth -= 1
            elif depth == 0 and (t.text in TABLE_DYADS or (t.kind == "name" and t.text in VERBS)):
                return True
            elif depth == 0 and t.text == ";":
                return False
            j += 1
        return False

    def peek(self, k: int = 0) -> Tok | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def take(self) -> Tok:
        t = self.peek()
        if t is None:
            raise QError("parse: unexpected end of input")
        self.i += 1
        return t

    def expect(self, text: str) -> None:
        t = self.peek()
        if t is None or t.text != text:
            got = "end of input" if t is None else repr(t.text)
            raise QError(f"parse: expected {text!r}, got {got}")
        self.i += 1

    def at_end(self) -> bool:
        return self.i >= len(self.toks)

    def is_dyad(self, t: Tok | None) -> bool:
        return t is not None and (
            (t.kind == "op" and t.text in DYAD_OPS) or (t.kind == "name" and t.text in DYAD_WORDS)
        )

    def starts_noun(self, t: Tok | None) -> bool:
        return t is not None and (t.kind in NOUN_END or t.text == "(") and t.text not in KEYWORDS

    def expr(self) -> object:
        t = self.peek()
        if t is None or t.text in (")", "]", ";", ","):
            raise QError("parse: expected an expression" + (f", got {t.text!r}" if t else " at end of input"))
        nxt = self.peek(1)
        if t.kind == "name" and t.text in MONADS and self.starts_noun(nxt) and not (nxt and nxt.text == "["):
            self.take()
            return Call(t.text, (self.expr(),))
        left = self.noun()
        if self.is_dyad(self.peek()):
            op = self.take().text
            if self.peek() is None or self.peek().text in (")", "]", ";", ","):
                raise QError(f"parse: {op} needs a right argument")
            return Call(op, (left, self.expr()))
        nxt = self.peek()
        if nxt is not None and nxt.text not in (")", "]", ";", ","):
            raise QError(f"parse: unexpected {nxt.text!r} after {self.text[t.pos : nxt.pos].strip()!r}")
        return left

    def noun(self) -> object:
        t = self.take()
        if t.kind in ("number", "null"):
            items = [_lit(t)]
            while (p := self.peek()) is not None and p.kind in ("number", "null") and p.space_before:
                items.append(_lit(self.take()))
            return items[0] if len(items) == 1 else Vec(tuple(items))
        if t.kind == "z":
            return _zlit(t.text, self.now_ns)
        if t.kind == "syms":
            syms = t.text.split("`")[1:]
            lits = tuple(Lit(sql_str(s), "sym", s) for s in syms)
            return lits[0] if len(lits) == 1 else Vec(lits)
        if t.kind in ("string", "date", "timestamp", "timespan", "time"):
            items = [_lit(t)]
            while (
                (p := self.peek()) is not None and p.kind == t.kind and p.space_before and t.kind != "string"
            ):
                items.append(_lit(self.take()))
            return items[0] if len(items) == 1 else Vec(tuple(items))
        if t.kind == "name":
            if t.text in KEYWORDS:
                if t.text in VERBS:
                    raise QError(f"parse: a nested {t.text} must be in parentheses")
                raise QError(f"parse: unexpected {t.text!r}")
            if (p := self.peek()) is not None and p.text == "[" and not p.space_before:
                self.take()
                args = self.args("]")
                if t.text in MONADS | DYAD_WORDS:
                    return Call(t.text, tuple(args))
                raise QError(f"parse: {t.text}[...]: unknown function")
            name, _, attr = t.text.rpartition(".")
            if name and attr in ATTRS:
                return Col(name, attr)
            return Col(t.text)
        if t.text == "(":
            if self.table_ahead():
                node = parse_value(self)
                self.expect(")")
                return Sub(node)
            items = self.args(")")
            if len(items) == 1:
                return items[0]
            if all(isinstance(x, Lit) for x in items):
                return Vec(tuple(items))
            return Lst(tuple(items))
        raise QError(f"parse: unexpected {t.text!r}")

    def args(self, close: str) -> list[object]:
        out: list[object] = []
        if (p := self.peek()) is not None and p.text == close:
            self.take()
            return out
        while True:
            out.append(self.expr())
            t = self.take()
            if t.text == close:
                return out
            if t.text != ";":
                raise QError(f"parse: expected ';' or {close!r}, got {t.text!r}")


@dataclass
class Query:
    verb: str  # select | exec | update | delete
    cols: list[tuple[str | None, object]] = field(default_factory=list)
    by: list[tuple[str | None, object]] = field(default_factory=list)
    source: object = None  # table name (str), Sub or _Raw
    where: list[object] = field(default_factory=list)
    limit: int | None = None
    distinct: bool = False  # select distinct / exec distinct


def _phrase(p: _Parser, stops: set[str]) -> list[tuple[str | None, object]]:
    """Comma-separated (optionally named `n:expr`) expressions up to a keyword in `stops`."""
    out: list[tuple[str | None, object]] = []
    while (t := p.peek()) is not None and t.text not in stops:
        name = None
        if t.kind == "name" and (c := p.peek(1)) is not None and c.text == ":":
            name = t.text
            p.i += 2
        out.append((name, _until(p, stops | {","})))
        if (t := p.peek()) is not None and t.text == ",":
            p.take()
            if (t := p.peek()) is None or t.text in stops:
                raise QError("parse: expected an expression after ','")
    return out


def _until(p: _Parser, stops: set[str]) -> object:
    """Parse one expression whose tokens end at the first top-level token in `stops`."""
    depth, j = 0, p.i
    while j < len(p.toks):
        s = p.toks[j].text
        if s in ("(", "["):
            depth += 1
        elif s in (")", "]"):
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and s in stops and (s in (",", ";") or p.toks[j].kind == "name"):
            break
        j += 1
    sub = _Parser(p.toks[p.i : j], p.text, p.now_ns)
    node = sub.expr()
    if not sub.at_end():
        raise QError(f"parse: unexpected {sub.peek().text!r}")
    p.i = j
    return node


def parse_value(p: _Parser) -> object:
    """A table-valued expression, read right to left as q does: a query (select / exec / update / delete, to
    the end or the closing parenthesis), aj[...], a table name, (value), or `left dyad value` with a table
    dyad (# ! xasc xdesc xkey lj ij)."""
    t = p.peek()
    if t is None:
        raise QError("parse: expected a table at end of input")
    if t.kind == "name" and t.text in VERBS:
        return parse_query(p)
    if t.text in ("aj", "aj0") and (b := p.peek(1)) is not None and b.text == "[":
        p.i += 2
        return AJ(t.text, tuple(p.args("]")))
    if t.text in ("wj", "wj1") and (b := p.peek(1)) is not None and b.text == "[":
        p.i += 2
        return AJ(t.text, (_window_arg(p), *p.args("]")))
    if t.kind == "name" and t.text not in KEYWORDS:
        p.take()
        left: object = t.text
    elif t.text == "(" or t.kind in ("number", "syms"):
        left = p.noun()
    else:
        raise QError(f"parse: expected a table, got {t.text!r}")
    if (op := p.peek()) is not None and op.text in TABLE_DYADS:
        p.take()
        if p.at_end() or p.peek().text in (")", ";", "]"):
            raise QError(f"parse: {op.text} needs a table on the right")
        return TOp(op.text, left, parse_value(p))
    return left


def _window_arg(p: _Parser) -> object:
    """wj's first argument up to its `;`: a pair of offsets from t's time, (lo;hi) or `lo hi`, or q's own
    idiom `lo hi+\\:t.time` (or t`time), kept as Lst((pair, "t", "time"))."""
    depth, j = 0, p.i
    while j < len(p.toks) and not (depth == 0 and p.toks[j].text in (";", "]")):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(p.toks[j].text, 0)
        j += 1
    if j >= len(p.toks) or p.toks[j].text != ";":
        raise QError("rank: wj[w;`sym`time;t;(q;(f0;c0);(f1;c1))] takes 4 arguments")
    toks = p.toks[p.i : j]
    each = next((k for k, t in enumerate(toks) if t.text == "\\:"), None)
    if each is None:
        sub = _Parser(toks, p.text, p.now_ns)
        node = sub.expr()
    else:
        if each == 0 or toks[each - 1].text != "+":
            raise QError("nyi: wj's window is lo hi+\\:t.time, (lo;hi) or lo hi (offsets from t's time)")
        sub = _Parser(toks[: each - 1], p.text, p.now_ns)
        pair = sub.expr()
        right = [t.text for t in toks[each + 1 :]]
        if len(right) == 1 and "." in right[0]:
            table, _, col = right[0].rpartition(".")
        elif len(right) == 2 and right[1].count("`") == 1:
            table, col = right[0], right[1][1:]
        else:
            raise QError("nyi: wj's window lo hi+\\:x needs x to be t.time or t`time")
        node = Lst((pair, table, col))
    if not sub.at_end():
        raise QError(f"parse: unexpected {sub.peek().text!r} in wj's window")
    p.i = j + 1
    return node


def parse_query(p: _Parser) -> Query:
    q = Query(p.take().text)
    if (t := p.peek()) is not None and t.text == "distinct" and q.verb in ("select", "exec"):
        nxt = p.peek(1)
        if nxt is None or nxt.text not in (":", "["):
            p.take()
            q.distinct = True
    if (t := p.peek()) is not None and t.text == "[" and not t.space_before:
        p.take()
        n = p.take()
        if n.kind != "number" or not re.fullmatch(r"-?\d+j?", n.text):
            raise QError(f"parse: {q.verb}[n] needs a whole number n, got {n.text!r}")
        q.limit = int(n.text.rstrip("j"))
        p.expect("]")
    q.cols = _phrase(p, {"by", "from"})
    if (t := p.peek()) is not None and t.text == "by":
        p.take()
        q.by = _phrase(p, {"from"})
        if not q.by:
            raise QError("parse: by needs at least one column")
    p.expect("from")
    t = p.take()
    if t.kind == "name" and t.text not in KEYWORDS:
        q.source = t.text
    elif t.text == "(":
        q.source = Sub(parse_value(p))
        p.expect(")")
    else:
        raise QError(f"parse: from needs a table name, got {t.text!r}")
    if (t := p.peek()) is not None and t.text == "where":
        p.take()
        q.where = [e for _, e in _phrase(p, {")", ";"})]
        if not q.where:
            raise QError("parse: where needs at least one constraint")
    return q


# ---- translation -------------------------------------------------------------------------------------------
_TYPE = {
    "BIGINT": "int", "INTEGER": "int", "SMALLINT": "int", "TINYINT": "int", "HUGEINT": "int",
    "UBIGINT": "int", "UINTEGER": "int", "DOUBLE": "float", "FLOAT": "float", "REAL": "float",
    "VARCHAR": "sym", "BOOLEAN": "bool",
    "DATE": "date", "TIME": "time", "INTERVAL": "span", "TIMESTAMP": "ts", "TIMESTAMP_NS": "ts",
    "TIMESTAMP_MS": "ts", "TIMESTAMP_S": "ts", "TIMESTAMP WITH TIME ZONE": "ts",
}  # fmt: skip
_ATTR_UNIT_NS = {"minute": 60 * 10**9, "second": 10**9, "time": 10**6}  # q's minute, second, time (ms)
_ATTR_TYPE = {"date": "date", "time": "time", "minute": "minute", "second": "second", "hh": "int",
              "mm": "int", "ss": "int", "year": "int"}  # fmt: skip
_CMP = {"=": "=", "<>": "<>", "<": "<", ">": ">", "<=": "<=", ">=": ">="}
_ARITH = {"+": "+", "-": "-", "*": "*", "%": "/"}
_SCALAR = {"abs": "abs", "sqrt": "sqrt", "exp": "exp", "log": "ln", "floor": "floor", "ceiling": "ceil",
           "signum": "sign", "upper": "upper", "lower": "lower"}  # fmt: skip
_AGG_SQL = {"sum": "sum", "avg": "avg", "min": "min", "max": "max", "med": "median", "dev": "stddev_pop",
            "sdev": "stddev_samp", "var": "var_pop", "svar": "var_samp"}  # fmt: skip
DAY_NS = 86_400_000_000_000
MAX_TAKE = 10_000_000  # n#t beyond this is refused (it would build n rows before any row limit could cut)
# q types that compare with each other (a date is midnight as a timestamp; times of day in any unit)
_KIND_GROUP = {"int": "num", "float": "num", "bool": "num", "ts": "instant", "date": "instant",
               "time": "clock", "minute": "clock", "second": "clock", "span": "span", "sym": "text",
               "str": "text"}  # fmt: skip


def _attr(x: str, typ: str, attr: str) -> str:
    """x.attr in integer arithmetic on nanoseconds since midnight: DuckDB's casts of TIMESTAMP_NS to TIME or
    DATE round to the microsecond (10:13:59.9999999 would become 10:14), q truncates."""
    if typ == "date":
        if attr not in ("date", "year"):
            raise QError(f"type: .{attr} needs a time or timestamp; this is a date")
        return f"year({x})" if attr == "year" else x
    if typ == "time":
        nsm, day = f"(epoch_us({x}) * 1000)", None
    else:
        e = f"epoch_ns({x})"
        nsm = f"((({e} % {DAY_NS}) + {DAY_NS}) % {DAY_NS})"
        day = f"(DATE '1970-01-01' + CAST(({e} - {nsm}) // {DAY_NS} AS INTEGER))"
    if attr in _ATTR_UNIT_NS:
        u = _ATTR_UNIT_NS[attr]
        return f"(TIME '00:00:00' + to_microseconds(({nsm} // {u}) * {u // 1000}))"
    if attr == "hh":
        return f"({nsm} // {3600 * 10**9})"
    if attr == "mm":
        return f"(({nsm} // {60 * 10**9}) % 60)"
    if attr == "ss":
        return f"(({nsm} // {10**9}) % 60)"
    if day is None:
        raise QError(f"type: .{attr} needs a timestamp; this is a time")
    return f"year({day})" if attr == "year" else day


def _qtype(duck: str) -> str:
    base = duck.upper().split("(")[0].strip()
    if base.startswith("DECIMAL"):
        return "float"
    return _TYPE.get(base, "?")


@dataclass
class _Scope:
    """What an expression can see: the columns of its source and the order that means 'arrival'."""

    cols: dict[str, str]  # column -> q type
    order: tuple[str, ...]  # first/last order (seq; date, seq), empty if the source has none
    window: bool = False  # aggregates become windows over the rows (where constraints, mixed selects)
    partition: tuple[str, ...] = ()  # the windows' PARTITION BY (fby's groups, update ... by)


def like_regex(pattern: str) -> str:
    """q's like pattern as an anchored RE2 regex: * any run, ? one character, [abc] / [a-z] one of,
    [^abc] none of; everything else literal (so [*] matches a star). A [ without its ] is literal, as in q."""
    out, i = ["(?s)"], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (j := pattern.find("]", i + 2 if pattern[i + 1 : i + 2] != "^" else i + 3)) > 0:
            body = pattern[i + 1 : j]
            neg = body.startswith("^")
            body = body[1:] if neg else body
            out.append("[" + ("^" if neg else "") + body.replace("\\", "\\\\").replace("[", "\\[") + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _order_of(cols: Mapping[str, str]) -> tuple[str, ...]:
    if "seq" in cols:
        return ("date", "seq") if "date" in cols else ("seq",)
    return ()


def _unique(name: str, outs: list[tuple[str, str, str]]) -> str:
    """`name`, or name1, name2, ... if an earlier column already has it (as q renames duplicates)."""
    taken = {o[0] for o in outs}
    nm, k = name, 1
    while nm in taken:
        nm, k = f"{name}{k}", k + 1
    return nm


def _has_agg(node: object) -> bool:
    if isinstance(node, Call):
        if node.fn in AGGS or node.fn in DYAD_AGGS:
            return True
        return any(_has_agg(a) for a in node.args)
    return False


def _windowed(node: object) -> bool:
    """An aggregate or an fby: in a where constraint it sees only the rows the earlier constraints kept."""
    if isinstance(node, Call):
        return (
            node.fn == "fby"
            or node.fn in AGGS
            or node.fn in DYAD_AGGS
            or any(_windowed(a) for a in node.args)
        )
    return False


def _uses_i(node: object) -> bool:
    if isinstance(node, Col):
        return node.name == "i"
    if isinstance(node, Call):
        if node.fn == "count" and len(node.args) == 1 and node.args[0] == Col("i"):
            return False
        return any(_uses_i(a) for a in node.args)
    return False


def _first_col(node: object) -> str | None:
    if isinstance(node, Col):
        return node.attr or (None if node.name == "i" else node.name)
    if isinstance(node, Call):
        for a in node.args:
            if (n := _first_col(a)) is not None:
                return n
    return None


class _Tr:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = {k.lower(): {c: _qtype(t) for c, t in v.items()} for k, v in catalog.items()}
        self.n = 0

    def alias(self) -> str:
        self.n += 1
        return f"_q{self.n}"

    # -- expressions -------------------------------------------------------------------------------------
    def expr(self, node: object, sc: _Scope) -> tuple[str, str]:
        """SQL and q type (int float bool sym str date ts time minute second span list ?) of an expression."""
        if isinstance(node, Lit):
            return node.sql, node.typ
        if isinstance(node, Vec):
            return "[" + ", ".join(x.sql for x in node.items) + "]", "list"
        if isinstance(node, Col):
            return self.col(node, sc)
        if isinstance(node, Call):
            return self.call(node, sc)
        raise QError("type: a query cannot be used as a value here")

    def col(self, node: Col, sc: _Scope) -> tuple[str, str]:
        if node.name not in sc.cols:
            raise QError(f"{node.name}: no such column; columns are {', '.join(sc.cols)}")
        sql, typ = ident(node.name), sc.cols[node.name]
        if node.attr:
            if typ not in ("ts", "date", "time", "?"):
                raise QError(f"type: {node.name}.{node.attr} needs a time column; {node.name} is {typ}")
            sql, typ = _attr(sql, typ, node.attr), _ATTR_TYPE[node.attr]
        return sql, typ

    def values(self, node: object) -> str:
        """The right side of `in`: a list of literals, or a one-column (exec/select ...)."""
        if isinstance(node, Vec):
            return ", ".join(x.sql for x in node.items)
        if isinstance(node, Lit):
            return node.sql
        if isinstance(node, Sub):
            r = self.table(node.query)
            if len(r.outs) != 1:
                raise QError(f"length: in needs one column on the right, got {len(r.outs)}")
            return f"SELECT {ident(r.outs[0][0])} FROM ({r.sql}) AS {self.alias()}"
        raise QError("type: in needs a list of literals or (exec c from t) on the right, e.g. sym in `a`b")

    @staticmethod
    def agg(sql: str, sc: _Scope) -> str:
        if not sc.window:
            return sql
        return f"{sql} OVER ({'PARTITION BY ' + ', '.join(sc.partition) if sc.partition else ''})"

    def fby(self, a: object, b: object, sc: _Scope) -> tuple[str, str]:
        """(agg;x) fby g: agg of x over the rows of each group g, as a column (a window partitioned by g)."""
        pair = a.items if isinstance(a, Lst | Vec) else ()
        if len(pair) != 2 or not (isinstance(pair[0], Col) and pair[0].name in AGGS and not pair[0].attr):
            raise QError("type: fby needs (aggregate;column) on the left, e.g. (max;price) fby sym")
        groups = b.items if isinstance(b, Lst) else (b,)
        part = tuple(self.expr(g, sc)[0] for g in groups)
        inner = _Scope(sc.cols, sc.order, window=True, partition=part)
        return self.monad(pair[0].name, pair[1], inner)

    def within(self, a: object, b: object, sc: _Scope) -> tuple[str, str]:
        items = b.items if isinstance(b, Vec | Lst) else ()
        if len(items) != 2:
            raise QError("length: within needs two bounds on the right, e.g. price within 10 20")
        x, tx = self.expr(a, sc)
        (lo, tlo), (hi, thi) = (self.expr(i, sc) for i in items)
        for tb in (tlo, thi):
            if "null" not in (tx, tb) and "?" not in (tx, tb) and _KIND_GROUP.get(tx) != _KIND_GROUP.get(tb):
                hint = "; e.g. time.minute within 09:30 16:00" if tx == "ts" else ""
                raise QError(f"type: within: {_first_col(a) or 'x'} is {tx}, a bound is {tb}{hint}")
        return f"({x} BETWEEN {lo} AND {hi})", "bool"

    def ordered(self, fn: str, x: str, sc: _Scope) -> str:
        """first / last in arrival order (arg_min/arg_max over the order key; the _null variants keep a null
        value when it is the first/last one, as q does)."""
        if not sc.order:
            return self.agg(f"{fn}({x})", sc)
        key = ident(sc.order[0]) if len(sc.order) == 1 else "(" + ", ".join(ident(c) for c in sc.order) + ")"
        return self.agg(f"{'arg_max_null' if fn == 'last' else 'arg_min_null'}({x}, {key})", sc)

    def call(self, node: Call, sc: _Scope) -> tuple[str, str]:
        fn, args = node.fn, node.args
        if fn in MONADS and len(args) == 1:
            return self.monad(fn, args[0], sc)
        if len(args) != 2 or fn in MONADS:
            raise QError(
                f"rank: {fn} takes {'1 argument' if fn in MONADS else '2 arguments'}, got {len(args)}"
            )
        a, b = args
        if fn == "xbar":
            return self.xbar(a, b, sc)
        if fn == "in":
            x, _ = self.expr(a, sc)
            return f"({x} IN ({self.values(b)}))", "bool"
        if fn == "within":
            return self.within(a, b, sc)
        if fn == "fby":
            return self.fby(a, b, sc)
        if fn == "like":
            if not (isinstance(b, Lit) and b.typ in ("str", "sym")):
                raise QError('type: like needs a pattern on the right, e.g. sym like "A*"')
            x, _ = self.expr(a, sc)
            return f"regexp_full_match(CAST({x} AS VARCHAR), {sql_str(like_regex(str(b.value)))})", "bool"
        x, tx = self.expr(a, sc)
        y, ty = self.expr(b, sc)
        if fn in ("wavg", "wsum"):  # x wavg y: the average of y weighted by x
            num = self.agg(f"sum(({x}) * ({y}))", sc)
            return (num if fn == "wsum" else f"({num} / {self.agg(f'sum({x})', sc)})"), "float"
        if fn in _CMP:
            if fn in ("=", "<>") and "null" in (tx, ty):  # q's nulls compare equal to each other
                v = y if tx == "null" else x
                return f"({v} IS {'' if fn == '=' else 'NOT '}NULL)", "bool"
            return f"({x} {_CMP[fn]} {y})", "bool"
        if fn in _ARITH:
            typ = "float" if fn == "%" or "float" in (tx, ty) else (tx if tx == ty else "?")
            if fn == "-" and tx == ty == "ts":
                typ = "span"
            return f"({x} {_ARITH[fn]} {y})", typ
        if fn in ("&", "and"):
            return f"({x} AND {y})", "bool"
        if fn in ("|", "or"):
            return f"({x} OR {y})", "bool"
        if fn == "mod":
            return f"((({x} % {y}) + {y}) % {y})", tx
        if fn == "div":
            return f"CAST(floor({x} / {y}) AS BIGINT)", "int"
        if fn == "^":  # fill: x^y is y with its nulls replaced by x
            return f"coalesce({y}, {x})", ty
        raise QError(f"nyi: {fn}")

    def monad(self, fn: str, a: object, sc: _Scope) -> tuple[str, str]:
        if fn == "count":
            if a == Col("i") and "i" not in sc.cols:
                return self.agg("count(*)", sc), "int"
            if isinstance(a, Call) and a.fn == "distinct" and len(a.args) == 1:
                x, _ = self.expr(a.args[0], sc)
                return self.agg(f"count(DISTINCT {x})", sc), "int"
            x, _ = self.expr(a, sc)
            return self.agg(f"count({x})", sc), "int"
        if fn == "distinct":
            raise QError(
                "nyi: distinct here; use exec distinct c from t, select distinct ... or count distinct x"
            )
        x, t = self.expr(a, sc)
        if fn in ("first", "last"):
            return self.ordered(fn, x, sc), t
        if fn in _AGG_SQL:
            if t == "bool" and fn not in ("min", "max"):  # q's booleans are numbers: avg of a test is a share
                x, t = f"CAST({x} AS BIGINT)", "int"
            return self.agg(f"{_AGG_SQL[fn]}({x})", sc), (t if fn in ("sum", "min", "max") else "float")
        if fn == "neg":
            return f"(-{x})", t
        if fn == "not":
            return f"(NOT {x})", "bool"
        if fn == "null":
            return f"({x} IS NULL)", "bool"
        if fn == "reciprocal":
            return f"(1.0 / {x})", "float"
        if fn == "string":
            return f"CAST({x} AS VARCHAR)", "str"
        return f"{_SCALAR[fn]}({x})", ("float" if fn in ("sqrt", "exp", "log") else t)

    def xbar(self, a: object, b: object, sc: _Scope) -> tuple[str, str]:
        """n xbar x: x rounded down to a multiple of n; times and timestamps in buckets from midnight."""
        x, t = self.expr(b, sc)
        if not isinstance(a, Lit) or a.typ not in ("int", "float", "span", "time"):
            raise QError("type: xbar needs a number or a timespan on the left, e.g. 5 xbar time.minute")
        if t == "ts":  # n is nanoseconds (q's timestamp unit) or a timespan
            ns = a.value
            if not isinstance(ns, int) or ns <= 0:
                raise QError("type: a timestamp xbar needs a positive whole bucket, e.g. 0D00:05:00")
            e = f"epoch_ns({x})"
            return f"make_timestamp_ns({e} - ((({e} % {DAY_NS}) + {DAY_NS}) % {DAY_NS}) % {ns})", "ts"
        if t in ("minute", "second", "time"):  # n counts minutes / seconds / milliseconds, as in q
            ns = a.value if a.typ in ("span", "time") else a.value * _ATTR_UNIT_NS[t]
            if not isinstance(ns, int) or ns <= 0 or ns % 1000:
                raise QError("type: a time xbar needs a positive bucket of whole microseconds")
            us = ns // 1000
            return f"(TIME '00:00:00' + to_microseconds((epoch_us({x}) // {us}) * {us}))", t
        if a.typ not in ("int", "float") or (isinstance(a.value, int | float) and a.value <= 0):
            raise QError("type: a numeric xbar needs a positive number on the left")
        if t not in ("int", "float", "?"):
            raise QError(f"type: a numeric xbar needs numbers on the right, got {t}")
        if t == "int" and a.typ == "int":
            return f"(CAST(floor({x} / {a.sql}) AS BIGINT) * {a.sql})", "int"
        return f"(floor({x} / {a.sql}) * {a.sql})", "float"

    # -- queries -------------------------------------------------------------------------------------------
    def source(self, src: object) -> tuple[str, dict[str, str]]:
        """SQL for a from-phrase (usable after FROM) and its columns (name -> q type)."""
        if isinstance(src, _Raw):
            return src.sql, dict(src.cols)
        if isinstance(src, Sub):
            res = self.table(src.query)
            return f"({res.sql}) AS {self.alias()}", dict(res.types)
        name = str(src)
        cols = self.catalog.get(name.lower())
        if cols is None:
            raise QError(f"{name}: no such table; tables are {', '.join(sorted(self.catalog))}")
        return table_ref(name), dict(cols)

    def latest(self, q: Query) -> _Result | None:
        """`select [last c, ...] by k from t` with k the table's key and no where: answered from latest.t, the
        last row per key the store maintains, instead of scanning the day. None when the query is not that."""
        if q.where or q.limit is not None or not isinstance(q.source, str) or len(q.by) != 1:
            return None
        t = TABLES.get(q.source)
        cols = self.catalog.get(f"latest.{q.source}")
        if t is None or not t.key or cols is None or q.by[0][1] != Col(t.key):
            return None
        outs = [(q.by[0][0] or t.key, ident(t.key), cols[t.key])]
        picks = [
            (n, node.args[0])
            for n, node in q.cols
            if isinstance(node, Call) and node.fn == "last" and len(node.args) == 1
        ]
        if len(picks) != len(q.cols) or any(
            not isinstance(c, Col) or c.attr or c.name not in cols for _, c in picks
        ):
            return None
        if not q.cols:
            picks = [(None, Col(c)) for c in cols if c != t.key]
        for name, c in picks:
            outs.append((_unique(name or c.name, outs), ident(c.name), cols[c.name]))
        select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
        return _Result(f"SELECT {select} FROM latest.{ident(q.source)} ORDER BY 1 NULLS FIRST", 1, outs)

    def query(self, q: Query) -> _Result:
        if q.verb == "update":
            return self.update(q)
        if q.verb == "delete":
            return self.delete(q)
        if q.distinct:
            return self.distinct(q)
        if (fast := self.latest(q)) is not None:
            return fast
        src, cols = self.source(q.source)
        order = _order_of(cols)
        okey = ", ".join(ident(c) for c in order)
        scope_cols = dict(cols)
        hide_i = "i" not in cols and (
            any(_uses_i(e) for _, e in q.cols + q.by) or any(_uses_i(e) for e in q.where)
        )
        if hide_i:  # the virtual row index: position in arrival order
            over = "ORDER BY " + okey if okey else ""
            src = f'(SELECT *, row_number() OVER ({over}) - 1 AS "i" FROM {src}) AS {self.alias()}'
            scope_cols["i"] = "int"
        # where: left to right; a constraint with an aggregate sees only the rows kept before it
        wheres: list[str] = []
        qualify: str | None = None
        for c in q.where:
            agg = _windowed(c)
            sql, _ = self.expr(c, _Scope(scope_cols, order, window=agg))
            if qualify is not None:
                src, wheres, qualify = self.layer(src, wheres, qualify), [], None
            if agg:
                qualify = sql
            else:
                wheres.append(sql)
        if qualify is not None:
            src, wheres = self.layer(src, wheres, qualify), []
        where = f" WHERE {' AND '.join(wheres)}" if wheres else ""
        if q.limit is not None and not q.by:  # select[n]: the first (last) n rows kept by where
            n = abs(q.limit)
            if q.limit < 0 and not order:
                raise QError("nyi: select[-n] needs a table with a seq column")
            if q.limit < 0:
                desc = ", ".join(f"{ident(c)} DESC" for c in order)
                src = f"(SELECT * FROM {src}{where} ORDER BY {desc} LIMIT {n}) AS {self.alias()}"
            else:
                by = " ORDER BY " + okey if okey else ""
                src = f"(SELECT * FROM {src}{where}{by} LIMIT {n}) AS {self.alias()}"
            where = ""
        order_tail = f" ORDER BY {okey}" if q.limit is not None and okey else ""

        outs: list[tuple[str, str, str]] = []  # (name, sql, q type)

        def add(
            name: str | None, node: object, sc: _Scope, sql: str | None = None, typ: str | None = None
        ) -> None:
            if sql is None:
                sql, typ = self.expr(node, sc)
            outs.append((_unique(name or _first_col(node) or "x", outs), sql, typ or "?"))

        plain = _Scope(scope_cols, order)
        if q.by:
            for name, node in q.by:
                if _has_agg(node):
                    raise QError("type: a by column cannot be an aggregate")
                add(name, node, plain)
            nkeys = len(outs)
            if q.cols:
                for name, node in q.cols:
                    if _has_agg(node):
                        add(name, node, plain)
                    else:  # a non-aggregate column is a list per group, in arrival order
                        sql, _ = self.expr(node, plain)
                        add(name, node, plain, f"list({sql}{' ORDER BY ' + okey if okey else ''})", "list")
            else:  # select by k from t: the last row of each group
                keys = {o[0] for o in outs}
                for c in cols:
                    if c not in keys:
                        add(c, Call("last", (Col(c),)), plain)
            select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
            pos = [str(i + 1) for i in range(nkeys)]
            sql = f"SELECT {select} FROM {src}{where} GROUP BY {', '.join(pos)}"
            asc = ", ".join(f"{p} NULLS FIRST" for p in pos)
            if q.limit is None:
                sql += f" ORDER BY {asc}"
            elif q.limit >= 0:
                sql += f" ORDER BY {asc} LIMIT {q.limit}"
            else:
                desc = ", ".join(f"{p} DESC NULLS LAST" for p in pos)
                sql = (
                    f"SELECT * FROM ({sql} ORDER BY {desc} LIMIT {-q.limit}) AS {self.alias()} ORDER BY {asc}"
                )
            return _Result(sql, nkeys, outs)
        if not q.cols:
            star = '* EXCLUDE ("i")' if hide_i else "*"
            outs = [(c, ident(c), t) for c, t in cols.items()]
            return _Result(f"SELECT {star} FROM {src}{where}{order_tail}", 0, outs)
        aggs = [_has_agg(node) for _, node in q.cols]
        sc = _Scope(scope_cols, order, window=any(aggs) and not all(aggs))  # mixed: aggregates over all rows
        for name, node in q.cols:
            add(name, node, sc)
        select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
        tail = "" if all(aggs) else order_tail
        return _Result(f"SELECT {select} FROM {src}{where}{tail}", 0, outs, one_row=all(aggs))

    def distinct(self, q: Query) -> _Result:
        """select distinct ... / exec distinct c: the rows (values) kept by the query, each first occurrence
        once, in the order they first occur (nulls equal to each other, as q's distinct)."""
        if q.by or any(_has_agg(e) for _, e in q.cols):
            raise QError("nyi: distinct with by or an aggregate; select distinct takes plain columns")
        if q.verb == "exec" and len(q.cols) != 1:
            raise QError(f"length: exec distinct takes one column, got {len(q.cols)}")
        inner = self.query(Query("select", q.cols, [], q.source, q.where, q.limit))
        cols = ", ".join(ident(n) for n, _, _ in inner.outs)
        sql = (
            f'SELECT * EXCLUDE ("_o") FROM {self.rows(inner.sql, "_o")} '
            f'QUALIFY row_number() OVER (PARTITION BY {cols} ORDER BY "_o") = 1 ORDER BY "_o"'
        )
        return _Result(sql, 0, [(n, ident(n), t) for n, _, t in inner.outs])

    def numbered(self, src: object) -> tuple[str, dict[str, str]]:
        """The source with "_r", each row's position as stored (1, 2, ...), for update / delete ... where."""
        sql, cols = self.source(src)
        if "_r" in cols:
            raise QError("nyi: update / delete of a table with a column named _r")
        return f'(SELECT *, row_number() OVER () AS "_r" FROM {sql}) AS {self.alias()}', cols

    def kept(self, q: Query, numbered: str, cols: dict[str, str]) -> str:
        """A condition true on the rows q's where keeps (TRUE without a where). Plain constraints are ANDed in
        place (null as false); with an aggregate, an fby or i, the rows' "_r" as a select with the same where
        (constraints left to right) picks them."""
        if not q.where:
            return "TRUE"
        if not any(_windowed(c) or _uses_i(c) for c in q.where):
            sc = _Scope(cols, _order_of(cols))
            return f"coalesce({' AND '.join(self.expr(c, sc)[0] for c in q.where)}, FALSE)"
        sel = Query("select", [(None, Col("_r"))], [], _Raw(numbered, {**cols, "_r": "int"}), q.where)
        return f'("_r" IN ({self.query(sel).sql}))'

    def update(self, q: Query) -> _Result:
        """update c:e, ... [by k] from t [where ...]: a changed copy of t (t itself is never written): rows
        the where keeps get the new values (aggregates over those rows, per by group), others keep theirs (a
        new column is null there); existing columns keep their place, new ones come last; rows keep order."""
        if not q.cols:
            raise QError("parse: update needs at least one column, e.g. update x:2*price from trade")
        base, cols = self.numbered(q.source)
        flag = self.kept(q, base, cols)
        seen = dict(cols)
        if "i" not in cols and any(_uses_i(e) for _, e in q.cols + q.by):  # i: the position in arrival order
            over = ", ".join(ident(c) for c in _order_of(cols))
            base = (
                f'(SELECT *, row_number() OVER ({"ORDER BY " + over if over else ""}) - 1 AS "i" FROM {base})'
            )
            base, seen["i"] = f"{base} AS {self.alias()}", "int"
        src = f'(SELECT *, {flag} AS "_w" FROM {base}) AS {self.alias()}'
        plain = _Scope(seen, _order_of(cols))
        part = ['"_w"'] + [self.expr(e, plain)[0] for _, e in q.by]
        if any(_has_agg(e) for _, e in q.by):
            raise QError("type: a by column cannot be an aggregate")
        sc = _Scope(seen, _order_of(cols), window=True, partition=tuple(part))
        new: dict[str, tuple[str, str]] = {}
        for name, node in q.cols:
            nm = name or _first_col(node) or "x"
            sql, typ = self.expr(node, sc)
            new[nm] = (
                sql
                if not q.where
                else f'CASE WHEN "_w" THEN {sql} ELSE {ident(nm) if nm in cols else "NULL"} END',
                typ,
            )
        outs: list[tuple[str, str, str]] = []
        for c, t in cols.items():
            outs.append((c, *new[c]) if c in new else (c, ident(c), t))
        outs += [(n, sql, t) for n, (sql, t) in new.items() if n not in cols]
        select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
        return _Result(f'SELECT {select} FROM {src} ORDER BY "_r"', 0, outs)

    def delete(self, q: Query) -> _Result:
        """delete c, ... from t (a copy of t without those columns) or delete from t where ... (without the
        rows the where keeps). t itself is never written."""
        if q.by:
            raise QError("nyi: delete ... by")
        if q.cols and q.where:
            raise QError("nyi: delete takes columns or a where, not both")
        if q.cols:
            src, cols = self.source(q.source)
            drop = []
            for name, node in q.cols:
                if name is not None or not isinstance(node, Col) or node.attr:
                    raise QError("type: delete takes column names, e.g. delete price, size from trade")
                if node.name not in cols:
                    raise QError(f"{node.name}: no such column; columns are {', '.join(cols)}")
                drop.append(node.name)
            outs = [(c, ident(c), t) for c, t in cols.items() if c not in drop]
            if not outs:
                raise QError("length: delete would leave no columns")
            return _Result(f"SELECT {', '.join(ident(n) for n, _, _ in outs)} FROM {src}", 0, outs)
        base, cols = self.numbered(q.source)
        keep = f" WHERE NOT {self.kept(q, base, cols)}"
        outs = [(c, ident(c), t) for c, t in cols.items()]
        return _Result(f'SELECT * EXCLUDE ("_r") FROM {base}{keep} ORDER BY "_r"', 0, outs)

    # -- table expressions ---------------------------------------------------------------------------------
    def rows(self, sql: str, col: str, alias: str | None = None) -> str:
        """A from-phrase: the rows of query `sql` numbered 1, 2, ... in their order, in column `col`."""
        inner, outer = self.alias(), alias or self.alias()
        return f"(SELECT *, row_number() OVER () AS {ident(col)} FROM ({sql}) AS {inner}) AS {outer}"

    def table(self, node: object) -> _Result:
        """Any table-valued node: a name, a query, (value), aj[...], or a table dyad."""
        if isinstance(node, Col) and not node.attr:
            node = node.name
        if isinstance(node, str):
            return self.query(Query("select", source=node))
        if isinstance(node, Sub):
            return self.table(node.query)
        if isinstance(node, Query):
            if node.verb == "exec" and node.by:
                raise QError("type: exec ... by is a dictionary, not a table; use select ... by")
            return self.query(node)
        if isinstance(node, AJ):
            return _wj(self, node) if node.fn in ("wj", "wj1") else _aj(self, node)
        if isinstance(node, TOp):
            return self.dyad(node)
        raise QError(f"type: expected a table, got {_describe(node)}")

    def dyad(self, node: TOp) -> _Result:
        op, left, right = node.op, node.left, node.right
        if op in ("lj", "ij"):
            return self.join(op, self.table(left), self.table(right))
        if op == "#":
            return self.take(_whole(left, "#"), self.table(right))
        if op == "!":
            n = _whole(left, "!")
            r = self.table(right)
            if not 0 <= n <= len(r.outs):
                raise QError(f"length: {n}!t needs 0 <= n <= {len(r.outs)} (t's columns)")
            return _Result(r.sql, n, r.outs)
        names = _syms(left, op)
        r = self.table(right)
        have = [n for n, _, _ in r.outs]
        for c in names:
            if c not in have:
                raise QError(f"{c}: no such column; columns are {', '.join(have)}")
        if op == "xkey":
            outs = [o for c in names for o in r.outs if o[0] == c] + [o for o in r.outs if o[0] not in names]
            select = ", ".join(ident(n) for n, _, _ in outs)
            return _Result(f"SELECT {select} FROM ({r.sql}) AS {self.alias()}", len(names), _plain(outs))
        # xasc / xdesc: stable (ties keep their order), nulls first ascending and last descending, as q's
        way = "ASC NULLS FIRST" if op == "xasc" else "DESC NULLS LAST"
        by = ", ".join(f"{ident(c)} {way}" for c in names)
        sql = f'SELECT * EXCLUDE ("_o") FROM {self.rows(r.sql, "_o")} ORDER BY {by}, "_o"'
        return _Result(sql, r.keys, _plain(r.outs))

    def take(self, n: int, r: _Result) -> _Result:
        """n#t: the first n rows (-n#t: the last n) in t's order (a table's: as stored, which is arrival
        in the rdb); more than t has repeats t's rows cyclically, an empty t gives n null rows; q's take."""
        a, b = self.alias(), self.alias()
        k = abs(n)
        if k > MAX_TAKE:
            raise QError(f"limit: {n}#t: take at most {MAX_TAKE} rows")
        if n >= 0:
            inner = f"SELECT * FROM ({r.sql}) AS {a} LIMIT {k}"
            pos = 'r."_i"'
        else:
            count = f"(SELECT count(*) FROM ({r.sql}) AS {self.alias()})"  # cheap on a table: no window
            rows = self.rows(r.sql, "_p")
            inner = f'SELECT * EXCLUDE ("_p") FROM {rows} WHERE "_p" > {count} - {k} ORDER BY "_p"'
            pos = f'(r."_i" - {k})'
        cols = ", ".join(f"s.{ident(o[0])}" for o in r.outs)
        sql = (
            f'SELECT {cols} FROM range({k}) AS r("_i") LEFT JOIN (SELECT *, row_number() OVER () - 1 AS "_o",'
            f' count(*) OVER () AS "_n" FROM ({inner}) AS {b}) AS s '
            f'ON s."_o" = (({pos} % s."_n") + s."_n") % s."_n" ORDER BY r."_i"'
        )
        return _Result(sql, r.keys, _plain(r.outs))

    def join(self, op: str, t: _Result, u: _Result) -> _Result:
        """t lj u / t ij u, u keyed: each t row takes the values of u's first row with its key (u's value
        columns replace t's common ones when matched; lj keeps unmatched rows with nulls, ij drops them)."""
        if not u.keys:
            raise QError(
                f"type: {op} needs a keyed table on the right (`k xkey u, 1!u or select ... by k from u)"
            )
        keys = [n for n, _, _ in u.outs[: u.keys]]
        tcols = {n: typ for n, _, typ in t.outs}
        for k in keys:
            if k not in tcols:
                raise QError(f"{k}: {op} key column missing from the left table; it has {', '.join(tcols)}")
        ta, ua = self.alias(), self.alias()
        on = " AND ".join(f"{ta}.{ident(k)} IS NOT DISTINCT FROM {ua}.{ident(k)}" for k in keys)
        part = ", ".join(ident(k) for k in keys)
        usql = (
            f'(SELECT *, TRUE AS "_m" FROM {self.rows(u.sql, "_uo")} '
            f'QUALIFY row_number() OVER (PARTITION BY {part} ORDER BY "_uo") = 1) AS {ua}'
        )
        vals = {n: typ for n, _, typ in u.outs[u.keys :]}
        outs: list[tuple[str, str, str]] = []
        for n, typ in tcols.items():
            if n in vals:
                pick = (
                    f"{ua}.{ident(n)}"
                    if op == "ij"
                    else f'CASE WHEN {ua}."_m" THEN {ua}.{ident(n)} ELSE {ta}.{ident(n)} END'
                )
                outs.append((n, pick, typ))
            else:
                outs.append((n, f"{ta}.{ident(n)}", typ))
        outs += [(n, f"{ua}.{ident(n)}", typ) for n, typ in vals.items() if n not in tcols]
        select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
        kind = "LEFT JOIN" if op == "lj" else "JOIN"
        tsql = self.rows(t.sql, "_to", ta)
        sql = f'SELECT {select} FROM {tsql} {kind} {usql} ON {on} ORDER BY {ta}."_to"'
        return _Result(sql, t.keys, _plain(outs))

    def layer(self, src: str, wheres: list[str], qualify: str) -> str:
        w = f" WHERE {' AND '.join(wheres)}" if wheres else ""
        return f"(SELECT * FROM {src}{w} QUALIFY {qualify}) AS {self.alias()}"


@dataclass
class _Result:
    sql: str
    keys: int
    outs: list[tuple[str, str, str]]
    one_row: bool = False

    @property
    def types(self) -> list[tuple[str, str]]:
        return [(n, t) for n, _, t in self.outs]

    def done(self, verb: str) -> Translation:
        cols = tuple(n for n, _, _ in self.outs)
        if verb == "exec" and not self.keys:
            if len(cols) == 1:
                return Translation(self.sql, 0, "atom" if self.one_row else "list", cols)
            return Translation(self.sql, 0, "dict", cols)
        if (
            verb == "exec"
        ):  # exec c by k: a dictionary from each k (sorted) to its c (a list, or an aggregate)
            if self.keys != 1 or len(cols) != 2:
                raise QError(
                    "nyi: exec ... by takes one column and one key; use select ... by (a keyed table)"
                )
            return Translation(self.sql, 1, "dict", cols)
        return Translation(self.sql, self.keys, "table", cols)


@dataclass(frozen=True)
class _Raw:
    """A from-phrase already in SQL (with its columns' q types), for queries built inside the translator."""

    sql: str
    cols: Mapping[str, str]


def _plain(outs: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The output columns of a derived table, as read from it by name."""
    return [(n, ident(n), t) for n, _, t in outs]


def _describe(node: object) -> str:
    if isinstance(node, Lit):
        return f"a {node.typ} literal"
    if isinstance(node, Vec | Lst):
        return "a list"
    return type(node).__name__.lower()


def _whole(node: object, op: str) -> int:
    if isinstance(node, Lit) and node.typ == "int":
        return int(node.value)
    raise QError(f"type: {op} needs a whole number on the left, e.g. 5{op}t; got {_describe(node)}")


def _syms(node: object, op: str) -> list[str]:
    if isinstance(node, Lit) and node.typ == "sym":
        return [str(node.value)]
    if isinstance(node, Vec) and node.items and all(x.typ == "sym" for x in node.items):
        return [str(x.value) for x in node.items]
    raise QError(
        f"type: {op} needs column names as symbols on the left, e.g. `sym {op} t; got {_describe(node)}"
    )


def _join_columns(fn: str, c: object) -> list[str]:
    """The common columns of aj / wj, e.g. `sym`time (the last one the time)."""
    if isinstance(c, Lit) and c.typ == "sym":
        c = Vec((c,))
    if not (isinstance(c, Vec) and all(x.typ == "sym" for x in c.items)):
        raise QError(f"type: {fn}'s join columns are symbols, e.g. `sym`time")
    return [str(x.value) for x in c.items]


def _join_sides(tr: _Tr, fn: str, on: list[str], *nodes: object) -> list[tuple[str, dict[str, str]]]:
    """SQL (usable after FROM) and columns of each table argument of aj / wj (t, then q)."""
    out = []
    for node in nodes:
        if isinstance(node, Col) and not node.attr:
            out.append(tr.source(node.name))
        elif isinstance(node, Sub):
            r = tr.table(node.query)
            out.append((f"({r.sql})", dict(r.types)))
        else:
            raise QError(f"type: {fn}'s tables must be table names or (select ...)")
    for col in on:
        for (_, cols), where in zip(out, "tq", strict=False):
            if col not in cols:
                raise QError(f"{col}: join column missing from {where}")
    return out


def _aj(tr: _Tr, node: AJ) -> _Result:
    fn, args = node.fn, node.args
    if len(args) != 3:
        raise QError(f"rank: {fn}[`c1`c2;t;q] takes 3 arguments, got {len(args)}")
    c, t, q = args
    on = _join_columns(fn, c)
    (tsql, tcols), (qsql, qcols) = _join_sides(tr, fn, on, t, q)
    eq, last = on[:-1], on[-1]
    ta, qa = tr.alias(), tr.alias()
    # the as-of key: q's time then q's arrival (seq) so that among equal times the last arrival wins
    big = 2**63
    qord = "seq" if "seq" in qcols and "seq" not in on else None
    if qord and tcols[last] == "ts" and qcols[last] == "ts":
        tkey = f"epoch_ns({ta}.{ident(last)})::HUGEINT * {big} + {big - 1}"
        qkey_expr = f"epoch_ns({ident(last)})::HUGEINT * {big} + {ident(qord)}"
    elif qord and tcols[last] == "int" and qcols[last] == "int":
        tkey = f"{ta}.{ident(last)}::HUGEINT * {big} + {big - 1}"
        qkey_expr = f"{ident(last)}::HUGEINT * {big} + {ident(qord)}"
    else:
        tkey = f"{ta}.{ident(last)}"
        qkey_expr = ident(last)
    cond = " AND ".join([f"{ta}.{ident(c)} = {qa}.{ident(c)}" for c in eq] + [f'{tkey} >= {qa}."_k"'])
    outs: list[tuple[str, str, str]] = []
    matched = f'{qa}."_k" IS NOT NULL'
    for col, typ in tcols.items():
        if col in qcols and (col not in on or (fn == "aj0" and col == last)):
            outs.append((col, f"CASE WHEN {matched} THEN {qa}.{ident(col)} ELSE {ta}.{ident(col)} END", typ))
        else:
            outs.append((col, f"{ta}.{ident(col)}", typ))
    outs += [(col, f"{qa}.{ident(col)}", typ) for col, typ in qcols.items() if col not in tcols]
    select = ", ".join(f"{s} AS {ident(n)}" for n, s, _ in outs)
    torder = _order_of(tcols)
    rn = None
    if torder:
        order_sql = ", ".join(f"{ta}.{ident(c)}" for c in torder)
        tfrom = f"{tsql} AS {ta}"
    else:
        rn = '"_rn"'
        tfrom = f"(SELECT *, row_number() OVER () AS {rn} FROM {tsql}) AS {ta}"
        order_sql = f"{ta}.{rn}"
    sql = (
        f'SELECT {select} FROM {tfrom} ASOF LEFT JOIN (SELECT *, {qkey_expr} AS "_k" FROM {qsql}) AS {qa} '
        f"ON {cond} ORDER BY {order_sql}"
    )
    return _Result(sql, 0, outs)


_WJ_AGG_TYPE = {"count": "int", "avg": "float", "med": "float", "dev": "float", "sdev": "float",
                "var": "float", "svar": "float"}  # fmt: skip
_Q_INF = {"int": 2**63 - 1, "float": "'inf'::DOUBLE"}  # q's 0W / 0w: max and min of an empty list are -0W, 0W


def _window_offsets(fn: str, w: object, t: object, last: str) -> tuple[int, int]:
    """wj's window as two offsets from t's time (timespans or whole numbers: nanoseconds for a timestamp)."""
    if isinstance(w, Lst) and len(w.items) == 3 and isinstance(w.items[1], str):
        pair, table, col = w.items
        if not (isinstance(t, Col) and table == t.name and col == last):
            raise QError(f"nyi: {fn}'s window lo hi+\\:x needs x to be t's {last} ({table}.{col} given)")
        w = pair
    items = w.items if isinstance(w, Vec | Lst) else ()
    if len(items) != 2 or not all(isinstance(x, Lit) and x.typ in ("int", "span") for x in items):
        raise QError(
            f"type: {fn}'s window is a pair of offsets from t's time: lo hi+\\:t.time, (lo;hi) or lo hi, "
            "each a timespan or a whole number, e.g. -0D00:00:02 0D00:00:01"
        )
    lo, hi = (int(x.value) for x in items)
    return lo, hi


def _wj(tr: _Tr, node: AJ) -> _Result:
    """wj / wj1 as q's ww: per row of t, the rows of q with its keys from the window's first to its last
    (q in time then arrival order); wj starts at the prevailing row (the last at or before the window's
    start), wj1 at the first row at or after it; the aggregates of each (f;c) over them."""
    fn, args = node.fn, node.args
    if len(args) != 4:
        raise QError(f"rank: {fn}[w;`sym`time;t;(q;(f0;c0);(f1;c1))] takes 4 arguments, got {len(args)}")
    w, c, t, spec = args
    on = _join_columns(fn, c)
    eq, last = on[:-1], on[-1]
    if not (isinstance(spec, Lst) and len(spec.items) >= 2 and all(
            isinstance(a, Lst | Vec) and len(a.items) == 2 for a in spec.items[1:])):  # fmt: skip
        raise QError(f"type: {fn}'s last argument is (q;(f0;c0);(f1;c1);...), e.g. (quote;(max;`ask))")
    lo, hi = _window_offsets(fn, w, t, last)
    (tsql, tcols), (qsql, qcols) = _join_sides(tr, fn, on, t, spec.items[0])
    if tcols[last] != qcols[last] or tcols[last] not in ("ts", "int"):
        raise QError(f"type: {fn}'s {last} must be a timestamp or whole number in both tables")
    ta, qa, qq, b = tr.alias(), tr.alias(), tr.alias(), tr.alias()

    def key(a: str) -> str:
        col = f"{a}.{ident(last)}" if a else ident(last)
        return f"epoch_ns({col})" if tcols[last] == "ts" else col

    part = f"PARTITION BY {', '.join(ident(x) for x in eq)} " if eq else ""
    arrival = ident("seq") if "seq" in qcols and "seq" not in on else '"_arr"'
    qrows = (
        f'SELECT *, row_number() OVER ({part}ORDER BY {key("")}, {arrival}) AS "_qi" '
        f'FROM (SELECT *, row_number() OVER () AS "_arr" FROM {qsql}) AS {tr.alias()}'
    )
    same = "".join(f" AND {qa}.{ident(x)} = {ta}.{ident(x)}" for x in eq)
    start, end = f"{key(ta)} + ({lo})", f"{key(ta)} + ({hi})"
    if fn == "wj":  # from the prevailing row (the sym's first row if none is at or before the start)
        first = f'(SELECT coalesce(max({qa}."_qi"), 1) FROM {qq} AS {qa} WHERE {key(qa)} <= {start}{same})'
    else:
        first = f"(SELECT count(*) + 1 FROM {qq} AS {qa} WHERE {key(qa)} < {start}{same})"
    upto = f'(SELECT coalesce(max({qa}."_qi"), 0) FROM {qq} AS {qa} WHERE {key(qa)} <= {end}{same})'
    torder = ", ".join(f"{ta}.{ident(x)}" for x in _order_of(tcols))
    rows = (
        f'SELECT {ta}.*, row_number() OVER ({f"ORDER BY {torder}" if torder else ""}) AS "_rn", '
        f'{first} AS "_lo", {upto} AS "_hi" FROM {tsql} AS {ta}'
    )
    aggs: list[tuple[str, str, str]] = []
    for a in spec.items[1:]:
        f, col = a.items
        fname = f.name if isinstance(f, Col) and not f.attr else None
        if fname not in AGGS or not (isinstance(col, Lit) and col.typ == "sym"):
            raise QError(f"nyi: {fn}'s (f;c) takes an aggregate ({' '.join(sorted(AGGS))}) and a column name")
        name = str(col.value)
        if name not in qcols:
            raise QError(f"{name}: no such column in {fn}'s q")
        typ, x = qcols[name], f"{qa}.{ident(name)}"
        if fname in ("first", "last"):
            sql = f'{"arg_min" if fname == "first" else "arg_max"}({x}, {qa}."_qi")'
        elif fname == "count":
            sql = f'count({qa}."_qi")'
        elif fname == "sum" and typ in ("int", "float"):
            sql = f"coalesce(sum({x}), 0)" + ("::BIGINT" if typ == "int" else "")
        elif fname in ("max", "min") and typ in _Q_INF:
            sql = f"coalesce({fname}({x}), {'-' if fname == 'max' else ''}{_Q_INF[typ]})"
        else:
            sql = f"{_AGG_SQL[fname]}({x})"
        aggs.append((name, sql, _WJ_AGG_TYPE.get(fname, typ)))
    named = {n for n, _, _ in aggs}  # an aggregate's column replaces t's of its name (q's t,'...)
    outs = [(n, f"any_value({b}.{ident(n)})", typ) for n, typ in tcols.items() if n not in named]
    for n, sql_, typ in aggs:
        outs.append((_unique(n, outs), sql_, typ))
    join = f'{qa}."_qi" BETWEEN {b}."_lo" AND {b}."_hi"' + "".join(
        f" AND {qa}.{ident(x)} = {b}.{ident(x)}" for x in eq
    )
    select = ", ".join(f"{sql} AS {ident(n)}" for n, sql, _ in outs)
    sql = (
        f"WITH {qq} AS ({qrows}) SELECT {select} FROM ({rows}) AS {b} LEFT JOIN {qq} AS {qa} ON {join} "
        f'GROUP BY {b}."_rn" ORDER BY {b}."_rn"'
    )
    return _Result(sql, 0, outs)


_META_TYPE = (
    "CASE WHEN data_type IN ('BIGINT','UBIGINT','HUGEINT') THEN 'j' "
    "WHEN data_type IN ('INTEGER','UINTEGER') THEN 'i' "
    "WHEN data_type IN ('SMALLINT','USMALLINT') THEN 'h' WHEN data_type IN ('TINYINT','UTINYINT') THEN 'x' "
    "WHEN data_type = 'DOUBLE' OR data_type LIKE 'DECIMAL%' THEN 'f' "
    "WHEN data_type IN ('FLOAT','REAL') THEN 'e' "
    "WHEN data_type = 'BOOLEAN' THEN 'b' WHEN data_type = 'DATE' THEN 'd' "
    "WHEN data_type LIKE 'TIMESTAMP%' THEN 'p' WHEN data_type = 'TIME' THEN 't' "
    "WHEN data_type = 'INTERVAL' THEN 'n' WHEN data_type = 'VARCHAR' THEN {varchar} ELSE ' ' END"
)


def _meta(tr: _Tr, name: str) -> Translation:
    if name.lower() not in tr.catalog:
        raise QError(f"{name}: no such table; tables are {', '.join(sorted(tr.catalog))}")
    schema, _, table = name.rpartition(".")
    base = TABLES.get(table)
    text_cols = [c.name for c in base.columns if c.kind == "text"] if base else []
    varchar = (
        f"CASE WHEN column_name IN ({', '.join(sql_str(c) for c in text_cols)}) THEN 'C' ELSE 's' END"
        if text_cols
        else "'s'"
    )
    t = _META_TYPE.format(varchar=varchar)
    sql = (
        f"SELECT column_name AS c, {t} AS t, '' AS f, '' AS a FROM information_schema.columns "
        f"WHERE table_schema = {sql_str(schema or 'main')} AND table_name = {sql_str(table)} "
        "ORDER BY ordinal_position"
    )
    return Translation(sql, 1, "table", ("c", "t", "f", "a"))


JOINS = {"aj", "aj0", "wj", "wj1"}
QWORDS = VERBS | JOINS | {"count", "first", "last", "meta", "tables"}
CLOCK = tuple(f".z.{k}" for k in "pdtnPDTN")  # the clock names the lexer's `z` token takes


def words() -> list[str]:
    """Every word this dialect knows (the console's tab completion): verbs, keywords, functions, joins,
    table dyads spelled as words, `count each`, `tables[]` and the clock names."""
    named = KEYWORDS | MONADS | DYAD_WORDS | QWORDS | {w for w in TABLE_DYADS if w.isalpha()} | {"each"}
    return [*sorted(named - {"tables"}), "tables[]", *CLOCK]


def translate(text: str, catalog: Catalog | None = None, *, now_ns: int | None = None) -> Translation:
    """Translate one qSQL expression to DuckDB SQL. `catalog` maps each table (and `days.` view) to its
    columns and DuckDB types; default: the rdb's tables from schemas.tables. `now_ns`: the clock .z.p and
    friends read (UTC nanoseconds; default: now). Raises QError with a one-line reason."""
    if not isinstance(text, str):
        raise QError(f"type: expected text, got {type(text).__name__}")
    tr = _Tr(default_catalog() if catalog is None else catalog)
    toks = tokenize(text)
    if not toks:
        raise QError("parse: empty expression")
    p = _Parser(toks, text, now_ns)
    head = toks[0]
    nxt = toks[1].text if len(toks) > 1 else None
    if head.text == "tables" and nxt in (None, "["):
        p.take()
        if not p.at_end():
            p.expect("[")
            p.expect("]")
        res = Translation(
            "SELECT table_name AS x FROM information_schema.tables WHERE table_schema = 'main' ORDER BY 1",
            0, "list", ("x",),
        )  # fmt: skip
    elif head.text == "meta" and len(toks) == 2 and toks[1].kind == "name":
        p.i = 2
        res = _meta(tr, toks[1].text)
    elif head.text == "count" and nxt == "each":
        p.i = 2
        res = _count_each(tr, p)
    elif head.text == "count" and nxt is not None:
        p.take()
        node = parse_value(p)
        name = node.name if isinstance(node, Col) and not node.attr else node
        if isinstance(name, str) and p.at_end():  # count t: no subquery, and the rdb may know the answer
            ref, _ = tr.source(name)  # (an unknown table: the same error as in a query)
            res = Translation(f"SELECT count(*) AS x FROM {ref}", 0, "atom", ("x",), count_of=name.lower())
        else:
            inner = tr.query(node) if isinstance(node, Query) else tr.table(node)
            res = Translation(f"SELECT count(*) AS x FROM ({inner.sql}) AS {tr.alias()}", 0, "atom", ("x",))
    elif head.text in ("first", "last") and nxt is not None and nxt != "[":
        p.take()
        res = _first_last(tr, head.text, parse_value(p))
    elif head.kind == "z":
        node = p.expr()
        sql, _ = tr.expr(node, _Scope({}, ()))
        res = Translation(f"SELECT {sql} AS x", 0, "atom", ("x",))
    elif (head.kind == "name" and head.text not in QWORDS and nxt is not None and nxt not in TABLE_DYADS) or (
        head.kind not in ("name", "number", "syms") and head.text != "("
    ):
        raise QError(
            f"nyi: {text.strip()[:40]!r}: not in the supported qSQL subset "
            "(select exec update delete count first last meta tables[] aj # xasc xdesc xkey ! lj ij)"
        )
    else:
        node = parse_value(p)
        inner = node
        while isinstance(inner, TOp) and inner.op == "#":
            inner = inner.right
        if isinstance(node, Query) and node.verb == "exec":
            res = tr.query(node).done("exec")
        elif isinstance(inner, Query) and inner.verb == "exec" and not inner.by:  # n#exec ...: a list
            r = tr.table(node)
            res = _Result(r.sql, 0, r.outs).done("exec")
        else:
            r = tr.table(node)
            res = Translation(r.sql, r.keys, "table", tuple(n for n, _, _ in r.outs))
    if not p.at_end():
        raise QError(f"parse: unexpected {p.peek().text!r} after the expression")
    if any(t.kind == "z" for t in toks):
        res = replace(res, clock=True)
    return res


def _count_each(tr: _Tr, p: _Parser) -> Translation:
    """count each (t1;t2;...): the row count of each table, as a list."""
    if p.peek() is None or p.peek().text != "(":
        raise QError("type: count each needs a list of tables, e.g. count each (trade;quote)")
    p.take()
    parts = []
    while True:
        r = tr.table(parse_value(p))
        parts.append(f"SELECT {len(parts)} AS o, count(*) AS x FROM ({r.sql}) AS {tr.alias()}")
        t = p.take()
        if t.text == ")":
            break
        if t.text != ";":
            raise QError(f"parse: expected ';' or ')', got {t.text!r}")
    return Translation(
        f"SELECT x FROM ({' UNION ALL '.join(parts)}) AS {tr.alias()} ORDER BY o", 0, "list", ("x",)
    )


def _first_last(tr: _Tr, fn: str, node: object) -> Translation:
    """first t / last t: t's first (last) row as a dictionary (an empty t: its nulls); of a keyed table, the
    value columns; of exec c, the first (last) item."""
    if isinstance(node, Query) and node.verb == "exec" and not node.by:
        r = tr.query(node)
        if len(r.outs) != 1:
            raise QError(f"nyi: {fn} of an exec of {len(r.outs)} columns")
        row = tr.take(1 if fn == "first" else -1, _Result(r.sql, 0, r.outs))
        return Translation(row.sql, 0, "atom", (r.outs[0][0],))
    r = tr.table(node)
    row = tr.take(1 if fn == "first" else -1, _Result(r.sql, 0, r.outs))
    vals = row.outs[r.keys :]
    cols = ", ".join(ident(n) for n, _, _ in vals)
    return Translation(
        f"SELECT {cols} FROM ({row.sql}) AS {tr.alias()}", 0, "dict", tuple(n for n, _, _ in vals)
    )


def to_sql(text: str, catalog: Catalog | None = None) -> str:
    """The DuckDB SQL for one qSQL expression (see translate)."""
    return translate(text, catalog).sql
