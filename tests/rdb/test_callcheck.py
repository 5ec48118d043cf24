"""The parallel run in the rdb: `callcheck` rows as calc publishes them, queried with the console's q
(accuracy per lead time), equal to calc/projection.py accuracy() on the same rows and to a hand count."""

from __future__ import annotations

import pyarrow as pa

from calc.projection import accuracy
from rdb import query
from rdb.qsql import translate
from rdb.store import Store
from schemas.tables import TABLES

ROWS = {  # account, lead, actual, p50, p95 (error = p50 - actual, covered = actual <= p95)
    "account": ["A", "A", "B", "B", "A"],
    "lead_s": [900, 3600, 900, 3600, 900],
    "actual": [100_000.0, 100_000.0, 50_000.0, 50_000.0, 80_000.0],
    "p50": [98_000.0, 90_000.0, 53_000.0, 51_000.0, 80_000.0],
    "p95": [101_000.0, 95_000.0, 56_000.0, 52_000.0, 79_000.0],
}


def callcheck_table() -> pa.Table:
    n = len(ROWS["account"])
    cols = dict(ROWS)
    cols["error"] = [p - a for p, a in zip(ROWS["p50"], ROWS["actual"], strict=True)]
    cols["covered"] = [int(a <= h) for a, h in zip(ROWS["actual"], ROWS["p95"], strict=True)]
    cols |= {
        "ccp": ["C"] * n,
        "business_date": ["2024-01-15"] * n,
        "cycle": ["EOD"] * n,
        "method": ["replica"] * n,
    }
    cols |= {
        "time": pa.array([1_705_300_000_000_000_000 + i for i in range(n)], pa.timestamp("ns")),
        "seq": list(range(1, n + 1)),
    }
    schema = TABLES["callcheck"].arrow_schema
    return pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}, schema=schema)


def test_accuracy_by_lead_in_q_equals_calcs_and_a_hand_count(store: Store) -> None:
    t = callcheck_table()
    assert store.append("callcheck", t) == t.num_rows
    q = (
        "select calls:count i, mae:avg abs error, bias:avg error, hit:avg (abs error)<=0.05*actual, "
        "worst:min error, cover:avg covered by lead_s from callcheck"
    )
    got = query.run(store, translate(q).sql, fmt="arrow").table.to_pylist()
    mine = accuracy(t.to_pydict())
    for row in got:
        m = mine[row["lead_s"]]
        assert row["calls"] == m["calls"] and row["mae"] == m["mae"] and row["bias"] == m["bias"]
        assert row["hit"] == m["hit_rate"] and row["cover"] == m["coverage"]
        assert min(row["worst"], 0.0) == m["worst_under"]
    # by hand, lead 900: errors -2,000, +3,000, 0 -> MAE 5,000/3, bias +1,000/3; within 5%: A's two;
    # covered: 100k <= 101k, 50k <= 56k, 80k > 79k -> 2 of 3
    assert mine[900] == {
        "calls": 3.0,
        "mae": 5000 / 3,
        "bias": 1000 / 3,
        "hit_rate": 2 / 3,
        "worst_under": -2000.0,
        "coverage": 2 / 3,
    }
    # lead 3600: errors -10,000 and +1,000 -> MAE 5,500, bias -4,500; within 5%: only B's; covered: B only
    assert mine[3600] == {
        "calls": 2.0,
        "mae": 5500.0,
        "bias": -4500.0,
        "hit_rate": 0.5,
        "worst_under": -10_000.0,
        "coverage": 0.5,
    }
