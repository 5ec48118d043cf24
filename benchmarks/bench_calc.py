"""Benchmark of the margin engine (no network): events/s and per-event latency for 1,000 accounts x
2,000 instruments with 500-scenario historical simulation and with parametric VaR, against a full
numpy recompute in the same run; what-if latency on a 50-position account. Prints markdown tables.
`--scale` (issue #19): HS books of 1k-10k accounts x 500-2,500 scenarios, each size in a process of its
own (peak memory), this tree beside another (`--baseline-tree`, e.g. a checkout of the tree before);
`--book options` (or `both`): the options book, 1,000 listed options on 50 of the stocks, 5 per account.

    .venv/bin/python benchmarks/bench_calc.py [--quick]
    .venv/bin/python benchmarks/bench_calc.py --scale [--baseline-tree DIR] [--sizes 1000x500,10000x2500]
        [--book hs|options|both]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TREE = os.environ.get("MF_BENCH_TREE") or str(Path(__file__).resolve().parent.parent)  # the code measured
sys.path.insert(0, TREE)

from calc.engine import MarginEngine  # noqa: E402
from calc.inputs import AccountSpec, Positions  # noqa: E402
from calc.instruments import Instruments, load_instruments  # noqa: E402
from calc.models import RiskParams, tail_count, tail_weights  # noqa: E402
from calc.warm import warm_up  # noqa: E402
from marginflow.config import calc_defaults  # noqa: E402

N_ACC, N_INST, N_SCEN, N_POS = 1000, 2000, 500, 50
# --options: OPT_UND of the stocks carry OPT_PER_UND listed options each; every account holds OPT_PER_ACC
OPT_UND, OPT_PER_UND, OPT_PER_ACC = 50, 20, 5
OPTIONS = False
AS_OF = "2026-01-02"
FILL_SHARE = 0.05  # share of events that are fills (the rest are ticks), as the demo feed
SUSTAINED_RATES = {"hvar": (100_000, 200_000, 400_000), "var": (500_000, 1_000_000, 2_000_000)}


def universe(seed: int = 1) -> tuple[RiskParams, Positions, dict[str, float]]:
    """Synthetic but realistic: returns from a 10-factor model, 50 random positions per account (and
    with OPTIONS, OPT_PER_ACC option contracts on the first OPT_UND stocks: options_master)."""
    rng = np.random.default_rng(seed)
    syms = [f"S{i:04d}" for i in range(N_INST)]
    beta = rng.normal(0, 1, (10, N_INST)) * 0.004
    fvol = np.ones(10)
    idio = rng.uniform(0.008, 0.025, N_INST)
    cov = beta.T @ np.diag(fvol) @ beta + np.diag(idio**2)
    daily = rng.normal(0, 1, (N_SCEN, 10)) @ beta + rng.normal(0, 1, (N_SCEN, N_INST)) * idio
    vol_ratio = np.exp(rng.normal(0, 0.05, (N_SCEN, N_INST))) if OPTIONS else None
    params = RiskParams(syms, cov, np.expm1(daily), 0.99, 1, "bench", vol_ratio=vol_ratio)
    acc, sym, qty = [], [], []
    n_opt = OPT_UND * OPT_PER_UND
    for a in range(N_ACC):
        for j in rng.choice(N_INST, N_POS, replace=False):
            acc.append(f"A{a:04d}")
            sym.append(syms[j])
            qty.append(float(rng.integers(100, 10_000) * rng.choice([-1, 1])))
        for c in rng.choice(n_opt, OPT_PER_ACC, replace=False) if OPTIONS else ():
            acc.append(f"A{a:04d}")
            sym.append(f"O{c:04d}")
            qty.append(float(rng.integers(1, 50) * rng.choice([-1, 1])))
    prices = dict(zip(syms, rng.uniform(10, 500, N_INST).tolist(), strict=True))
    return params, Positions(acc, sym, np.array(qty)), prices


def options_master(prices: dict[str, float], tmp: Path, seed: int = 3) -> Instruments:
    """The security master of --options: the stocks, and OPT_PER_UND European options on each of the first
    OPT_UND stocks (strikes 80-120% of its price, four expiries, calls and puts)."""
    rng = np.random.default_rng(seed)
    expiries = ["2026-02-20", "2026-03-20", "2026-06-19", "2026-12-18"]
    lines = ["sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield"]
    lines += [f"S{i:04d},equity,,,,,1,,,," for i in range(N_INST)]
    for c in range(OPT_UND * OPT_PER_UND):
        u = f"S{c // OPT_PER_UND:04d}"
        strike = round(prices[u] * (0.8 + 0.4 * (c % OPT_PER_UND) / (OPT_PER_UND - 1)), 2)
        vol = rng.uniform(0.2, 0.5)
        lines.append(
            f"O{c:04d},option,{u},{expiries[c % 4]},{strike},{'CP'[c % 2]},100,european,{vol:.4f},0.03,0.01"
        )
    path = tmp / "instruments.csv"
    path.write_text("\n".join(lines) + "\n")
    return load_instruments(path)


def build(model: str) -> MarginEngine:
    params, pos, prices = universe()
    specs = [AccountSpec(f"A{a:04d}", model, 1e7) for a in range(N_ACC)]
    # the engine alone: no alert rules, no stress scenarios beside the model, no periodic resync
    if not OPTIONS:
        calc = calc_defaults(alerts=[], stress=[], resync_events=0)
        return MarginEngine(params, specs, pos, prices=prices, calc_config=calc)
    calc = calc_defaults(alerts=[], stress=[], resync_events=0, price_band={"default": 0.0})
    with tempfile.TemporaryDirectory() as tmp:
        master = options_master(prices, Path(tmp))
    return MarginEngine(params, specs, pos, prices=prices, calc_config=calc, master=master, as_of=AS_OF)


class Events:
    """A stream of ticks (random walk on uniformly drawn instruments) and fills (a random account
    trading one of its instruments, 1 in 10 a new one), as the per-table column lists calc gets."""

    def __init__(self, eng: MarginEngine, n: int, seed: int = 2):
        rng = np.random.default_rng(seed)
        self.is_fill = rng.random(n) < FILL_SHARE
        self.inst = rng.integers(0, N_INST, n)
        px = eng.st.price.copy()
        self.price = np.empty(n)
        steps = np.exp(rng.normal(0, 0.001, n))
        for e in range(n):  # set-up only
            j = self.inst[e]
            px[j] *= steps[e]
            self.price[e] = px[j]
        self.acc = rng.integers(0, N_ACC, n)
        own = rng.random(n) < 0.9
        slot = rng.integers(0, N_POS + (OPT_PER_ACC if OPTIONS else 0), n)
        self.inst[self.is_fill & own] = eng.st.inst[self.acc, slot][self.is_fill & own]
        self.side = np.where(rng.random(n) < 0.5, "B", "S")
        self.qty = rng.integers(1, 500, n).astype(float)
        self.syms, self.accounts = eng.syms, eng.accounts
        self.n = n

    def batches(self, size: int, start: int = 0, count: int | None = None):
        """Yield per batch: (tick args, fill args) as apply_prices / apply_fills take them."""
        end = self.n if count is None else min(self.n, start + count)
        for b in range(start, end, size):
            sl = slice(b, min(end, b + size))
            seq = np.arange(sl.start + 1, sl.stop + 1)
            f = self.is_fill[sl]
            t = ~f
            inst, acc = self.inst[sl], self.acc[sl]
            ticks = ([self.syms[j] for j in inst[t]], self.price[sl][t], seq[t])
            fills = (
                [self.accounts[a] for a in acc[f]],
                [self.syms[j] for j in inst[f]],
                self.side[sl][f].tolist(),
                self.qty[sl][f],
                self.price[sl][f],
                seq[f],
            )
            yield ticks, fills


def run(eng: MarginEngine, ev: Events, size: int, start: int, count: int) -> tuple[float, np.ndarray]:
    """Events/s through apply + refresh (margins of every affected account recomputed) and the
    latency of each batch."""
    batches = list(ev.batches(size, start, count))  # the column lists, built outside the clock
    lat = np.empty(len(batches))
    t_all = time.perf_counter()
    for i, (ticks, fills) in enumerate(batches):
        t0 = time.perf_counter()
        if len(ticks[0]):
            eng.apply_prices(*ticks)
        if len(fills[0]):
            eng.apply_fills(*fills)
        eng.refresh()
        lat[i] = time.perf_counter() - t0
    return min(count, ev.n - start) / (time.perf_counter() - t_all), lat


def sustained(
    eng: MarginEngine,
    ev: Events,
    rate: float,
    seconds: float,
    publish_ms: float,
    start: int,
    refresh: list[float] | None = None,
    rows: list[float] | None = None,
) -> dict:
    """The live service's loop on a simulated feed: events arrive at `rate`/s in tickerplant batches of
    1 ms; each batch is applied as it arrives (queued); every `publish_ms` (calc's publish timer; 0 =
    as soon as the arrived batches are applied) the engine refreshes and builds the margin rows of
    every changed account (`changed_rows`, drivers included; `refresh` and `rows` get the time of each
    publish's refresh and of its rows when given). Latency of an event = end of the
    publish that covers it - its arrival time. Kept up = the median
    latency of the last tenth of the run's events is at most 1.5x that of its first half + 20 ms (no
    backlog building up) and the events were applied at >= 95% of the offered rate."""
    per = max(1, int(rate / 1000))
    n = min(int(rate * seconds), ev.n - start)
    tp_batches = list(ev.batches(per, start, n))  # built outside the clock
    arrive = np.arange(len(tp_batches)) * (per / rate)
    lat = np.zeros(len(tp_batches))
    eng.changed_rows()
    t0 = time.perf_counter()
    next_pub = publish_ms / 1000
    i = done = 0
    last_applied = 0.0
    while done < len(tp_batches):
        now = time.perf_counter() - t0
        while i < len(tp_batches) and arrive[i] <= now:
            ticks, fills = tp_batches[i]
            eng.apply_prices(*ticks)
            eng.apply_fills(*fills)
            i += 1
            last_applied = time.perf_counter() - t0
        if (publish_ms <= 0 and i > done) or (publish_ms > 0 and now >= next_pub) or i == len(tp_batches):
            t1 = time.perf_counter()
            eng.refresh()
            t2 = time.perf_counter()
            eng.changed_rows()
            if refresh is not None and rows is not None:
                refresh.append(t2 - t1)
                rows.append(time.perf_counter() - t2)
            end = time.perf_counter() - t0
            lat[done:i] = end - arrive[done:i]
            done = i
            next_pub = max(next_pub + publish_ms / 1000, end) if publish_ms > 0 else end
        elif i < len(tp_batches) and arrive[i] > now:
            time.sleep(min(arrive[i] - now, 0.0005))
    # a backlog shows as latency growing through the run; rate: events / time the last one was applied
    # (= the offered rate while the engine keeps up, less by up to one publish cycle at the end)
    first, last = np.median(lat[: len(lat) // 2]), np.median(lat[-max(1, len(lat) // 10) :])
    return {
        "events": n,
        "rate": n / last_applied,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "kept_up": bool(last <= 1.5 * first + 0.02 and n / last_applied >= 0.95 * rate),
    }


def naive_full(eng: MarginEngine) -> float:
    """The naive way: revalue every account from scratch with numpy (BLAS matmul, np.partition)."""
    st = eng.st
    x = np.zeros((len(eng.accounts), len(eng.syms)))
    live = np.arange(st.inst.shape[1])[None, :] < st.nslot[:, None]
    a_ix, s_ix = np.nonzero(live)
    j = st.inst[a_ix, s_ix]
    t0 = time.perf_counter()
    x[a_ix, j] = st.qty[a_ix, s_ix] * (st.price[j] * st.mult[j])
    if st.f_hs.any():
        k = tail_count(0.99, st.rt.shape[1])
        w = tail_weights(0.99, st.rt.shape[1])
        pnl = x @ st.rt
        worst = np.sort(np.partition(pnl, k - 1, axis=1)[:, :k], axis=1)
        var, es = -worst[:, k - 1], -(worst @ w)
        assert var.shape == es.shape
    else:
        v = np.einsum("an,an->a", x, x @ st.cov)
        var = eng.scale * np.sqrt(np.maximum(v, 0))
    return time.perf_counter() - t0


def pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer events (a smoke run)")
    ap.add_argument("--scale", action="store_true", help="issue #19's book sizes (HS), each in a process")
    ap.add_argument(
        "--sizes", default=SCALE_SIZES, help="with --scale: accounts x scenarios, comma-separated"
    )
    ap.add_argument("--baseline-tree", help="with --scale: a checkout of another tree, measured alternately")
    ap.add_argument(
        "--book", choices=("hs", "options", "both"), default="hs", help="with --scale: the book(s)"
    )
    args = ap.parse_args(argv)
    if args.scale:
        return scale_runs(args.sizes, args.baseline_tree, args.quick, args.book)
    scale = 0.2 if args.quick else 1.0
    t = time.perf_counter()
    warm = warm_up()
    print(f"warm-up (numba cache load or compile): {warm:.2f} s")
    rows, lat_rows, whatif_rows, sustained_rows = [], [], [], []
    for model, label in (("hvar", "HS-500 VaR/ES"), ("var", "parametric VaR")):
        t0 = time.perf_counter()
        eng = build(model)
        setup = time.perf_counter() - t0
        # what-if on a 50-position account (before any event changes it)
        a = eng.accounts[7]
        assert eng.st.nslot[7] == N_POS
        wl = []
        for i in range(2_000):
            trades = [
                {"sym": eng.syms[(i * 7) % N_INST], "qty": 100.0},
                {"sym": eng.syms[eng.st.inst[7, i % N_POS]], "qty": -50.0},
            ]
            t1 = time.perf_counter()
            eng.what_if(a, trades)
            wl.append(time.perf_counter() - t1)
        wl = np.array(wl)
        ev = Events(eng, int(2_000_000 * max(scale, 0.5)))
        base = np.median([naive_full(eng) for _ in range(3)])
        start = 0
        # per event (batch of 1): latency p50/p99 of apply + refresh
        n1 = int(20_000 * scale)
        eps1, lat1 = run(eng, ev, 1, start, n1)
        start += n1
        lat_rows.append((label, pct(lat1, 50) * 1e6, pct(lat1, 99) * 1e6, eps1, 1 / base, eps1 * base))
        for size, count in ((100, 100_000), (1_000, 300_000), (10_000, 500_000), (50_000, 500_000)):
            count = int(count * scale)
            eps, lat = run(eng, ev, size, start, count)
            start += count
            rows.append(
                (label, size, eps, pct(lat, 50) * 1e3, pct(lat, 99) * 1e3, size / base, eps * base / size)
            )
        # the live loop on a feed at a given rate: tickerplant batches of 1 ms, publish timer 100 ms / drain
        for rate in SUSTAINED_RATES[model]:
            for publish_ms in (100.0, 0.0):
                seconds = min(2.0, 0.95 * ev.n / rate) if scale == 1.0 else 0.5
                start = start if start + rate * seconds <= ev.n else 0  # replay the stream from its start
                r = sustained(eng, ev, rate, seconds, publish_ms, start)
                start += r["events"]
                sustained_rows.append((label, rate, publish_ms, r))
        start = start if start + 2_000 <= ev.n else 0
        # publishing: margin rows (drivers JSON) after a batch of 1,000 events
        for ticks, fills in ev.batches(1_000, start, 1_000):
            eng.apply_prices(*ticks)
            eng.apply_fills(*fills)
        eng.changed_rows()
        for ticks, fills in ev.batches(1_000, start + 1_000, 1_000):
            eng.apply_prices(*ticks)
            eng.apply_fills(*fills)
        t1 = time.perf_counter()
        pub = eng.changed_rows()
        t_pub = time.perf_counter() - t1
        # after ~1.4M incremental events: the state against a from-scratch numpy revaluation
        ref = eng.compute_full()
        drift = float(np.max(np.abs(eng.margin - ref["margin"]) / np.maximum(ref["margin"], 1e-300)))
        t1 = time.perf_counter()
        eng.full_recompute()
        t_full_engine = time.perf_counter() - t1
        whatif_rows.append(
            (
                label,
                pct(wl, 50) * 1e3,
                pct(wl, 99) * 1e3,
                len(pub["account"]),
                t_pub / max(1, len(pub["account"])) * 1e6,
                setup,
                t_full_engine,
                base,
                eng.events,
                drift,
            )
        )
    print()
    print(
        f"1,000 accounts x 2,000 instruments, {N_POS} positions per account "
        f"(25 accounts hold each instrument on average), "
        f"{FILL_SHARE:.0%} fills / {1 - FILL_SHARE:.0%} ticks; one core of {sys.platform}."
    )
    print()
    print("Per event (batch of 1: apply + margins of every affected account recomputed):")
    print()
    print(
        "| model | p50 latency (us) | p99 latency (us) | events/s "
        "| full numpy recompute per event: events/s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for r in lat_rows:
        print(f"| {r[0]} | {r[1]:,.1f} | {r[2]:,.1f} | {r[3]:,.0f} | {r[4]:,.1f} | {r[5]:,.0f}x |")
    print()
    print("Batched (the engine gets the tickerplant's batches; margins recomputed once per batch):")
    print()
    print(
        "| model | batch | events/s | batch p50 (ms) | batch p99 (ms) "
        "| full recompute per batch: events/s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:,} | {r[2]:,.0f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:,.0f} | {r[6]:,.1f}x |")
    print()
    print(
        "The live loop at a given feed rate (tickerplant batches of 1 ms applied as they arrive; "
        "margins refreshed and every changed account's row built, drivers included, per publish):"
    )
    print()
    print(
        "| model | events/s offered | publish | events/s handled "
        "| latency p50 (ms) | latency p99 (ms) | kept up |"
    )
    print("|---|---:|---|---:|---:|---:|---|")
    for label, rate, publish_ms, r in sustained_rows:
        pub = f"every {publish_ms:.0f} ms" if publish_ms > 0 else "when drained (0)"
        print(
            f"| {label} | {rate:,} | {pub} | {r['rate']:,.0f} | {r['p50'] * 1e3:.1f} | {r['p99'] * 1e3:.1f} "
            f"| {'yes' if r['kept_up'] else 'no'} |"
        )
    print()
    print(
        "| model | what-if p50 (ms) | what-if p99 (ms) | rows published after 1,000 events "
        "| us per row (drivers JSON) | engine build (s) | engine full_recompute (s) "
        "| naive full recompute (s) | events applied | max rel. diff vs full |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in whatif_rows:
        print(
            f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:,} | {r[4]:.1f} | {r[5]:.2f} "
            f"| {r[6]:.3f} | {r[7]:.3f} | {r[8]:,} | {r[9]:.1e} |"
        )
    print(f"\ntotal {time.perf_counter() - t:.0f} s")
    return 0


SCALE_SIZES = "1000x500,10000x500,1000x2500,10000x2500"
SCALE_RATE = 100_000  # events/s offered to the live loop, publishing every 100 ms


def scale_child(size: str, quick: bool, options: bool = False) -> dict:
    """One book size, in this process: build, batches of 1,000 events (apply + refresh), then the live
    loop at SCALE_RATE with 100 ms publishes (refresh and margin rows timed apart); peak RSS."""
    global N_ACC, N_SCEN, OPTIONS
    N_ACC, N_SCEN = (int(x) for x in size.split("x"))
    OPTIONS = options
    warm_up()
    t0 = time.perf_counter()
    eng = build("hvar")
    setup = time.perf_counter() - t0
    seconds = 1.0 if quick else 3.0
    n_batch = 20_000 if quick else 60_000
    ev = Events(eng, n_batch + int(SCALE_RATE * seconds) + 1)
    eng.changed_rows()
    eps, lat = run(eng, ev, 1_000, 0, n_batch)
    refresh, rows = [], []
    live = sustained(eng, ev, SCALE_RATE, seconds, 100.0, n_batch, refresh, rows)
    st = eng.st
    state = sum(
        getattr(st, k).nbytes for k in type(st)._fields
    )  # (as MarginEngine.memory; the tree before lacks it)
    return {
        "size": size,
        "book": "HS + options" if options else "HS",
        "rejected": len(eng.rejects),
        "setup_s": setup,
        "batch_eps": eps,
        "batch_p50": pct(lat, 50),
        "batch_p99": pct(lat, 99),
        "live_rate": live["rate"],
        "live_kept_up": live["kept_up"],
        "live_p99": live["p99"],
        "refresh_p50": pct(np.array(refresh), 50),
        "refresh_p99": pct(np.array(refresh), 99),
        "rows_p50": pct(np.array(rows), 50),
        "state_mib": state / 2**20,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def scale_runs(sizes: str, baseline: str | None, quick: bool, book: str = "hs") -> int:
    """--scale: each size (and book) in a child process, the baseline tree's and this tree's alternated."""
    trees = [("before", baseline)] if baseline else []
    trees.append(("this tree", TREE))
    out = []
    books = {"hs": [False], "options": [True], "both": [False, True]}[book]
    for size, opt in [(z, b) for b in books for z in sizes.split(",")]:
        for label, tree in trees:
            flags = [*(["--quick"] if quick else []), *(["--options"] if opt else [])]
            cmd = [sys.executable, __file__, "--scale-child", size, *flags]
            env = {**os.environ, "MF_BENCH_TREE": tree, "PYTHONPATH": tree}
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [x for x in r.stdout.splitlines() if x.startswith("{")]
            if r.returncode or not line:
                print(f"{label} {size}: failed\n{r.stderr[-2000:]}")
                continue
            out.append((label, json.loads(line[-1])))
            print(f"... {label} {size} done", file=sys.stderr)
    print(
        f"\nHS books, {N_INST:,} instruments, {N_POS} positions per account, {FILL_SHARE:.0%} fills; "
        f"batches of 1,000 events (apply + refresh); the live loop at {SCALE_RATE:,} events/s offered in "
        "1 ms tickerplant batches, publishing every 100 ms (refresh, then every changed account's margin "
        "row with drivers); peak RSS of the process against the kernel state's own bytes.\n"
    )
    print(
        "| tree | book | accounts x scenarios | build (s) | batch events/s | batch p50 / p99 (ms) "
        "| live events/s "
        "| kept up | refresh p50 / p99 (ms) | rows per publish p50 (ms) | event latency p99 (ms) "
        "| state (MiB) | peak RSS (MiB) |"
    )
    print("|---|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|")
    for label, r in out:
        print(
            f"| {label} | {r.get('book', 'HS')} | {r['size'].replace('x', ' x ')} | {r['setup_s']:.1f} "
            f"| {r['batch_eps']:,.0f} "
            f"| {r['batch_p50'] * 1e3:.1f} / {r['batch_p99'] * 1e3:.1f} | {r['live_rate']:,.0f} "
            f"| {'yes' if r['live_kept_up'] else 'no'} | {r['refresh_p50'] * 1e3:.1f} / "
            f"{r['refresh_p99'] * 1e3:.1f} | {r['rows_p50'] * 1e3:.1f} | {r['live_p99'] * 1e3:.0f} "
            f"| {r['state_mib']:,.0f} | {r['rss_mib']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    if "--scale-child" in sys.argv:
        i = sys.argv.index("--scale-child")
        print(json.dumps(scale_child(sys.argv[i + 1], "--quick" in sys.argv, "--options" in sys.argv)))
        sys.exit(0)
    sys.exit(main())
