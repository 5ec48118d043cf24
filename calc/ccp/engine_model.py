"""A [[calc.ccp_models]] entry as a margin model of the streaming engine: an account whose `model` names
the entry is evaluated on every change by full revaluation of its positions over the entry's scenario
sets (calc/ccp/portfolio.py) and its add-ons (calc/ccp/margin.py), through the engine's external-model
seam (calc/external.py), not incrementally.

    model = CcpEngineModel.from_config("prisma", calc_config)  # calc.models.external_model does this
    model.bind(engine)              # the engine's prices, options and live spreads (done by the engine)
    r = model.evaluate(syms, qty, price, multiplier)   # ExternalResult: var, es, contrib, margin, components

Prices: a linear position's is the engine's market price; an option is revalued from its underlying's
price and the engine's option contracts (their vols follow the vol surface and option quotes). The
liquidity add-on uses half the last quoted bid-ask spread of each instrument (0 before its first
quote); concentration uses the instrument master's `adv` column (no term for an instrument without one).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import numpy as np

from calc.ccp.margin import Addons, evaluate
from calc.ccp.oneshot import model_specs
from calc.ccp.portfolio import option_rows, portfolio_pnl
from calc.ccp.presets import CcpSpec, resolve
from calc.ccp.scenarios import ScenarioSet, build_sets
from calc.fullreval import OptionContracts, resolve_as_of
from calc.history import InputError, PriceHistory, load_prices
from calc.models import ExternalResult, tail_count, tail_weights
from marginflow.config import CalcConfig

if TYPE_CHECKING:
    from calc.engine import MarginEngine


@functools.lru_cache(maxsize=4)
def _history(path: str) -> PriceHistory:
    return load_prices(path)


class CcpEngineModel:
    """One CCP model for the engine's accounts on it: the resolved spec, its scenario sets (built once from
    [calc] history_file up to the options' valuation date) and, once bound, the engine it reads."""

    def __init__(
        self,
        spec: CcpSpec,
        sets: dict[str, ScenarioSet],
        theta_years: float,
        name: str = "",
        calc: Any = None,
    ):
        self.name, self.calc = name or spec.name, calc  # (what `reload` rebuilds from)
        self.spec = spec
        self.param_id = spec.param_id  # margin rows of its accounts carry it
        self.sets = sets
        self.col = {s: j for j, s in enumerate(sets["filtered"].syms)}  # sym -> scenario column
        self.theta_years = theta_years
        self.engine: MarginEngine | None = None
        self._remapped: tuple[Any, OptionContracts] | None = None
        self._rows: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}  # contract -> (spot, vol), rows

    @classmethod
    def from_config(cls, name: str, calc: CalcConfig, history_file: str | None = None) -> CcpEngineModel:
        """The [[calc.ccp_models]] entry `name`, or "hvar": the plain historical simulation of [calc]
        (its confidence, horizon, lookback, filtering and hvar_margin) as a model to compare with; scenario
        sets from `history_file` (default calc.history_file)."""
        history = _history(str(history_file or calc.history_file))
        as_of = resolve_as_of(calc.as_of, history.dates[-1])
        if name == "hvar":
            where = "hvar"
            hvar = {"lookback_days": calc.lookback_days or len(history.dates), "confidence": calc.confidence}
            hvar |= {
                "holding_days": calc.horizon_days,
                "ewma_lambda": calc.filter_lambda if calc.filtered else 0.0,
            }
            (spec,) = model_specs(["hvar"], calc, str(as_of), {}, hvar)
        else:
            i, cfg = next((i, m) for i, m in enumerate(calc.ccp_models) if m.name == name)
            where = f"calc.ccp_models[{i}]"
            spec = resolve(cfg, str(as_of), where)
        implied = _history(str(calc.vol_history_file)) if calc.vol_history_file else None
        sets = build_sets(history, spec, as_of, calc.vol_scenarios, calc.filter_lambda, where, implied)
        theta = spec.holding_days / 365.0 if calc.theta else 0.0
        return cls(spec, sets, theta, name, calc)

    def reload_history(self, history_file: str) -> None:
        """A `history` param event: the spec (its param_id carries the history's last date) and scenario
        sets rebuilt from the new price history; refused (InputError) as from_config refuses, unchanged."""
        new = CcpEngineModel.from_config(self.name, self.calc, history_file)
        self.spec, self.param_id, self.sets, self.theta_years = (
            new.spec,
            new.param_id,
            new.sets,
            new.theta_years,
        )
        self.col = new.col
        self._rows.clear()
        if self.engine is not None:
            self.bind(self.engine)

    def bind(self, engine: MarginEngine) -> None:
        """Read prices and options from `engine`; the scenario sets cut to the instruments it has."""
        self.engine = engine
        keep = [s for s in self.col if s in engine.sym_index]
        if len(keep) < len(self.col):
            ix = np.array([self.col[s] for s in keep], dtype=np.int64)
            self.sets = {
                k: dataclasses.replace(
                    v,
                    syms=keep,
                    returns=v.returns[:, ix],
                    vol_mult=None if v.vol_mult is None else v.vol_mult[:, ix],
                )
                for k, v in self.sets.items()
            }
            self.col = {s: j for j, s in enumerate(keep)}

    def instrument(self, sym: str) -> tuple[()] | None:
        """() for a sym the model can margin (in the price history, or an option of the engine on such an
        underlying), None otherwise (a fill in it is refused)."""
        eng = self.engine
        if sym in self.col or eng is None:  # (unbound: the engine checks its start positions once bound)
            return ()
        j = eng.sym_index.get(sym, -1)
        return () if j >= 0 and eng.st.orow[j] >= 0 else None

    def _contracts(self) -> OptionContracts | None:
        """The engine's option contracts with `und` as scenario columns (cached per contracts object)."""
        book = self.engine.options
        if book is None:
            return None
        if self._remapped is None or self._remapped[0] is not book.contracts:
            self._rows.clear()
            oc = book.contracts
            und = np.array([self.col[self.engine.syms[u]] for u in oc.und.tolist()], dtype=np.int64)
            self._remapped = (oc, dataclasses.replace(oc, und=und))
        return self._remapped[1]

    def _option_rows(self, cs: np.ndarray, spot: np.ndarray) -> dict[str, np.ndarray]:
        """Per set (len(cs), S): the scenario rows per unit of contracts `cs` (portfolio.option_rows), each
        reused while its underlying's price and its vol are those it was computed at."""
        oc = self._contracts()
        key = np.column_stack([spot[oc.und[cs]], oc.vol[cs]])
        todo = [
            i for i, c in enumerate(cs.tolist()) if not np.array_equal(self._rows.get(c, (None,))[0], key[i])
        ]
        if todo:
            t = cs[todo]
            fresh = {n: option_rows(oc, t, spot, s, self.theta_years) for n, s in self.sets.items()}
            for k, c in enumerate(t.tolist()):
                self._rows[c] = (key[todo[k]].copy(), {n: r[k] for n, r in fresh.items()})
        return {n: np.array([self._rows[c][1][n] for c in cs.tolist()]) for n in self.sets}

    def evaluate(
        self, syms: list[str], qty: np.ndarray, price: np.ndarray, multiplier: np.ndarray
    ) -> ExternalResult:
        """The account's margin under the model at the engine's prices now (see evaluate_at)."""
        if self.engine is None:
            raise InputError(f"ccp model {self.spec.name!r}: not bound to an engine")
        return self.evaluate_at(syms, qty, multiplier, self.engine.st.price)

    def evaluate_at(
        self, syms: list[str], qty: np.ndarray, multiplier: np.ndarray, market: np.ndarray
    ) -> ExternalResult:
        """The margin of positions (syms, qty, multiplier) at `market` (per engine instrument: a linear
        one's price, an option's underlying's; a what-if passes its prices with the queued ticks): options
        valued and revalued from their underlying's price and their vol. Contributions per position: its
        share of the filtered set's tail loss, scaled to the margin; positions of 0 contribute 0. Refused
        (InputError naming the sym): a held sym outside the model's price history that is not an option."""
        eng = self.engine
        contrib = np.zeros(len(syms))
        held = np.flatnonzero(qty != 0)
        syms = [syms[k] for k in held.tolist()]
        qty, multiplier = qty[held], multiplier[held]
        ix = np.array([eng.sym_index[s] for s in syms], dtype=np.int64)
        contract = eng.st.orow[ix] if len(ix) else np.zeros(0, np.int64)
        opt = contract >= 0
        missing = [s for s, o in zip(syms, opt.tolist(), strict=True) if not o and s not in self.col]
        if missing:
            raise InputError(f"ccp model {self.spec.name!r}: sym {missing[0]!r} is not in its price history")
        col = np.array([-1 if o else self.col.get(s, -1) for s, o in zip(syms, opt.tolist(), strict=True)])
        col = col.astype(np.int64)
        spot = np.array([market[eng.sym_index[s]] for s in self.col], dtype=np.float64)
        unit = market[ix].astype(np.float64)
        if opt.any():  # an option's value per unit at its underlying's price (not its kernel price, a delta)
            oc = self._contracts()
            unit[opt] = oc.greeks(spot[oc.und[contract[opt]]], contract[opt])[0]
        lin = ~opt  # linear positions here, options from the per-contract rows (kept while spot and vol stay)
        pnl = portfolio_pnl(
            qty[lin], multiplier[lin], unit[lin], col[lin], contract[lin], self.sets, None, spot
        )
        if opt.any():
            for name, rows in self._option_rows(contract[opt], spot).items():
                pnl[name] = pnl[name] + qty[opt] @ rows
        half = eng.half_spread[ix]
        comp = evaluate(self.spec, pnl, Addons(qty, multiplier, unit, half, eng.adv[ix], opt))
        contrib[held] = self._contrib(qty, multiplier, unit, col, contract, spot, pnl, comp.margin)
        return ExternalResult(comp.var, comp.es, contrib, margin=comp.margin, components=comp)

    @property
    def uses_spreads(self) -> bool:
        """The margin moves with quoted spreads (the liquidity add-on is on)."""
        return bool(self.spec.liquidity)

    def _contrib(self, qty, mult, unit, col, contract, spot, pnl, margin: float) -> np.ndarray:
        """Each position's loss over the filtered set's tail (ES weights), scaled to sum to `margin`."""
        n = len(qty)
        if n == 0 or margin <= 0:
            return np.zeros(n)
        total = pnl["filtered"]
        k = tail_count(self.spec.confidence, len(total))
        tail = np.argsort(total, kind="stable")[:k]
        w = tail_weights(self.spec.confidence, len(total))
        full = self.sets["filtered"]
        sub = dataclasses.replace(
            full, returns=full.returns[tail], vol_mult=None if full.vol_mult is None else full.vol_mult[tail]
        )
        per = np.zeros((n, k))  # each position's P&L in the k tail scenarios
        lin = col >= 0
        per[lin] = (sub.returns[:, col[lin]] * (qty[lin] * mult[lin] * unit[lin])).T
        if (~lin).any():
            per[~lin] = qty[~lin, None] * option_rows(
                self._contracts(), contract[~lin], spot, sub, self.theta_years
            )
        loss = -(per @ w)
        s = loss.sum()
        return loss * (margin / s) if s != 0 else np.full(n, margin / n)
