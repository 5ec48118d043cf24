"""calc's restart replay: how long a restarted calc takes to rebuild its state from the day's journal
(what it does before it is live), against reading the journal alone and a lower bound that conflates.

    .venv/bin/python benchmarks/bench_restart.py [--events 300000] [--per-flush 10] [--runs 2]

The day: the demo feed's simulator (`tickerplant.feed.MarketSimulator`, the demo's accounts and fill ratio)
through the tickerplant core and its journal (`JournaledCore`, no sockets), `--per-flush` events a message
and a flush after each message as the live tickerplant's short publish interval gives (trade, quote and
fill batches of a few rows, interleaved in seq). Rows: `journal read` = `journal_reader.read_files` in seq
order, nothing applied; `calc's replay` = the same slices through `calc.events.apply_batch` into
`MarginEngine.from_config`, then the first margin rows (what calc does before it is live); `conflated` =
each table's rows as one batch (not exact when trades and quotes of one instrument interleave: a lower
bound of what a replay conflating per instrument could reach). Margins of the replay and the conflated
run are printed side by side (max relative difference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calc.engine import MarginEngine  # noqa: E402
from calc.events import INPUT_TABLES, apply_batch  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow import config  # noqa: E402
from schemas import wire  # noqa: E402
from tests.support.servers import system_core, tp_config  # noqa: E402
from tickerplant import journal  # noqa: E402
from tickerplant import journal_reader as reader  # noqa: E402
from tickerplant.client import upd_message  # noqa: E402
from tickerplant.feed import demo_simulator  # noqa: E402


def write_day(cfg: config.Config, folder: Path, events: int, per_flush: int) -> tuple[Path, str, int]:
    """The demo feed's `events` journaled by a tickerplant core in `folder`; (root, date, rows)."""
    tp_cfg = tp_config(folder)
    tp = system_core(tp_cfg)
    sim = demo_simulator(cfg)
    msg_id = 0
    for _ in range(events // per_flush):
        sim.step(0.01)
        for table, cols in sim.messages(per_flush):
            msg_id += 1
            tp.on_frame(1, wire.encode(upd_message(table, cols, msg_id)))
        tp.flush()
    tp.close()
    return Path(tp_cfg.journal_dir), tp.core.date, tp.core.journaled_seq


def replay(cfg: config.Config, slices: list[tuple[str, pa.RecordBatch]]) -> tuple[MarginEngine, float]:
    eng = MarginEngine.from_config(cfg.calc)
    t0 = time.perf_counter()
    for table, b in slices:
        apply_batch(eng, table, b, cfg.calc)
    eng.changed_rows()  # the first publish: every account's row
    return eng, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300_000, help="events of the day")
    ap.add_argument("--per-flush", type=int, default=10, help="events a message, one flush after each")
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    cfg = config.load()
    warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root, date, rows = write_day(cfg, Path(tmp), args.events, args.per_flush)
        t_write = time.perf_counter() - t0
        files = {t: p for t, p in journal.day_files(root, date).items() if t in INPUT_TABLES}
        results: dict[str, list[float]] = {"read": [], "replay": [], "conflated": []}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            slices = list(reader.read_files(files))
            results["read"].append(time.perf_counter() - t0)
            eng, secs = replay(cfg, slices)
            results["replay"].append(secs)
            per_table: dict[str, list[pa.RecordBatch]] = {}
            for table, b in slices:
                per_table.setdefault(table, []).append(b)
            whole = [
                (t, pa.Table.from_batches(bs).combine_chunks().to_batches()[0]) for t, bs in per_table.items()
            ]
            conf, secs = replay(cfg, whole)
            results["conflated"].append(secs)
    n = sum(b.num_rows for _, b in slices)
    diff = np.max(np.abs(eng.margin - conf.margin) / np.maximum(1.0, np.abs(eng.margin)))
    print(
        f"day: {n:,} trade/quote/fill rows ({rows:,} journaled) in {len(slices):,} seq-ordered slices "
        f"({n / len(slices):.1f} rows each), {len(eng.accounts)} accounts; written in {t_write:.1f} s\n"
    )
    print("| method | seconds per run | events/s (best) | us per slice (best) | vs calc's replay |")
    print("|---|---|---:|---:|---:|")
    best = min(results["replay"])
    for name, key in (
        ("journal read in seq order, nothing applied", "read"),
        ("calc's replay: apply_batch per slice, then the first rows", "replay"),
        ("conflated: one batch per table (a lower bound, not exact)", "conflated"),
    ):
        s = results[key]
        print(
            f"| {name} | {' / '.join(f'{x:.2f}' for x in s)} | {n / min(s):,.0f} | "
            f"{min(s) / len(slices) * 1e6:.0f} | {best / min(s):.1f}x |"
        )
    print(f"\nmargins, replay vs conflated: max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
