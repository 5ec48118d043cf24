"""The streaming engine's options: their contracts (calc/fullreval.py) installed in the kernel state, and
repriced in full whenever their underlying ticks, before the kernel step that applies the tick.

    book = OptionBook(contracts, params, theta)  # fullreval.OptionContracts; theta: age them in scenarios
    st = book.install(st)                     # orow / ov / oinst, option rows of rt / cov / shock, prices
    ix, px = book.before_step(st, price, ticked)   # reprice held options of ticked underlyings
    book.greeks[book.of_inst[j]]              # value, delta, gamma, vega per unit of option instrument j

In the kernel state an option's price is its dollar delta per unit (delta x the underlying's price), so
the parametric and stress models see it as its delta equivalent (their rows are the underlying's),
while historical simulation revalues it in full: each contract's scenario row is mult x (V_s - V_0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from calc import kernels
from calc.fullreval import OptionContracts
from calc.kernels import State
from calc.models import RiskParams


class OptionBook:
    """The option contracts of an engine and their scenario moves (from the risk parameters)."""

    def __init__(self, contracts: OptionContracts, params: RiskParams, theta: bool):
        self.contracts = contracts
        self.theta_years = params.horizon_days / 365.0 if theta else 0.0
        self.of_inst = {int(j): c for c, j in enumerate(contracts.inst.tolist())}
        self.quote = np.full(len(contracts), np.nan)  # last market price of each contract (option quotes)
        self.greeks = np.zeros(
            (len(contracts), 4)
        )  # per unit at the last repricing: value, delta, gamma, vega
        self.stale = np.zeros(len(contracts), dtype=bool)  # not repriced since a tick: nobody held it
        self.pending: dict[int, int] = {}  # contract -> seq of its last quote not yet turned into a vol
        self.reject: Callable[[int, str], None] = lambda seq, why: None  # the engine counts refused quotes
        self.set_params(params)

    def set_params(self, params: RiskParams) -> None:
        """Scenario moves of the underlyings (spot and vol multipliers per contract) from new parameters;
        the rows are recomputed by the next `install`."""
        if params.scenarios is None:
            self.spot_mult = self.vol_mult = np.ones((0, len(params.syms)))
        else:  # per scenario and instrument with parameters (the underlyings' columns, `und`)
            self.spot_mult = np.ascontiguousarray(1.0 + params.scenarios)
            r = params.vol_ratio
            self.vol_mult = np.ones_like(self.spot_mult) if r is None else np.ascontiguousarray(r)

    def install(self, st: State) -> State:
        """The contracts in the kernel state (grown to them): which instrument is which contract, the
        option rows of rt / cov / sd / fk / shock copied from the underlying's, every contract's
        scenario row at the current prices and its dollar delta as its price. Holders' P&L is not
        touched: the caller rebuilds it (reference.rebuild_state)."""
        oc = self.contracts
        if st.ov.shape[0] < len(oc):
            st = kernels.grow(st, C=len(oc))
        st.orow[:] = -1
        st.orow[oc.inst] = np.arange(len(oc))
        st.oinst[: len(oc)] = oc.inst
        self.map_rows(st)
        if len(oc):
            cs = np.arange(len(oc))
            rows, g = self._rows(st, cs)
            kernels.set_option_rows(st, cs, rows, True)
            st.price[oc.inst] = g[:, 1] * st.price[oc.und]
            self.greeks[cs] = g
            self.stale[:] = False
        return st

    def map_rows(self, st: State) -> None:
        """The options' rows of the linear models' parameters (rt, rtT, rmax, cov, sd, fk, shock) made their
        underlyings' (after new parameters or new instruments)."""
        j, u = self.contracts.inst, self.contracts.und
        st.rt[j] = st.rt[u]
        st.rtT[:, j] = st.rtT[:, u]
        st.rmax[j] = st.rmax[u]
        st.cov[j, :] = st.cov[u, :]
        st.cov[:, j] = st.cov[:, u]
        st.cov[j[:, None], j[None, :]] = st.cov[u[:, None], u[None, :]]
        st.sd[j] = st.sd[u]
        st.fk[:, j] = st.fk[:, u]
        st.shock[:, j] = st.shock[:, u]

    def _rows(
        self, st: State, cs: np.ndarray, spot: np.ndarray | None = None, oc: OptionContracts | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows (len(cs), S), Greeks (len(cs), 4): value, delta, gamma, vega per unit) of contracts cs at
        `spot` (default: their underlyings' prices), of `oc` (default: the book's contracts)."""
        oc = self.contracts if oc is None else oc
        spot = st.price[oc.und[cs]] if spot is None else spot
        rows, _ = oc.rows(spot, self.spot_mult, self.vol_mult, oc.und[cs], self.theta_years, cs)
        return rows, self._greeks(cs, spot, oc)

    def _greeks(self, cs: np.ndarray, spot: np.ndarray, oc: OptionContracts | None = None) -> np.ndarray:
        """(len(cs), 4): value, delta, gamma, vega per unit of contracts cs at `spot` (per contract in cs),
        of `oc` (default: the book's contracts)."""
        return np.column_stack((self.contracts if oc is None else oc).greeks(spot, cs))

    def before_step(self, st: State, price: np.ndarray, ticked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Before a kernel step, with `price` the instruments' prices once its queued ticks are applied and
        `ticked` those with a tick (MarginEngine._queued_prices): the options on every ticked underlying,
        or with a new quote, repriced: in full (scenario rows and Greeks) where an account that keeps a
        scenario P&L vector (historical simulation) holds them (kernels.reprice: its tail reads them); their
        value and Greeks only where only other accounts hold them (parametric, stress and CCP-model ones
        read the dollar delta; their rows go `stale`, as those of options nobody holds); stale rows
        repriced once such an account holds the option. Returns the repriced options' new prices (dollar
        deltas) as ticks for the step."""
        oc = self.contracts
        ticked = ticked[oc.und]
        if not self.pending and not st.nhold[oc.inst].any():  # nothing held, no quote: rows go stale only
            self.stale |= ticked
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        spot = price[oc.und]
        moved = ticked.copy()
        moved[self._implied(spot)] = True  # a quote moved its vol
        held = st.nhold[oc.inst] > 0
        full = kernels.hs_held(st, oc.inst)  # held by an account whose P&L rows read the contract's row
        self.stale |= moved & ~full
        rows_too = full & (moved | self.stale)
        cs = np.flatnonzero(rows_too)
        if len(cs):
            self.stale[cs] = False
            rows, self.greeks[cs] = self._rows(st, cs, spot[cs])
            kernels.reprice(st, cs, rows)
        gs = np.flatnonzero(held & ~full & moved)  # value and Greeks only
        if len(gs):
            self.greeks[gs] = self._greeks(gs, spot[gs])
        out = np.flatnonzero(rows_too | (held & moved))
        return oc.inst[out], self.greeks[out, 1] * spot[out]

    def preview(self, scratch: State, inst: list[int], ticked: np.ndarray, price: np.ndarray) -> State:
        """A what-if's one-account copy (account 0, instruments `inst`) with its options repriced at the
        queued ticks of their underlyings (or, stale ones, at their underlying's price), as the next step
        would (in every scenario for an account that keeps a scenario P&L vector, else their value and
        Greeks only): its own `orow` / `ov` / `ovT` / `omax` holding just its options', their prices
        (dollar deltas) in `price` (the copy's, queued ticks applied). The engine's state is not touched."""
        oc = self.contracts
        mine = [j for j in dict.fromkeys(inst) if j in self.of_inst]
        if not mine:
            return scratch
        cs = np.array([self.of_inst[j] for j in mine], dtype=np.int64)
        rows = scratch.ov[cs]  # fancy indexing: a copy
        moved = ticked[oc.und[cs]] | self.stale[cs]
        quoted = np.array([c in self.pending for c in cs.tolist()], dtype=bool)
        if quoted.any():  # quotes not yet turned into vols: their vols in a copy of the contracts
            vols, _ = self._quoted_vols(cs[quoted], price[oc.und[cs[quoted]]])
            fits = np.isfinite(vols)
            oc = dataclasses.replace(oc, vol=oc.vol.copy())
            oc.vol[cs[quoted][fits]] = vols[fits]
            moved[np.flatnonzero(quoted)[fits]] = True
        if moved.any():
            cm = cs[moved]
            spot = price[oc.und[cm]]
            if scratch.f_hs[0]:  # its scenario P&L vector reads the rows: repriced in every scenario
                new, g = self._rows(scratch, cm, spot, oc)
                rows[moved] = new  # (its P&L row holds no option: nothing in it to move)
                scratch.kth[0] = np.nan
            else:  # other models read the dollar delta only (as before_step)
                g = self._greeks(cm, spot, oc)
            price[oc.inst[cm]] = g[:, 1] * spot
        n = len(mine)
        orow = np.full_like(scratch.orow, -1)
        orow[np.array(mine, dtype=np.int64)] = np.arange(n)
        own = scratch._replace(
            orow=orow,
            ov=rows,
            ovT=np.empty((rows.shape[1], n)),
            omax=np.empty(n),
            oinst=np.array(mine),
            oref=scratch.oref[cs],  # (the tail's bound reads its options' distances from their references)
            odist=scratch.odist[cs],
            oage=scratch.oage[cs],
        )
        kernels.set_option_rows(own, np.arange(n), rows, False)  # (ovT and omax as the engine's own are made)
        return own

    def on_quotes(self, ix: np.ndarray, px: np.ndarray, seq: np.ndarray) -> None:
        """Market prices of option instruments `ix` (quote mids, trades): each contract's last one is kept
        (`quote`) and its implied vol is taken from it at the next step (before_step)."""
        for j, p, q in zip(ix.tolist(), px.tolist(), seq.tolist(), strict=True):
            c = self.of_inst[j]
            self.quote[c] = p
            self.pending[c] = q

    def _quoted_vols(self, cs: np.ndarray, spot: np.ndarray) -> tuple[np.ndarray, Any]:
        """(vols, reasons): the implied vols of the last quotes of contracts `cs` at their underlyings'
        prices `spot` (per contract in cs), NaN and a reason where none fits (calc/impliedvol.py)."""
        from calc.impliedvol import implied_vols

        oc = self.contracts
        return implied_vols(
            oc.model[cs],
            self.quote[cs],
            spot,
            oc.strike[cs],
            oc.t[cs],
            oc.rate[cs],
            oc.q[cs],
            oc.is_call[cs],
            oc.american[cs],
            oc.method,
        )

    def _implied(self, spot: np.ndarray) -> np.ndarray:
        """The contracts with a quote since the last step take the implied vol of their last quote at their
        underlying's price `spot` (per contract); a quote no vol fits is rejected (`reject(seq, reason)`)
        and the vol stays. Returns the contracts whose vol moved."""
        if not self.pending:
            return np.zeros(0, dtype=np.int64)
        oc = self.contracts
        cs = np.fromiter(self.pending, dtype=np.int64, count=len(self.pending))
        seqs = list(self.pending.values())
        self.pending.clear()
        vols, reasons = self._quoted_vols(cs, spot[cs])
        ok = np.isfinite(vols)
        for i in np.flatnonzero(~ok).tolist():
            self.reject(seqs[i], f"quote for {oc.syms[cs[i]]!r}: no implied vol: {reasons[i]}")
        oc.vol[cs[ok]] = vols[ok]
        return cs[ok]
