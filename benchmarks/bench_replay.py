"""Backtest replay speed: a 1,000,000-event demo day replayed through the margin engine with a margin
recompute after every journal batch, beside the live engine fed the same batches directly, and the naive way.

    .venv/bin/python benchmarks/bench_replay.py [--ticks 50000] [--batch-ms 1000] [--naive-batches 1500]
        [--accounts TECH01,DIV02,...]

`--accounts` keeps only those accounts of the demo's accounts and positions files (e.g. the stock accounts,
to compare with runs from before the demo gained option and CCP-model accounts).

Rows: `journal read` = tickerplant.journal_reader.read_files in seq order, nothing applied;
`backtest replay` =
replay.backtest.replay (read, merge by seq, calc.events.apply_batch, changed_rows per batch, i.e. calc with
publish_interval_ms = 0), and with --publish-ms (margin rows once per window of journal time); `live engine`
= the same batches already decoded, straight into MarginEngine (apply_prices / apply_fills + changed_rows per
batch: the live service minus the network); `naive` = a full recompute (MarginEngine.full_recompute) per
batch, timed on the first --naive-batches batches.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calc.history import load_prices  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow import config  # noqa: E402
from replay import backtest, demo_history  # noqa: E402
from tickerplant import journal  # noqa: E402
from tickerplant import journal_reader as reader  # noqa: E402


def decoded(root: Path, date: str) -> list[tuple[str, dict]]:
    """The replay's batches as plain columns (what a live subscriber hands the engine): the engine's
    inputs only, trades and fills (the day also holds the demo CCP's `call` rows, which it never reads)."""
    out = []
    for table, b in reader.read_files(journal.day_files(root, date)):
        if table not in ("trade", "fill"):
            continue
        cols = {
            "seq": b.column("seq").to_numpy(),
            "time": b.column("time").cast(pa.int64()).to_numpy(),
            "sym": b.column("sym").to_pylist(),
        }
        if table == "trade":
            cols["price"] = b.column("price").to_numpy()
        else:
            cols |= {
                "account": b.column("account").to_pylist(),
                "side": b.column("side").to_pylist(),
                "qty": b.column("qty").to_numpy(),
                "price": b.column("price").to_numpy(),
            }
        out.append((table, cols))
    return out


def only_accounts(calc: config.CalcConfig, keep: set[str], folder: str) -> config.CalcConfig:
    """`calc` with its accounts and positions files cut to the accounts `keep` (copies in `folder`)."""
    files = {}
    for name in ("accounts_file", "positions_file"):
        with open(getattr(calc, name), newline="") as f:
            rows = list(csv.reader(f))
        missing = keep - {r[0] for r in rows[1:]} if name == "accounts_file" else set()
        if missing:
            raise SystemExit(f"--accounts: {sorted(missing)} not in {calc.accounts_file}")
        out = Path(folder) / Path(getattr(calc, name)).name
        with open(out, "w", newline="") as f:
            csv.writer(f).writerows([rows[0], *(r for r in rows[1:] if r and r[0] in keep)])
        files[name] = str(out)
    return msgspec.structs.replace(calc, **files)


def feed(eng, batches: list[tuple[str, dict]], full: bool = False) -> int:
    n = 0
    for table, c in batches:
        if table == "trade":
            eng.apply_prices(c["sym"], c["price"], c["seq"], c["time"])
        else:
            eng.apply_fills(c["account"], c["sym"], c["side"], c["qty"], c["price"], c["seq"], c["time"])
        if full:
            eng.full_recompute()
        eng.changed_rows()
        n += len(c["seq"])
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--ticks", type=int, default=50_000, help="ticks per sym (20 syms): 50,000 -> 1,000,000 trades"
    )
    ap.add_argument("--fills", type=int, default=50, help="fills per account")
    ap.add_argument("--batch-ms", type=float, default=1000.0, help="tickerplant batch window of the journal")
    ap.add_argument("--naive-batches", type=int, default=1500)
    ap.add_argument("--accounts", default="", help="accounts to keep, comma-separated (default: all)")
    ap.add_argument(
        "--publish-ms", type=float, default=60000.0, help="conflation window of the second replay row"
    )
    args = ap.parse_args()
    calc = config.load().calc
    warm_up()
    with tempfile.TemporaryDirectory() as tmp:
        if args.accounts:
            calc = only_accounts(calc, set(args.accounts.split(",")), tmp)
        t0 = time.perf_counter()
        res = demo_history.generate(
            calc,
            tmp,
            demo_history.DemoOptions(days=1, ticks=args.ticks, fills=args.fills, batch_ms=args.batch_ms),
        )
        t_gen = time.perf_counter() - t0
        root, date = res.journal, res.dates[0]
        size = sum(p.stat().st_size for p in journal.day_files(root, date).values())

        t0 = time.perf_counter()
        n_read = sum(b.num_rows for _, b in reader.read_files(journal.day_files(root, date)))
        t_read = time.perf_counter() - t0
        rp = backtest.replay(root, calc)  # the measured runs (engine built outside the clock)
        events, batches, t_replay = rp.events, rp.batches, rp.seconds
        rc = backtest.replay(root, calc, publish_ms=args.publish_ms)
        t_conf = rc.seconds

        history = load_prices(calc.history_file)
        dec = decoded(root, date)
        eng = backtest.engine_as_of(calc, history, date)
        eng.changed_rows()
        t0 = time.perf_counter()
        n_live = feed(eng, dec)
        t_live = time.perf_counter() - t0
        for a in range(len(eng.accounts)):  # the same numbers as the replay
            last = max(i for i, x in enumerate(rp.rows["account"]) if x == eng.accounts[a])
            assert abs(eng.margin[a] - rp.rows["margin"][last]) <= 1e-9 * max(1.0, eng.margin[a])

        eng = backtest.engine_as_of(calc, history, date)
        eng.changed_rows()
        sample = dec[: args.naive_batches]
        t0 = time.perf_counter()
        n_naive = feed(eng, sample, full=True)
        t_naive = time.perf_counter() - t0

    naive_rate = n_naive / t_naive
    rows = [
        ("journal read in seq order (reader.read_files), nothing applied", n_read, batches, 0, t_read),
        (
            "backtest replay, margin rows after every batch (default)",
            events,
            batches,
            len(rp.rows["account"]),
            t_replay,
        ),
        (
            f"backtest replay, --publish-ms {args.publish_ms:g}",
            rc.events,
            rc.batches,
            len(rc.rows["account"]),
            t_conf,
        ),
        (
            "live engine, direct calls (apply + changed_rows per batch)",
            n_live,
            len(dec),
            len(rp.rows["account"]),
            t_live,
        ),
        (
            f"naive: full recompute per batch (first {len(sample):,} batches)",
            n_naive,
            len(sample),
            0,
            t_naive,
        ),
    ]
    print(
        f"accounts: {args.accounts or 'all of ' + calc.accounts_file}; "
        f"demo day {date}: {res.trades:,} trades + {res.fills:,} fills, {size / 1e6:.1f} MB of journal, "
        f"written in {t_gen:.1f} s; {batches:,} journal batches ({events / batches:.0f} rows each, "
        f"{args.batch_ms:g} ms window)\n"
    )
    print("| method | events | batches | margin rows | seconds | events/s | vs naive |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, n, b, m, s in rows:
        print(f"| {name} | {n:,} | {b:,} | {m:,} | {s:.2f} | {n / s:,.0f} | {n / s / naive_rate:.1f}x |")
    for name, secs in (("every batch", t_replay), (f"--publish-ms {args.publish_ms:g}", t_conf)):
        print(
            f"target: a 1,000,000-event day replayed in <= 10 s, {name}: "
            f"{'met' if secs <= 10 else 'NOT met'} ({secs:.2f} s)"
        )


if __name__ == "__main__":
    main()
