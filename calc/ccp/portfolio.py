"""A portfolio's scenario P&L vector per scenario set (pure functions of arrays; the streaming engine calls
`portfolio_pnl` for accounts on a CCP model, the one-shot through `Book`).

Linear instruments (equities, futures, any sym the instrument master does not list): qty x mult x price
x return. Options: qty x their per-unit scenario P&L rows from full revaluation
(calc/fullreval.py OptionContracts.rows, which includes the multiplier): the underlying moves by
the set's simple return and the implied vol by the set's vol multiplier.

Convention: a scenario set's column j is the linear instrument `cols[j]`; an OptionContracts' `und`
indexes those columns (build it with `sym_index` mapping linear syms to their column).

    book = Book.build(instruments, held_syms)          # cols to select from the history, sym_index
    contracts = OptionContracts.build(book.instruments, surface, book.sym_index, as_of, rate, spot_of)
    pnl = portfolio_pnl(qty, mult, price, col, contract, sets, contracts, spot)   # {"filtered": (S,), ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from calc.ccp.scenarios import ScenarioSet
from calc.fullreval import OptionContracts
from calc.instruments import KINDS, Instruments

OPTION = KINDS.index("option")


def subset(inst: Instruments, syms: Sequence[str]) -> Instruments:
    """The instrument master cut to `syms` (those it lists) and their options' underlyings, file order."""
    keep = sorted(
        {inst.index[s] for s in syms if s in inst.index}
        | {int(inst.underlying[inst.index[s]]) for s in syms if s in inst.index}
    )
    ix = np.array(keep, dtype=np.int64)
    new_syms = [inst.syms[i] for i in keep]
    index = {s: i for i, s in enumerate(new_syms)}
    old_to_new = {old: new for new, old in enumerate(keep)}
    return Instruments(
        syms=new_syms,
        index=index,
        kind=inst.kind[ix],
        underlying=np.array([old_to_new[int(u)] for u in inst.underlying[ix]], dtype=np.int64),
        expiry=inst.expiry[ix],
        strike=inst.strike[ix],
        is_call=inst.is_call[ix],
        american=inst.american[ix],
        multiplier=inst.multiplier[ix],
        model=inst.model[ix],
        vol=inst.vol[ix],
        rate=inst.rate[ix],
        dividend_yield=inst.dividend_yield[ix],
        adv=None if inst.adv is None else inst.adv[ix],
    )


@dataclass(frozen=True)
class Book:
    """The instruments a set of held syms needs: `cols` the linear syms (scenario columns: held linear syms,
    then the held options' underlyings), `options` the held options; `sym_index` maps cols to 0..N-1 and
    options to N.. (for OptionContracts.build); `instruments` the master cut to them (None: all linear)."""

    cols: list[str]
    options: list[str]
    sym_index: dict[str, int]
    instruments: Instruments | None

    @classmethod
    def build(cls, instruments: Instruments | None, held: Sequence[str]) -> Book:
        held = list(dict.fromkeys(held))
        if instruments is None:
            return cls(held, [], {s: j for j, s in enumerate(held)}, None)
        sub = subset(instruments, held)
        is_opt = {s: int(sub.kind[sub.index[s]]) == OPTION for s in sub.syms}
        options = [s for s in sub.syms if is_opt[s]]
        linear = [s for s in held if not is_opt.get(s, False)]
        unders = [sub.syms[int(sub.underlying[sub.index[s]])] for s in options]
        cols = list(dict.fromkeys([*linear, *unders]))
        sym_index = {s: j for j, s in enumerate(cols)} | {s: len(cols) + k for k, s in enumerate(options)}
        return cls(cols, options, sym_index, sub)

    def columns(self, syms: Sequence[str], contracts: OptionContracts | None) -> tuple[np.ndarray, ...]:
        """(col, contract) per position sym: the scenario column of a linear one (-1 for options) and the
        index in `contracts` of an option (-1 for linear ones)."""
        where = {s: c for c, s in enumerate(contracts.syms)} if contracts is not None else {}
        col = np.array([-1 if s in where else self.sym_index[s] for s in syms], dtype=np.int64)
        contract = np.array([where.get(s, -1) for s in syms], dtype=np.int64)
        return col, contract


def option_rows(
    contracts: OptionContracts, c: np.ndarray, spot: np.ndarray, scen: ScenarioSet, theta_years: float = 0.0
) -> np.ndarray:
    """(len(c), S): per unit of contracts `c`, mult x (V_s - V_0) in the set's scenarios (full revaluation);
    spot: (N,) the price of each scenario column now."""
    und = contracts.und[c]
    spot_mult = np.ascontiguousarray(1.0 + scen.returns)
    vol_mult = np.ones_like(spot_mult) if scen.vol_mult is None else np.ascontiguousarray(scen.vol_mult)
    rows, _ = contracts.rows(spot[und], spot_mult, vol_mult, und, theta_years, c)
    return rows


def portfolio_pnl(
    qty: np.ndarray,
    mult: np.ndarray,
    price: np.ndarray,
    col: np.ndarray,
    contract: np.ndarray,
    sets: Mapping[str, ScenarioSet],
    contracts: OptionContracts | None,
    spot: np.ndarray,
    theta_years: float = 0.0,
) -> dict[str, np.ndarray]:
    """Per set the portfolio's scenario P&L (S,). Per position (P,): qty, mult and price (used by linear
    positions), col (scenario column, -1 for options), contract (index in `contracts`, -1 for linear);
    spot (N,): each scenario column's price now (the options' underlyings)."""
    lin = col >= 0
    x = qty[lin] * mult[lin] * price[lin]
    opt = np.flatnonzero(~lin)
    out = {}
    for name, scen in sets.items():
        pnl = scen.returns[:, col[lin]] @ x
        if len(opt):
            assert contracts is not None, "option positions need their OptionContracts"
            pnl = pnl + qty[opt] @ option_rows(contracts, contract[opt], spot, scen, theta_years)
        out[name] = pnl
    return out
