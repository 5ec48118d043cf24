"""The engine's two driver paths (per account for a few changed accounts, vectorized for many) agree."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from calc.engine import MarginEngine
from marginflow import config


def test_few_and_many_account_driver_paths_agree():
    eng = MarginEngine.from_config(config.load().calc)
    eng.changed_rows()
    rng = np.random.default_rng(3)
    accounts = [a for a, s in zip(eng.accounts, eng.specs, strict=True) if s.model != "span"]
    for i in range(40):  # move positions so ties and sign changes occur
        eng.apply_fills([accounts[i % len(accounts)]], ["AAPL" if i % 3 else "KO"], ["B" if i % 2 else "S"],
                        np.array([float(rng.integers(1, 500))]), np.array([100.0]), np.array([i + 1]))
    eng.changed_rows()
    everyone = np.arange(len(eng.accounts))
    assert len(everyone) > 4  # the vectorized path
    many = [msgspec.json.decode(d) for d in eng._drivers_json(everyone)]
    for a in everyone:
        (one,) = [msgspec.json.decode(d) for d in eng._drivers_json(np.array([a]))]
        assert [d["sym"] for d in one] == [d["sym"] for d in many[a]]
        for x, y in zip(one, many[a], strict=True):
            assert x["contribution"] == pytest.approx(y["contribution"], rel=1e-12, abs=1e-9)
            assert x["exposure"] == pytest.approx(y["exposure"], rel=1e-12, abs=1e-9)
        if one:
            assert sum(d["contribution"] for d in one) == pytest.approx(eng.margin[a], rel=1e-9)
