"""calc/ccp/portfolio.py: the book layout (scenario columns, options), the linear P&L by hand, and options
as qty x their full-revaluation rows (the QuantLib comparison is in tests/calc/test_oneshot.py)."""

from __future__ import annotations

import numpy as np
import pytest

from calc.ccp.portfolio import Book, portfolio_pnl, subset
from calc.ccp.scenarios import ScenarioSet
from calc.fullreval import OptionContracts
from calc.instruments import load_instruments

INSTRUMENTS = (
    "sym,kind,underlying,expiry,strike,right,multiplier,exercise,vol,rate,dividend_yield\n"
    "AAA,equity,,,,,1,,,,\n"
    "BBB,equity,,,,,1,,,,\n"
    "FUT,future,,2023-03-17,,,50,,,,\n"
    "AAA_C,option,AAA,2023-03-17,100,C,100,european,0.3,0.02,0.0\n"
    "BBB_P,option,BBB,2023-06-16,40,P,100,american,0.4,0.02,0.01\n"
)


@pytest.fixture
def inst(tmp_path):
    (tmp_path / "i.csv").write_text(INSTRUMENTS)
    return load_instruments(tmp_path / "i.csv")


def test_book_layout_and_subset(inst):
    book = Book.build(inst, ["BBB_P", "FUT", "ZZZ", "FUT"])
    # linear: the held FUT and ZZZ (not in the master: linear), then the option's underlying BBB
    assert book.cols == ["FUT", "ZZZ", "BBB"] and book.options == ["BBB_P"]
    assert book.sym_index == {"FUT": 0, "ZZZ": 1, "BBB": 2, "BBB_P": 3}
    sub = book.instruments
    assert sub.syms == ["BBB", "FUT", "BBB_P"] and sub.underlying.tolist() == [0, 1, 0]
    assert subset(inst, ["AAA_C"]).syms == ["AAA", "AAA_C"]
    assert Book.build(None, ["X", "Y"]).cols == ["X", "Y"]


def test_linear_pnl_by_hand_and_options_as_their_rows(inst):
    book = Book.build(inst, ["AAA", "FUT", "AAA_C"])
    assert book.cols == ["AAA", "FUT"]
    returns = np.array([[0.01, -0.02], [-0.05, 0.03], [0.0, 0.0]])
    scen = ScenarioSet(
        "filtered", book.cols, returns, np.array([[1.1, 1.0], [0.9, 1.0], [1.0, 1.0]]), np.array([])
    )
    spot = np.array([95.0, 4000.0])
    contracts = OptionContracts.build(
        book.instruments, None, book.sym_index, "2022-12-28", 0.0, lambda u: spot[u]
    )
    qty = np.array([10.0, -2.0, 3.0])
    mult = np.array([1.0, 50.0, 100.0])
    price = np.array([95.0, 4000.0, 0.0])
    col, contract = book.columns(["AAA", "FUT", "AAA_C"], contracts)
    assert col.tolist() == [0, 1, -1] and contract.tolist() == [-1, -1, 0]
    lin_only = portfolio_pnl(qty[:2], mult[:2], price[:2], col[:2], contract[:2], {"f": scen}, None, spot)[
        "f"
    ]
    # 10 x 95 x r_A - 2 x 50 x 4000 x r_F: [9.5 + 8000, -47.5 - 12000, 0]
    np.testing.assert_allclose(lin_only, [8009.5, -12047.5, 0.0], rtol=1e-12)
    pnl = portfolio_pnl(qty, mult, price, col, contract, {"f": scen}, contracts, spot)["f"]
    sm, vm = np.ascontiguousarray(1 + returns[:, [0]]), np.ascontiguousarray(scen.vol_mult[:, [0]])
    rows, v0 = contracts.rows(spot[[0]], sm, vm, np.array([0]), 0.0, c=np.array([0]))
    np.testing.assert_allclose(pnl, lin_only + 3 * rows[0], rtol=1e-12)
    assert rows[0, 2] == pytest.approx(0.0, abs=1e-9)  # no move: no P&L
    assert rows[0, 0] > 0 and rows[0, 1] < 0  # a call gains as spot and vol rise
    # theta: aged by the holding period the unmoved scenario loses the call's time value
    aged = portfolio_pnl(qty, mult, price, col, contract, {"f": scen}, contracts, spot, 10 / 365)["f"]
    assert aged[2] < pnl[2]
