"""Warm-up of the numba kernels: `warm_up()` compiles (or loads from numba's cache) every kernel on a
tiny engine (calc and the backtest call it at start); `python -m calc.warm` also runs the configured
accounts (all models, SPAN included), so the first `marginflow calc` after an install starts in seconds.
`make` runs it, on two cores: a second process compiles the parallel kernel (`numbers_parallel`, about a
third of the compile time) and the SPAN kernels while this one compiles the rest, into numba's one cache.
Both first drop caches built from other sources (`drop_stale_caches`: numba alone would keep a kernel whose
callee changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from numba.core import caching

from calc import drivers, kernels
from calc.engine import MarginEngine
from calc.inputs import AccountSpec, Positions, load_positions
from calc.instruments import KINDS, MODELS, Instruments
from calc.models import RiskParams
from calc.span.engine_model import SpanModel
from marginflow import config


def _tiny_master() -> Instruments:
    """Stocks A, B, C and two options on A (a European call, an American put): the option kernels' warm-up."""
    opt = {
        "kind": KINDS.index("option"),
        "expiry": np.datetime64("2026-06-19"),
        "strike": 10.0,
        "multiplier": 100.0,
        "vol": 0.3,
    }
    rows = [
        {"kind": 0, "expiry": np.datetime64("NaT"), "strike": np.nan, "multiplier": 1.0, "vol": np.nan}
    ] * 3
    rows += [opt, opt]
    col = lambda k, dtype: np.array([r[k] for r in rows], dtype=dtype)  # noqa: E731
    return Instruments(
        syms=["A", "B", "C", "OA", "PA"],
        index={s: i for i, s in enumerate(["A", "B", "C", "OA", "PA"])},
        kind=col("kind", np.int8),
        underlying=np.array([0, 1, 2, 0, 0], dtype=np.int64),
        expiry=col("expiry", "datetime64[D]"),
        strike=col("strike", np.float64),
        is_call=np.array([False, False, False, True, False]),
        american=np.array([False, False, False, False, True]),
        multiplier=col("multiplier", np.float64),
        model=np.array([MODELS.index(m) for m in ("linear",) * 3 + ("bsm",) * 2], dtype=np.int8),
        vol=col("vol", np.float64),
        rate=np.full(5, np.nan),
        dividend_yield=np.full(5, np.nan),
    )


KERNEL_DIRS = (Path(__file__).parent, Path(__file__).parent / "span")  # the packages of cached kernels
DIGEST_FILE = "marginflow-kernels.sha256"  # beside numba's cache files: the sources they were built from


