"""Tickerplant batches -> MarginEngine: the one routing of calc's input tables, shared by the live service
(calc/server.py) and the backtest (replay/backtest.py), so a journal is applied the same way by both.

    for result in apply_batch(engine, table, batch, calc_config):  # fill / trade / quote / param
        print(result.what, result.message)                          # (param rows only)

fill rows change positions, trade prices and quote mids change prices (`apply_event`); param rows put a
stored parameter file in force (`calc.params.apply_param`), one at a time, and one that cannot be applied
leaves the previous file in force instead of stopping the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from calc.params import apply_param, param_rows

if TYPE_CHECKING:
    from calc.engine import MarginEngine

INPUT_TABLES = ("fill", "trade", "quote", "param", "call")  # what calc applies
OUTPUT_TABLES = ("margin", "alert", "forecast", "callcheck")  # what calc publishes


def apply_event(engine: MarginEngine, table: str, batch: pa.RecordBatch) -> int:
    """Route one batch of fill, trade, quote or call rows to the engine: fills change positions, trades
    and quote mids change prices, calls are matched with the forecast. Returns the rows applied (0 for
    any other table)."""
    seq = batch.column("seq").to_numpy()
    t = batch.column("time").to_numpy().view(np.int64)  # timestamp[ns] -> int ns, no copy
    if table == "fill":
        return engine.apply_fills(
            batch.column("account").to_pylist(),
            batch.column("sym").to_pylist(),
            batch.column("side").to_pylist(),
            batch.column("qty").to_numpy(),
            batch.column("price").to_numpy(),
            seq,
            t,
        )
    if table == "trade":
        return engine.apply_prices(batch.column("sym").to_pylist(), batch.column("price").to_numpy(), seq, t)
    if table == "quote":
        bid, ask = batch.column("bid").to_numpy(), batch.column("ask").to_numpy()
        return engine.apply_quotes(batch.column("sym").to_pylist(), bid, ask, seq, t)
    if table == "call":  # the CCP's actual calls: the forecast's parallel run (calc/projection.py)
        cols = {n: batch.column(n).to_pylist() for n in batch.schema.names if n not in ("time", "seq")}
        return engine.apply_calls(cols, seq, t)
    return 0


@dataclass(frozen=True)
class ParamResult:
    """One `param` row and what became of it: `applied` with apply_param's account of it as `message`,
    or not applied (the previous file stays in force) with the reason as `message`."""

    row: dict[str, Any]
    applied: bool
    message: str

    @property
    def what(self) -> str:
        r = self.row
        return f"param event seq {r['seq']} ({r['kind']} {r['file_id']} {r['content_hash'][:12]})"


def apply_params(engine: MarginEngine, batch: pa.RecordBatch, calc: Any) -> list[ParamResult]:
    """Put each row of a `param` batch in force (calc.params.apply_param, reading stored files by the
    [calc] config `calc`). A row that cannot be applied never raises: its result says why."""
    out = []
    for row in param_rows(batch):
        try:
            out.append(ParamResult(row, True, apply_param(engine, row, calc)))
        except Exception as e:  # a bad param event must not stop calc: the old parameters stay in force
            out.append(ParamResult(row, False, str(e)))
    return out


def apply_batch(engine: MarginEngine, table: str, batch: pa.RecordBatch, calc: Any) -> list[ParamResult]:
    """Apply one batch of any of INPUT_TABLES: param rows by apply_params (their results returned),
    the others by apply_event (no results; a malformed batch raises as apply_event does)."""
    if table == "param":
        return apply_params(engine, batch, calc)
    apply_event(engine, table, batch)
    return []
