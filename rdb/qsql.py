"""Translate the console's qSQL subset to DuckDB SQL: a pure function from text (and a catalog of tables and
column types) to a `Translation` (the SQL, plus how q would show the result: table, keyed table, list, atom).

Supported (q evaluates right to left, without precedence; so does this):
  select [cols] [by cols] from t [where c1, c2, ...]    select[n] / select[-n] (first / last n rows)
  exec [cols] [by cols] from t [where ...]               a list (one column), an atom, or a dictionary
  count t | count select ...,  meta t,  tables[],  t (a bare table name),  aj[`sym`time; t; q],  aj0[...]
  aggregates: first last sum avg min max count med dev sdev var svar wavg wsum, `count distinct x`, `count i`
  operators: + - * % = <> < > <= >= & | and or not neg abs in within like mod div xbar ^ (fill)
  literals: 1 1.5 1e3 -2 `sym `a`b "text" 2024.01.15 2024.01.15D09:30:00.000 09:30 09:30:00.000
            0D00:05:00 1b 0N
  attributes of a timestamp: .date .time .minute .second .hh .mm .ss .year

Semantics kept from q: `first`/`last` follow arrival order (the table's `seq`, after `date` in `days.*`
views), never DuckDB's unspecified order; `by` results are keyed and sorted by the key; where-constraints
apply left to right (an aggregate in a constraint sees only rows the earlier ones kept); `select by k`
with no columns is the last row of each group; a non-aggregate column in a `by` select is a list per
group; `xbar` on times buckets from midnight; aj keeps every row of t in t's order and takes the last
(by time, then arrival) row of q at or before each t row, q's values replacing t's in common columns
when matched (aj0 also takes q's time). An unnamed column is named after the first column it mentions
(`x` if none); repeated names get 1, 2, ... appended.

`select [last c, ...] by k from t`, k being t's key and no where, reads `latest.t` (the last row per key that
rdb.store keeps at every flush) when the catalog has it, instead of scanning the day; same answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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
  | (?P<number>(?:\d+\.\d*|\.\d+|\d+)(?:e[+-]?\d+)?[bjhife]?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<op><=|>=|<>|[-+*%=<>&|,()\[\];:^~!#$@?])
    """,
    re.VERBOSE,
)
NOUN_END = {"string", "syms", "timestamp", "date", "timespan", "time", "null", "number", "name"}


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
                if m2 and m2.lastgroup == "number":
                    out.append(Tok("number", "-" + m2.group(), i, space))
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
class Col:
    name: str
    attr: str = ""  # minute, date, ... for time.minute


@dataclass(frozen=True)
class Call:
    fn: str
    args: tuple


@dataclass(frozen=True)
class Sub:
    """A parenthesized qSQL query used as a table."""

    query: object


AGGS = {"first", "last", "sum", "avg", "min", "max", "count", "med", "dev", "sdev", "var", "svar"}
MONADS = AGGS | {"neg", "abs", "not", "sqrt", "exp", "log", "floor", "ceiling", "reciprocal", "signum",
                 "string", "upper", "lower", "distinct"}  # fmt: skip
DYAD_WORDS = {"and", "or", "in", "within", "like", "mod", "div", "xbar", "wavg", "wsum"}
DYAD_OPS = {"+", "-", "*", "%", "=", "<>", "<", ">", "<=", ">=", "&", "|", "^"}
DYAD_AGGS = {"wavg", "wsum"}
ATTRS = {"date", "time", "minute", "second", "hh", "mm", "ss", "year"}
KEYWORDS = {"select", "exec", "by", "from", "where"}


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
        ns = _span_ns(s)
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
    def __init__(self, toks: list[Tok], text: str) -> None:
        self.toks, self.i, self.text = toks, 0, text

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
                if t.text in ("select", "exec"):
                    raise QError("parse: a nested select must be in parentheses")
                raise QError(f"parse: unexpected {t.text!r}")
            if (p := self.peek()) is not None and p.text == "[" and not p.space_before:
                self.take()
                args = self.args("]")
                if t.text in MONADS | DYAD_WORDS | {"xbar"}:
                    return Call(t.text, tuple(args))
                raise QError(f"parse: {t.text}[...]: unknown function")
            name, _, attr = t.text.rpartition(".")
            if name and attr in ATTRS:
                return Col(name, attr)
            return Col(t.text)
        if t.text == "(":
            p = self.peek()
            if p is not None and p.text in ("select", "exec"):
                q = parse_query(self)
                self.expect(")")
                return Sub(q)
            items = self.args(")")
            if len(items) == 1:
                return items[0]
            if all(isinstance(x, Lit) for x in items):
                return Vec(tuple(items))
            raise QError("parse: a list (a;b;...) may only hold literals")
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
    verb: str  # select | exec
    cols: list[tuple[str | None, object]] = field(default_factory=list)
    by: list[tuple[str | None, object]] = field(default_factory=list)
    source: object = None  # table name (str) or Sub
    where: list[object] = field(default_factory=list)
    limit: int | None = None


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
        elif depth == 0 and s in stops and (s == "," or p.toks[j].kind == "name"):
            break
        j += 1
    sub = _Parser(p.toks[p.i : j], p.text)
    node = sub.expr()
    if not sub.at_end():
        raise QError(f"parse: unexpected {sub.peek().text!r}")
    p.i = j
    return node


