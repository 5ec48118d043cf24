"""The `span` model of the streaming engine: accounts with model `span` are margined by one SpanBook,
kept in step with MarginEngine's positions (only the changed contracts move, each in O(scenarios)).

    calc.span_file = "data/span/takasbank_2016-05-17.spn"  # the file in force at start ([calc] config)
    eng = MarginEngine.from_config(calc)                      # accounts with model "span" use SpanModel
    eng.update_external("span", lambda m: m.reload(params))   # a new file (calc/params.py, param event)

Instruments are contract keys written as symbols (calc.span.format_key, e.g. BIST/XU030/FUT/201606S0,
BIST/AKBNKE/OOP/201606S0/C/6.25); the margin row's margin = var = the SPAN total (summed over currencies),
drivers = each contract's share (SpanBook.contributions), param_id = `param_id(params)`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError
from calc.models import ExternalResult, register_model
from calc.span.model import SpanFileError, SpanParams, format_key, parse_key
from calc.span.parser import load_span_file
from calc.span.portfolio import SpanBook

log = logging.getLogger("marginflow.calc.span")
_CACHE: dict[tuple[str, int, int], SpanParams] = {}  # (path, size, mtime_ns) -> parsed file (immutable)


def param_id(params: SpanParams) -> str:
    """What margin rows carry for a SPAN file: `span:<file id>:<first 12 hex of its sha256>` (the file id
    alone names the CCP's file, the hash tells apart two versions of it)."""
    return f"span:{params.file_id}:{params.sha256[:12]}"


def load_cached(path: str | Path) -> SpanParams:
    """load_span_file, parsed once per (path, size, mtime) in this process (SpanParams is never mutated)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise SpanFileError("spanFile", f"cannot read file: {e.strerror or e}", str(path)) from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        _CACHE.clear()  # one file in force at a time: keep memory flat
        _CACHE[key] = load_span_file(path)
    return _CACHE[key]


class SpanModel:
    """ExternalModel for MarginEngine: per-account SPAN state in one SpanBook under the file in force."""

    def __init__(self, params: SpanParams) -> None:
        self.book = SpanBook(params)
        self._rows: dict[str, int] = {}  # canonical symbol -> contract row in the current file
        self._slot_rows: dict[str, np.ndarray] = {}  # account -> contract row of each engine slot
        self._warned: set[str] = set()

    @classmethod
    def from_config(cls, calc: Any) -> SpanModel:
        """The model under [calc] span_file; InputError when it is missing or refused."""
        path = (
            (calc.get("span_file") if isinstance(calc, dict) else getattr(calc, "span_file", ""))
            if calc
            else ""
        )
        if not path:
            raise InputError("model span: calc.span_file (the SPAN file in force at start) is not set")
        try:
            return cls(load_cached(path))
        except SpanFileError as e:
            raise InputError(f"model span: calc.span_file: {e}") from None

    @property
    def params(self) -> SpanParams:
        return self.book.params

    @property
    def param_id(self) -> str:
        return param_id(self.book.params)

    # ---- the engine's hooks ------------------------------------------------------------------------
    def _row(self, sym: str) -> int | None:
        row = self._rows.get(sym)
        if row is None:
            try:
                key = parse_key(sym)
            except ValueError:
                return None
            row = self.params.index.get(key)
            if row is None or format_key(key) != sym:  # one symbol per contract: the canonical spelling
                return None
            self._rows[sym] = row
        return row

    def instrument(self, sym: str) -> tuple[float, float] | None:
        """(settlement price, contract value factor) of a contract of the file in force, None if the file
        has no such contract or `sym` is not its canonical symbol (format_key)."""
        row = self._row(sym)
        return None if row is None else (float(self.params.c_price[row]), float(self.params.c_cvf[row]))

    def _rows_of(self, syms: list[str], qty: np.ndarray, account: str | None = None) -> np.ndarray:
        """Contract row of each engine slot (-1: not in the file). An account's slots only grow, so its
        rows are cached and only new slots are looked up."""
        old = self._slot_rows.get(account) if account is not None else None
        n0 = 0 if old is None else len(old)
        if old is not None and n0 == len(syms):
            return old
        tail = np.fromiter(
            (-1 if (r := self._row(s)) is None else r for s in syms[n0:]), np.int64, len(syms) - n0
        )
        rows = tail if old is None else np.concatenate([old, tail])
        if account is not None:
            self._slot_rows[account] = rows
        for i in np.flatnonzero((rows < 0) & (qty != 0)).tolist():
            if syms[i] not in self._warned:  # the engine admits only known contracts; warn, never crash
                self._warned.add(syms[i])
                log.error(
                    "span: %s is not a contract of %s; its position is not margined", syms[i], self.param_id
                )
        return rows

    def _result(self, book: SpanBook, account: str, rows: np.ndarray) -> ExternalResult:
        total = float(book.totals()[book.account_index[account]].sum())
        return ExternalResult(var=total, es=0.0, contrib=book.contributions(account, rows)[1])

    def evaluate_account(
        self, account: str, syms: list[str], qty: np.ndarray, price: np.ndarray, multiplier: np.ndarray
    ) -> ExternalResult:
        """The incremental path: the contracts whose quantity differs from the book's move (their CCs
        recomputed, one kernel call), then the account's total and per-contract contributions."""
        total, contrib = self.book.sync(account, self._rows_of(syms, qty, account), qty)
        return ExternalResult(var=total, es=0.0, contrib=contrib)

    def evaluate(
        self, syms: list[str], qty: np.ndarray, price: np.ndarray, multiplier: np.ndarray
    ) -> ExternalResult:
        """The stateless path (the engine's full recompute and what-if): a fresh book for these positions."""
        rows = self._rows_of(syms, qty)
        ok = (rows >= 0) & (qty != 0)
        book = SpanBook(self.params, ["x"], capacity=1)
        book.set_positions(
            [("x", self.params.keys[r], q) for r, q in zip(rows[ok].tolist(), qty[ok].tolist(), strict=True)]
        )
        return self._result(book, "x", rows)

    # ---- a new parameter file ------------------------------------------------------------------------
    def reload(self, params: SpanParams) -> None:
        """Every account's positions under a new file (full recompute); SpanPositionError naming the held
        contracts the new file lacks, and the old file stays in force."""
        self.book = self.book.reload(params)
        self._rows.clear()
        self._slot_rows.clear()
        self._warned.clear()


register_model("span", SpanModel.from_config)
