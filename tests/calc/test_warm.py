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