def drop_stale_caches(dirs: Iterable[Path] = KERNEL_DIRS) -> bool:
    """Remove numba's cache files (`__pycache__/*.nbi, *.nbc`) of `dirs` when any source file there changed
    since they were written: numba checks a cached kernel against its own file only, so after an update
    of a module it calls (options.scenario_rows calls american_rows and vecmath) it would load the old
    machine code and compute the old numbers. A digest of the sources (DIGEST_FILE in the first dir's
    __pycache__) says what the caches are of; none there (a cache from before this check) counts as
    changed. Under a file lock, so processes starting together remove them once. True if removed.
    (numba's caches in the tree, its default; with NUMBA_CACHE_DIR set they are there, not checked.)"""
    dirs = list(dirs)
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(d.glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    digest = h.hexdigest()
    marker = dirs[0] / "__pycache__" / DIGEST_FILE
    lock_path = os.path.join(tempfile.gettempdir(), "marginflow-numba-digest.lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.read_text() == digest:
                return False
        except OSError:
            pass
        stale = [f for d in dirs for pattern in ("*.nbi", "*.nbc") for f in (d / "__pycache__").glob(pattern)]
        for f in stale:
            with contextlib.suppress(OSError):
                f.unlink()
        with contextlib.suppress(OSError):  # (a read-only tree: numba caches elsewhere, nothing to guard)
            marker.parent.mkdir(exist_ok=True)
            marker.write_text(digest)
        return bool(stale)


def parallel_state() -> kernels.State:
    """A one-of-everything State (no kernel called to build it) of the numba type of an engine's state
    (tests/calc/test_warm.py checks that): the parallel kernel's compile needs nothing more."""
    return kernels.alloc(A=1, N=1, P=1, H=1, S=1, K=1, R=1, C=1, Q=1)


def warm_up(before_parallel: Callable[[], object] = lambda: None) -> float:
    """Compile (or load from numba's cache) every kernel on a tiny engine; returns seconds taken.
    `before_parallel` is called before the parallel kernel's turn (`main` waits there for the process
    that compiles it). Caches built from other sources are dropped first (drop_stale_caches)."""
    t0 = time.perf_counter()
    drop_stale_caches()
    syms = ["A", "B", "C"]
    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, (40, 3))
    params = RiskParams(syms, np.cov(r.T), np.expm1(r), 0.99, 1, "warm-up")
    specs = [AccountSpec("v", "var", 1e6), AccountSpec("h", "hvar", 1e6), AccountSpec("s", "stress", 1e6)]
    pos = Positions(["v", "h", "s"], ["A", "B", "C"], np.array([10.0, -5.0, 3.0]))
    stress = [{"name": "x", "default_shock": -0.1}]
    eng = MarginEngine(
        params,
        specs,
        Positions([*pos.account, "h"], [*pos.sym, "OA"], np.array([*pos.qty, -1.0])),
        prices={"A": 10.0, "B": 20.0, "C": 30.0},
        calc_config=config.calc_defaults(stress=stress, sectors={}, alerts=[]),
        master=_tiny_master(),
        as_of="2026-01-01",
    )
    eng.apply_fills(
        ["v", "h"], ["B", "C"], ["B", "S"], np.array([1.0, 2.0]), np.array([20.0, 30.0]), np.array([1, 2])
    )
    eng.apply_prices(["A", "C", "OA"], np.array([11.0, 29.0, 1.5]), np.array([3, 4, 5]))
    readonly = np.array([11.5])
    readonly.flags.writeable = False  # prices straight from Arrow buffers are read-only: that variant too
    eng.apply_prices(["A"], readonly, np.array([6]))
    eng.changed_rows()
    eng.what_if("s", [{"sym": "A", "qty": 1.0}])
    eng.what_if("h", [{"sym": "PA", "qty": 1.0}])
    eng.refresh()
    st = eng.st  # the numbers on every core (a step of >= kernels.PAR_MIN accounts): called directly
    st.dirty_list[: len(specs)] = np.arange(len(specs))
    before_parallel()
    kernels.numbers_parallel(st, len(specs), 2)
    i1, f1 = np.zeros(1, np.int64), np.zeros(1)  # drivers of an external model's account: called directly
    kernels.top_slots(np.ones(1), np.ones(1), 1, i1, f1, f1.copy(), np.zeros(2, np.int64), np.zeros(2))
    # the drivers JSON of a publish of >= drivers.BULK_FROM rows (the tiny engine's publishes are smaller)
    drivers.bulk_json(
        np.ones((1, 2)), drivers.json_names(syms, None), np.zeros((1, 2), np.int64), np.ones(1, np.int64)
    )
    return time.perf_counter() - t0


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """While it is held, numba's cache writes of this process take an exclusive file lock: two processes
    compiling into one cache then never interleave the read-modify-write of a function's index (numba
    numbers each signature's data file by the index it read: two writers of different signatures of one
    function could otherwise leave an index naming the other's code). Nested: the outer one holds."""
    cls = caching.IndexDataCacheFile
    lock_path = os.path.join(tempfile.gettempdir(), "marginflow-numba-cache.lock")
    if getattr(cls.save, "locked_by_warm", False):  # a second flock of this process would wait on the first
        yield
        return

    def locked(method: Callable) -> Callable:
        @functools.wraps(method)
        def call(self: object, *args: object) -> object:
            with open(lock_path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                return method(self, *args)

        call.locked_by_warm = True  # type: ignore[attr-defined]
        return call

    saved = cls.save, cls.load
    cls.save, cls.load = locked(cls.save), locked(cls.load)
    try:
        yield
    finally:
        cls.save, cls.load = saved


PARALLEL_ONLY = "--parallel-kernel"  # `python -m calc.warm --parallel-kernel`: the second process of `main`


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    if (sys.argv[1:] if argv is None else argv) == [PARALLEL_ONLY]:
        with cache_lock():
            kernels.numbers_parallel(parallel_state(), 0, 2)
            _warm_span()
        return 0
    drop_stale_caches()  # (before the second process loads any)
    with cache_lock():
        second = subprocess.Popen([sys.executable, "-m", "calc.warm", PARALLEL_ONLY])
        try:
            warm_up(before_parallel=second.wait)
        finally:
            if second.wait() != 0:
                print(f"warning: the parallel kernel's warm-up exited {second.returncode}", file=sys.stderr)
        _warm_configured()
    print(f"numba kernels compiled and cached in {time.perf_counter() - t0:.0f} s")
    return 0


def _warm_span() -> None:
    """The SPAN kernels, through the SpanBook of the configured SPAN file (as the engine's SpanModel)."""
    calc = config.load().calc
    if not calc.span_file:
        return
    book = SpanModel.from_config(calc).book
    a = book.account("warm-up")
    book.apply_fills(np.array([a]), np.array([0]), np.array([1.0]))
    book.sync("warm-up", np.array([0]), np.array([2.0]))
    book.contributions("warm-up")
    book.recompute_full()


def _warm_configured() -> None:
    """The configured accounts (all models, SPAN included): a fill and its reverse each, a what-if."""
    calc = config.load().calc
    eng = MarginEngine.from_config(calc)
    eng.changed_rows()
    positions = load_positions(calc.positions_file)
    first: dict[str, str] = {}
    for account, sym in zip(positions.account, positions.sym, strict=True):
        first.setdefault(account, sym)
    for seq, (account, sym) in enumerate(first.items(), start=1):
        for side in ("B", "S"):  # a fill and its reverse: state ends where it began
            eng.apply_fills(
                [account],
                [sym],
                [side],
                np.array([1.0]),
                np.array([100.0]),
                np.array([2 * seq + (side == "S")]),
            )
            eng.changed_rows()
        eng.what_if(account, [{"sym": sym, "qty": 1.0}])
    eng.full_recompute()


if __name__ == "__main__":
    sys.exit(main())
