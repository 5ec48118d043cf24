"""calc/events.py: the one routing of tickerplant batches to the engine that live calc and the backtest
share; the backtest reaches it without the websocket server module."""

from __future__ import annotations

import subprocess
import sys

import pyarrow as pa

from calc.engine import MarginEngine
from calc.events import INPUT_TABLES, apply_batch
from marginflow import config
from tests.support import ROOT


def _batch(seq0: int, **cols: list) -> pa.RecordBatch:
    n = len(next(iter(cols.values())))
    return pa.record_batch(
        {
            **cols,
            "seq": pa.array(range(seq0, seq0 + n), pa.int64()),
            "time": pa.array([1_700_000_000_000_000_000 + i for i in range(n)], pa.timestamp("ns")),
        }
    )


def test_the_backtest_does_not_import_the_websocket_server():
    code = "import sys, replay.backtest; print(sorted(m for m in sys.modules if m.startswith('calc.server')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_param_rows_that_cannot_be_applied_are_results_not_exceptions(tmp_path):
    cfg = config.load(None, {"calc": {"params_dir": str(tmp_path)}}).calc
    eng = MarginEngine.from_config(cfg)
    before = eng.snapshot()["margin"]
    param = _batch(
        7,
        kind=["history", "price_accept"],
        file_id=["closes.csv:2026-11-30", "AAPL"],
        content_hash=["ab" * 32, "not-a-price"],
        source=["/nowhere/closes.csv", "ops@test"],
    )
    results = apply_batch(eng, "param", param, cfg)
    assert [(r.row["seq"], r.applied) for r in results] == [(7, False), (8, False)]
    assert "not stored in" in results[0].message and "is not a price" in results[1].message
    assert results[0].what == f"param event seq 7 (history closes.csv:2026-11-30 {'ab' * 6})"
    assert eng.snapshot()["margin"] == before  # the previous parameters stay in force
    trade = _batch(9, sym=["AAPL"], price=[eng.st.price[eng.syms.index("AAPL")] * 1.02], size=[100])
    assert apply_batch(eng, "trade", trade, cfg) == []
    eng.changed_rows()
    assert eng.snapshot()["margin"] != before and eng.last_seq == 9
    assert "param" in INPUT_TABLES and "margin" not in INPUT_TABLES
