"""calc's rows checked against their table's own rules before they go to the tickerplant, so one row the
tickerplant would refuse (it refuses a whole upd) never takes the other accounts' rows with it.

    gate = RowGate()
    cols = gate.admit("margin", cols)    # the good rows (all of them, the usual case: one msgspec pass)
    gate.dropped                         # Counter: table -> rows dropped (each logged with its reason)

The rules are the tickerplant's: schemas.wire.columns_struct (msgspec, from schemas/tables.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from schemas import wire

log = logging.getLogger("marginflow.calc.rows")


def bad_rows(table: str, cols: Mapping[str, Sequence[Any]]) -> list[tuple[int, str]]:
    """(row, reason) of every row of `cols` the tickerplant would refuse; [] when all pass."""
    struct = wire.columns_struct(table)
    try:
        msgspec.convert(dict(cols), struct)
        return []
    except msgspec.ValidationError:
        pass
    names = list(cols)
    n = len(cols[names[0]]) if names else 0
    out = []
    for i in range(n):
        try:
            msgspec.convert({c: [cols[c][i]] for c in names}, struct)
        except msgspec.ValidationError as e:
            out.append((i, str(e).replace("[0]", "", 1)))
    return out


class RowGate:
    """Drops the rows a table's rules refuse, one by one, each logged with its reason and counted."""

    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()
        self.last: list[str] = []  # the last few reasons (for /health)

    def admit(self, table: str, cols: dict[str, list]) -> dict[str, list]:
        bad = bad_rows(table, cols)
        if not bad:
            return cols
        drop = {i for i, _ in bad}
        key = "account" if "account" in cols else next(iter(cols))
        for i, why in bad:
            text = f"{table} row for {cols[key][i]!r} dropped, the tickerplant would refuse it: {why}"
            log.error("%s", text)
            self.last = [*self.last[-4:], text]
        self.dropped[table] += len(drop)
        return {c: [v for i, v in enumerate(values) if i not in drop] for c, values in cols.items()}
