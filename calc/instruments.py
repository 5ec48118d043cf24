"""The instrument master (issue #14 item 1): a risk parameter file, loaded with
`marginflow params load FILE --kind instruments` and journaled as a `param` event, that says what each
sym is (equity, future or option) and, for options, what is needed to price it.

    sym,kind,underlying,expiry,strike,right,multiplier,exercise[,vol,rate,dividend_yield,adv]
    AAPL,equity,,,,,1,
    AAPL_C130_20230317,option,AAPL,2023-03-17,130,C,100,american,0.3,0.04,0.005

    inst = load_instruments("data/demo/instruments.csv")   # Instruments; InputError naming row and field
    inst.index["AAPL"], inst.model[inst.options], inst.is_call, inst.american
    time_to_expiry(inst.expiry, "2022-12-28")              # years = calendar days / 365, 0 on/after expiry

Rules (each refusal is an InputError naming the file, the row, the field and the reason): kind is
equity | future | option; names (sym, underlying) follow the tickerplant's name rule; a sym appears once;
multiplier > 0 (empty = 1); only options have strike, right and exercise; a future and an option need an
ISO expiry date (an equity has none); an option needs an underlying that the file lists as an equity or
a future, a strike > 0, right C | P and exercise european | american; vol, when given, is in (0, 5];
rate and dividend_yield, when given, are finite; adv (average daily volume in units, for the CCP models'
concentration add-on), when given, is > 0. The pricing model of an option follows its underlying:
bsm (Black-Scholes-Merton with dividend yield) on an equity, black76 on a future. Empty optional numbers
are NaN in the result (not given: the engine takes them from elsewhere, e.g. the volatility surface).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError
from schemas.tables import NAME, NAME_RE, name_problem

KINDS = ("equity", "future", "option")  # codes of Instruments.kind: the index in this tuple
MODELS = ("bsm", "black76", "linear")  # codes of Instruments.model (calc/options.py uses the same codes)
EXERCISES = ("european", "american")
RIGHTS = ("C", "P")
COLUMNS = ("sym", "kind", "underlying", "expiry", "strike", "right", "multiplier", "exercise")
OPTIONAL_COLUMNS = ("vol", "rate", "dividend_yield", "adv")
MAX_VOL = 5.0
MAX_NAME = NAME.max_length  # the tickerplant's name rule (schemas/tables.py)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


@dataclass(frozen=True)
class Instruments:
    """The instrument master as arrays, one entry per sym in file order (`index[sym]` is its position).
    `underlying[i]` is the index of an option's underlying (its own index for equities and futures);
    `expiry` is NaT for equities; strike NaN for non-options; vol / rate / dividend_yield NaN when not
    given."""

    syms: list[str]
    index: dict[str, int]
    kind: np.ndarray  # int8, codes into KINDS
    underlying: np.ndarray  # int64
    expiry: np.ndarray  # datetime64[D]
    strike: np.ndarray  # float64
    is_call: np.ndarray  # bool (False for non-options)
    american: np.ndarray  # bool (False for non-options)
    multiplier: np.ndarray  # float64 > 0
    model: np.ndarray  # int8, codes into MODELS
    vol: np.ndarray  # float64
    rate: np.ndarray  # float64
    dividend_yield: np.ndarray  # float64
    adv: np.ndarray | None = (
        None  # float64 average daily volume in units, NaN (or None: the column) not given
    )

    def __len__(self) -> int:
        return len(self.syms)

    @property
    def options(self) -> np.ndarray:
        """Indices of the options."""
        return np.flatnonzero(self.kind == KINDS.index("option"))

    def of_kind(self, kind: str) -> list[str]:
        return [s for s, k in zip(self.syms, self.kind.tolist(), strict=True) if KINDS[k] == kind]


def time_to_expiry(expiry: Any, as_of: Any) -> Any:
    """Years from `as_of` to `expiry` = calendar days / 365, 0 on or after expiry. Either may be a date,
    an ISO string, a numpy datetime64 or an array of them; a scalar in -> a float out, else an array
    (NaN where the expiry is NaT)."""
    e = np.asarray(expiry, dtype="datetime64[D]")
    a = np.asarray(as_of, dtype="datetime64[D]")
    days = np.where(np.isnat(e) | np.isnat(a), np.nan, (e - a).astype("float64"))
    years = np.maximum(days, 0.0) / 365.0
    return float(years) if years.ndim == 0 else years


# ---------------------------------------------------------------- reading a CSV row by row (shared)


class Row:
    """One data row of a CSV parameter file: its fields by column, and where it is for error texts
    (`row` counts data rows from 1; the header is line 1, so the row is on line row + 1)."""

    def __init__(self, path: Path, row: int, values: dict[str, str]) -> None:
        self.path, self.row, self.values = path, row, values

    def error(self, field: str, reason: str) -> InputError:
        return InputError(f"{self.path}: row {self.row} (line {self.row + 1}), field {field}: {reason}")

    def text(self, field: str) -> str:
        return self.values.get(field, "").strip()

    def name(self, field: str) -> str:
        value = self.values.get(field, "")
        if not value:
            raise self.error(field, "empty (a name is required)")
        if len(value) > MAX_NAME or NAME_RE.search(value) is None:
            why = f"longer than {MAX_NAME} characters" if len(value) > MAX_NAME else name_problem(value)
            raise self.error(field, f"{value[:40]!r} is not a valid name: {why}")
        return value

    def number(self, field: str, default: float = math.nan) -> float:
        text = self.text(field)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise self.error(field, f"{text[:40]!r} is not a number") from None
        if not math.isfinite(value):
            raise self.error(field, f"{text[:40]!r} is not a finite number")
        return value

    def date(self, field: str) -> np.datetime64:
        text = self.text(field)
        if not text:
            raise self.error(field, "empty (an ISO date YYYY-MM-DD is required)")
        try:
            if not _ISO_DATE.match(text):
                raise ValueError
            return np.datetime64(dt.date.fromisoformat(text), "D")
        except ValueError:
            raise self.error(field, f"{text[:40]!r} is not an ISO date YYYY-MM-DD") from None

    def choice(self, field: str, allowed: tuple[str, ...]) -> str:
        text = self.text(field)
        if text not in allowed:
            shown = repr(text[:40]) if text else "empty"
            raise self.error(field, f"{shown} is not one of {' | '.join(allowed)}")
        return text


def read_rows(path: str | Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> Iterator[Row]:
    """The data rows of a CSV (.csv or .csv.gz) with these required columns (and these optional ones;
    any other column is refused, a typo must not be ignored). InputError naming the file and the column
    or row when it cannot be read."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader, [])]
    if not header:
        raise InputError(f"{path}: empty file (expected a header {','.join(columns)})")
    for h in header:
        if header.count(h) > 1:
            raise InputError(f"{path}: header: column {h!r} appears twice")
        if h not in columns and h not in optional:
            raise InputError(
                f"{path}: header: unknown column {h[:40]!r} (columns: {', '.join(columns + optional)})"
            )
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path}: header: column {missing[0]} is missing")
    n = 0
    for fields in reader:
        if not fields or fields == [""]:
            continue
        n += 1
        if len(fields) != len(header):
            raise InputError(
                f"{path}: row {n} (line {reader.line_num}): {len(fields)} fields, "
                f"the header has {len(header)}"
            )
        yield Row(path, n, dict(zip(header, fields, strict=True)))
    if n == 0:
        raise InputError(f"{path}: no data rows")


