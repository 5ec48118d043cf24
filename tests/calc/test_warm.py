"""calc/warm.py: the parallel kernel's second warm-up process compiles the signature the engine calls,
and numba's cache works under the warm-up's cache lock."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
from numba.core import caching

from calc import warm
from calc.engine import MarginEngine

ROOT = Path(__file__).resolve().parents[2]


def test_the_parallel_warm_up_state_has_the_engines_numba_type(demo_engine: MarginEngine) -> None:
    """`python -m calc.warm --parallel-kernel` compiles numbers_parallel on `parallel_state()`: were its
    numba type not an engine state's, the kernel would be compiled twice (once to no use)."""
    assert numba.typeof(warm.parallel_state()) == numba.typeof(demo_engine.st)


def test_numbas_cache_saves_and_loads_under_the_warm_up_lock(tmp_path: Path) -> None:
    """A cached kernel compiled under `cache_lock` is saved (first process: a miss) and loaded by the
    next process (a hit, nothing compiled): the lock wraps numba's cache without changing it."""
    (tmp_path / "lockmod.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from calc.warm import cache_lock
        with cache_lock():
            import lockmod
            assert lockmod.f(1) == 2
        print(lockmod.f.stats.cache_hits.most_common(), lockmod.f.stats.cache_misses.most_common())
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    first, second = run(), run()
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.strip() == "[] [((int64,), 1)]", first.stdout
    assert second.stdout.strip() == "[((int64,), 1)] []", second.stdout
    assert list((tmp_path / "cache").rglob("*.nbc"))


def test_the_cache_lock_nests() -> None:
    """The tests' session holds `cache_lock` (tests/conftest.py): numba's cache save and load are wrapped
    once, and a nested lock adds no second layer (a second flock of one process would wait on the first)."""
    cls = caching.IndexDataCacheFile
    outer = cls.save, cls.load
    assert all(getattr(m, "locked_by_warm", False) for m in outer)
    assert not any(getattr(m.__wrapped__, "locked_by_warm", False) for m in outer)
    with warm.cache_lock():
        assert (cls.save, cls.load) == outer
    assert (cls.save, cls.load) == outer


def test_a_change_in_a_module_a_cached_kernel_calls_drops_the_caches(tmp_path: Path) -> None:
    """numba checks a cached kernel against its own source file only: after an update of a module it
    calls, the old machine code is loaded and computes the old numbers. drop_stale_caches (which
    warm_up runs first) sees the sources changed and removes the caches, so the new code is compiled."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "outer.py").write_text(
        "from numba import njit\nfrom inner import g\n\n@njit(cache=True)\ndef f(x):\n    return g(x)\n"
    )
    inner = "from numba import njit\n\n@njit(cache=True)\ndef g(x):\n    return x + {}\n"
    (pkg / "inner.py").write_text(inner.format(1))

    def run(drop: bool) -> tuple[str, str]:
        code = textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            sys.path.insert(0, {str(pkg)!r})
            from calc.warm import drop_stale_caches
            dropped = drop_stale_caches([Path({str(pkg)!r})]) if {drop} else None
            import outer
            print(dropped, outer.f(1))
            """
        )
        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}  # (the caches in the tree)
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return tuple(out.stdout.split())  # type: ignore[return-value]

    assert run(drop=True) == ("False", "2")  # no cache yet: nothing to drop
    assert run(drop=True) == ("False", "2")  # the same sources: the caches stay
    (pkg / "inner.py").write_text(inner.format(2))
    assert run(drop=False) == ("None", "2")  # numba alone: outer's cache still holds the old g
    assert run(drop=True) == ("True", "3")  # the caches dropped: the new g
    assert run(drop=True) == ("False", "3")
    assert list((pkg / "__pycache__").glob("*.nbc"))


NOTHING_COMPILED = """
import sys
import numpy as np
from numba.core.registry import CPUDispatcher
sys.path.insert(0, {root!r})
from calc.warm import warm_up
warm_up()
from tests.calc import test_engine_scale as scale
import calc.drivers, calc.kernels, calc.reference, calc.state, calc.american_rows, calc.bs2002, calc.vecmath

def signatures():
    out = {{}}
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("calc.")]:
        for name, f in vars(mod).items():
            if isinstance(f, CPUDispatcher):
                out[f"{{mod.__name__}}.{{name}}"] = len(f.signatures)
    return out

before = signatures()
for options in (False, True):
    eng = scale.engine(options=options)
    eng.changed_rows()
    scale.apply(eng, scale.stream(3, 2000, eng), 0)
    eng.changed_rows()
    eng.what_if(eng.accounts[0], [{{"sym": eng.syms[1], "qty": 5.0}}])
    for seq in range(10_000, 10_003):  # one table's batch a refresh, from Arrow's read-only buffers
        px, qty = eng.st.price[:3] * 1.001, np.array([3.0])
        px.flags.writeable = qty.flags.writeable = False
        eng.apply_prices(eng.syms[:3], px, np.arange(seq * 10, seq * 10 + 3))
        eng.refresh()
        eng.apply_fills(eng.accounts[:1], eng.syms[:1], ["B"], qty, qty, np.array([seq * 10 + 5]))
        eng.refresh()
    if options:
        eng.what_if(eng.accounts[1], [{{"sym": "O01", "qty": -2.0}}])
after = signatures()
grown = sorted(k for k, n in after.items() if n > before.get(k, 0))
print("compiled after warm_up:", grown)
sys.exit(1 if grown else 0)
"""


def test_after_warm_up_a_books_events_publishes_and_what_ifs_compile_nothing() -> None:
    """calc and the backtest call warm_up at start so that no event waits for a compile: after it, a
    96-account book (stocks, then with options) takes ticks and fills, publishes every account's row
    with its drivers (the bulk JSON writer of a publish of >= drivers.BULK_FROM rows, which the warm-up's
    tiny engine never reaches), answers what-ifs, and takes ticks and fills one table a refresh from
    read-only arrays, as Arrow batches from the tickerplant come (the warm-up's read-only tick was queued
    with a writable one and copied: calc's first live tick compiled `kernels.step`, seconds in which it
    answered nothing), without numba compiling any new signature. A fresh process, so no other test's
    calls can have compiled them first."""
    code = NOTHING_COMPILED.format(root=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