def parse_query(p: _Parser) -> Query:
    q = Query(p.take().text)
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
        if (s := p.peek()) is None or s.text not in ("select", "exec"):
            raise QError("parse: from (...) must hold a select")
        q.source = Sub(parse_query(p))
        p.expect(")")
    else:
        raise QError(f"parse: from needs a table name, got {t.text!r}")
    if (t := p.peek()) is not None and t.text == "where":
        p.take()
        q.where = [e for _, e in _phrase(p, {")"})]
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

    @staticmethod
    def values(node: object) -> str:
        """The right side of `in`: a list of literals."""
        if isinstance(node, Vec):
            return ", ".join(x.sql for x in node.items)
        if isinstance(node, Lit):
            return node.sql
        raise QError("type: in needs a list of literals on the right, e.g. sym in `a`b")

    @staticmethod
    def agg(sql: str, sc: _Scope) -> str:
        return f"{sql} OVER ()" if sc.window else sql

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
            if not (isinstance(b, Vec) and len(b.items) == 2):
                raise QError("type: within needs two bounds on the right, e.g. price within 10 20")
            x, _ = self.expr(a, sc)
            return f"({x} BETWEEN {b.items[0].sql} AND {b.items[1].sql})", "bool"
        if fn == "like":
            if not (isinstance(b, Lit) and b.typ in ("str", "sym")):
                raise QError('type: like needs a pattern on the right, e.g. sym like "A*"')
            x, _ = self.expr(a, sc)
            return f"(CAST({x} AS VARCHAR) GLOB {b.sql})", "bool"
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
            raise QError("nyi: distinct is supported only as count distinct x")
        x, t = self.expr(a, sc)
        if fn in ("first", "last"):
            return self.ordered(fn, x, sc), t
        if fn in _AGG_SQL:
            return self.agg(f"{_AGG_SQL[fn]}({x})", sc), (t if fn in ("sum", "min", "max") else "float")
        if fn == "neg":
            return f"(-{x})", t
        if fn == "not":
            return f"(NOT {x})", "bool"
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
        if isinstance(src, Sub):
            res = self.query(src.query)
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
            agg = _has_agg(c)
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
        return Translation(self.sql, self.keys, "table", cols)


def _aj(tr: _Tr, p: _Parser, fn: str) -> Translation:
    p.expect("[")
    args = p.args("]")
    if len(args) != 3:
        raise QError(f"rank: {fn}[`c1`c2;t;q] takes 3 arguments, got {len(args)}")
    c, t, q = args
    if isinstance(c, Lit) and c.typ == "sym":
        c = Vec((c,))
    if not (isinstance(c, Vec) and all(x.typ == "sym" for x in c.items)):
        raise QError(f"type: {fn}'s first argument is the join columns as symbols, e.g. `sym`time")
    on = [str(x.value) for x in c.items]

    def side(node: object) -> tuple[str, dict[str, str]]:
        if isinstance(node, Col) and not node.attr:
            return tr.source(node.name)
        if isinstance(node, Sub):
            r = tr.query(node.query)
            return f"({r.sql})", dict(r.types)
        raise QError(f"type: {fn}'s tables must be table names or (select ...)")

    tsql, tcols = side(t)
    qsql, qcols = side(q)
    for col in on:
        if col not in tcols or col not in qcols:
            where = "t" if col not in tcols else "q"
            raise QError(f"{col}: join column missing from {where}")
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
    return Translation(sql, 0, "table", tuple(n for n, _, _ in outs))


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


def translate(text: str, catalog: Catalog | None = None) -> Translation:
    """Translate one qSQL expression to DuckDB SQL. `catalog` maps each table (and `days.` view) to its
    columns and DuckDB types; default: the rdb's tables from schemas.tables. Raises QError with a one-line
    reason."""
    if not isinstance(text, str):
        raise QError(f"type: expected text, got {type(text).__name__}")
    tr = _Tr(default_catalog() if catalog is None else catalog)
    toks = tokenize(text)
    if not toks:
        raise QError("parse: empty expression")
    p = _Parser(toks, text)
    head = toks[0]
    if head.text in ("select", "exec"):
        q = parse_query(p)
        res = tr.query(q).done(q.verb)
    elif head.text in ("aj", "aj0") and len(toks) > 1 and toks[1].text == "[":
        p.take()
        res = _aj(tr, p, head.text)
    elif head.text == "tables":
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
    elif head.text == "count" and len(toks) > 1:
        p.take()
        if p.peek().text in ("select", "exec"):
            inner = tr.query(parse_query(p))
            src = f"({inner.sql}) AS {tr.alias()}"
        elif p.peek().text == "(":
            node = p.noun()
            if not isinstance(node, Sub):
                raise QError("type: count needs a table or a select")
            src = f"({tr.query(node.query).sql}) AS {tr.alias()}"
        else:
            t = p.take()
            if t.kind != "name":
                raise QError(f"type: count needs a table name, got {t.text!r}")
            src, _ = tr.source(t.text)
        res = Translation(f"SELECT count(*) AS x FROM {src}", 0, "atom", ("x",))
    elif len(toks) == 1 and head.kind == "name":
        p.take()
        src, cols = tr.source(head.text)
        res = Translation(f"SELECT * FROM {src}", 0, "table", tuple(cols))
    else:
        raise QError(
            f"nyi: {text.strip()[:40]!r}: not in the supported qSQL subset "
            "(select, exec, count, meta, tables[], aj)"
        )
    if not p.at_end():
        raise QError(f"parse: unexpected {p.peek().text!r} after the expression")
    return res


def to_sql(text: str, catalog: Catalog | None = None) -> str:
    """The DuckDB SQL for one qSQL expression (see translate)."""
    return translate(text, catalog).sql