# ---------------------------------------------------------------- the instrument master


def _check_not_given(row: Row, fields: tuple[str, ...], kind: str) -> None:
    for f in fields:
        if row.text(f):
            raise row.error(f, f"a{'n' if kind[0] in 'aeiou' else ''} {kind} has no {f} (only options do)")


def load_instruments(path: str | Path) -> Instruments:
    """Read and validate an instrument master CSV (see the module docstring for the rules)."""
    rows: list[tuple[Row, dict[str, Any]]] = []
    index: dict[str, int] = {}
    for row in read_rows(path, COLUMNS, OPTIONAL_COLUMNS):
        sym = row.name("sym")
        if sym in index:
            raise row.error("sym", f"duplicate sym {sym!r} (first in row {rows[index[sym]][0].row})")
        kind = row.choice("kind", KINDS)
        rec: dict[str, Any] = {"sym": sym, "kind": kind, "underlying": sym, "expiry": np.datetime64("NaT")}
        rec["multiplier"] = row.number("multiplier", 1.0)
        if rec["multiplier"] <= 0:
            raise row.error("multiplier", f"{rec['multiplier']!r} is not > 0")
        vol = rec["vol"] = row.number("vol")
        if not math.isnan(vol) and not 0 < vol <= MAX_VOL:
            raise row.error("vol", f"{vol!r} is not in (0, {MAX_VOL:g}]")
        rec["rate"], rec["dividend_yield"] = row.number("rate"), row.number("dividend_yield")
        rec["adv"] = row.number("adv")
        if not math.isnan(rec["adv"]) and not rec["adv"] > 0:
            raise row.error("adv", f"{rec['adv']!r} is not > 0")
        rec["strike"], rec["is_call"], rec["american"] = math.nan, False, False
        if kind == "option":
            rec["underlying"] = row.name("underlying")
            rec["expiry"] = row.date("expiry")
            rec["strike"] = row.number("strike")
            if not rec["strike"] > 0:
                why = "empty" if math.isnan(rec["strike"]) else f"{rec['strike']!r} is not > 0"
                raise row.error("strike", f"{why} (an option needs a strike > 0)")
            rec["is_call"] = row.choice("right", RIGHTS) == "C"
            rec["american"] = row.choice("exercise", EXERCISES) == "american"
        else:
            _check_not_given(row, ("strike", "right", "exercise"), kind)
            if kind == "future":
                rec["expiry"] = row.date("expiry")
                if row.text("underlying"):
                    row.name("underlying")  # informative only (an index a future is on)
            else:
                _check_not_given(row, ("expiry", "underlying"), kind)
        index[sym] = len(rows)
        rows.append((row, rec))
    kinds = np.array([KINDS.index(r["kind"]) for _, r in rows], dtype=np.int8)
    under = np.arange(len(rows), dtype=np.int64)
    model = np.full(len(rows), MODELS.index("linear"), dtype=np.int8)  # options set below
    for i, (row, rec) in enumerate(rows):
        if rec["kind"] != "option":
            continue
        u = index.get(rec["underlying"])
        if u is None:
            raise row.error(
                "underlying", f"{rec['underlying']!r} is not in the file (as an equity or a future)"
            )
        if rows[u][1]["kind"] == "option":
            raise row.error("underlying", f"{rec['underlying']!r} is an option (need an equity or a future)")
        under[i] = u
        model[i] = MODELS.index("bsm" if rows[u][1]["kind"] == "equity" else "black76")

    def col(key: str, dtype: Any) -> np.ndarray:
        return np.array([r[key] for _, r in rows], dtype=dtype)

    return Instruments(
        syms=[r["sym"] for _, r in rows],
        index=index,
        kind=kinds,
        underlying=under,
        expiry=col("expiry", "datetime64[D]"),
        strike=col("strike", np.float64),
        is_call=col("is_call", bool),
        american=col("american", bool),
        multiplier=col("multiplier", np.float64),
        model=model,
        vol=col("vol", np.float64),
        rate=col("rate", np.float64),
        dividend_yield=col("dividend_yield", np.float64),
        adv=col("adv", np.float64),
    )
