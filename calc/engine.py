"""The streaming margin engine: events -> state -> rows. Per-account positions and risk state in
numpy arrays (calc/kernels.py's State), updated incrementally by fills and ticks, read out as `margin`
and `alert` rows.

How a tick becomes a margin number (calc/events.py routes the tickerplant's batches here):
  1. apply_prices / apply_fills (this file) check each row (a bad one is rejected: `rejects`), hold a
     tick outside its acceptance band as suspect (calc/band.py), open slots for new positions
     (calc/state.py) and queue the events; nothing is computed yet.
  2. refresh() (called by changed_rows / snapshot) runs the queue through one kernels.run_step call
     (calc/kernels.py): each touched position's risk state moves by rank-one updates and the numbers of
     the accounts that moved are recomputed; accounts on external models (SPAN) are re-evaluated by
     calc/external.py. Every resync_events events, or on new parameters, calc/reference.py rebuilds
     the state from scratch.
  3. changed_rows() (calc/margin_rows.py) reads the numbers of the accounts that moved into margin rows
     (drivers from calc/drivers.py); take_alerts() runs the alert rules (calc/alerts.py) on them.

    eng = MarginEngine.from_config(config.load().calc)  # or MarginEngine(params, accounts, positions,
                                                        #    calc_config=..., prices=...)
    eng.apply_fills(account, sym, side, qty, price, seq, time)  # a batch of fill rows, in seq order
    eng.apply_prices(sym, price, seq, time)                    # a batch of trade prices / quote mids
    rows = eng.changed_rows()      # {column: [values]}: one margin row per account whose numbers moved
    alerts = eng.take_alerts()     # {column: [values]}: alert rows raised / cleared by those rows
    eng.what_if("acct", [{"sym": "AAPL", "qty": -500}])        # margin before/after (calc/whatif.py)
    eng.set_params(params_from_config(calc, new_history_path))  # a `param` event: full recompute
    eng.update_external("span", lambda m: m.reload(spn))       # an external model's param event
    eng.accept_price("AAPL")                                   # a `price_accept` param event

Elsewhere: the inputs (accounts, positions, risk parameters, start prices) in calc/inputs.py; warm-up
of the kernels in calc/warm.py.

The engine never publishes a non-finite number: an account whose incremental result is not finite
is recomputed in full from positions and prices (the full recompute's path, for that account); if it
is still not finite its row is withheld (counted in `withheld`, logged) until its numbers are finite.
An accepted jump (confirmed or by an operator) also rebuilds the holders' state that way, so a large
rank-one update leaves no cancellation residue.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import numpy as np

from calc import kernels, margin_rows, reference
from calc.alerts import AlertBook
from calc.band import PriceBand
from calc.drivers import JsonNames, contributions, drivers_json, json_names
from calc.external import ExternalAccounts
from calc.fullreval import OptionContracts, resolve_as_of
from calc.history import InputError, load_prices
from calc.inputs import (
    AccountSpec,
    Positions,
    fit_params,
    load_accounts,
    load_positions,
    params_from_config,
    start_prices,
)
from calc.instruments import Instruments, load_instruments
from calc.kernels import M_EXT, N_DIRTY, R_ES, R_MARGIN, R_STRESS, R_VAR
from calc.models import ExternalModel, RiskParams, StressSet, build_stress
from calc.optionbook import OptionBook
from calc.projection import Projector
from calc.state import install_params, model_codes, new_state, place_slots, slot_of
from calc.volsurface import VolSurface, load_vol_surface
from calc.whatif import what_if
from marginflow.config import CalcConfig
from schemas.calc import AlertColumns, MarginColumns, Trade

log = logging.getLogger("marginflow.calc.engine")
_I0 = np.zeros(0, dtype=np.int64)
_SIGN = {"B": 1.0, "S": -1.0}  # fill side -> sign of the position change
_F0 = np.zeros(0, dtype=np.float64)
_QUEUES = ("tick_ix", "tick_px", "fill_a", "fill_s", "fill_dq", "new_a", "new_s")  # kernels.step's events


def _indices(index: Mapping[str, int], names: Sequence[str], unknown: str) -> np.ndarray:
    """The index of each name; refused (InputError "{unknown} {name!r}"): a name not in `index`."""
    ix = np.fromiter((index.get(n, -1) for n in names), dtype=np.int64, count=len(names))
    if (ix < 0).any():
        raise InputError(f"{unknown} {names[int(np.flatnonzero(ix < 0)[0])]!r}")
    return ix


def option_inputs(calc: CalcConfig, last_close: Any) -> dict[str, Any]:
    """The engine's option keyword arguments under [calc]: the instrument master and vol surface files
    (none when not set) and the valuation date (as_of; "" = `last_close`, the history's last date)."""
    return {
        "master": load_instruments(calc.instruments_file) if calc.instruments_file else None,
        "vol_surface": load_vol_surface(calc.vol_surface_file) if calc.vol_surface_file else None,
        "as_of": resolve_as_of(calc.as_of, last_close),
    }


class MarginEngine:
    """Positions, prices and risk state for all accounts; see the module docstring for the calls.

    apply_prices / apply_fills validate and queue events; the next refresh (called by
    changed_rows, snapshot, or directly) runs them through one kernel call, in order. The numbers a
    refresh produces depend only on the events and on where the refreshes fell, so replaying the
    same batches gives bit-identical rows. `calc_config` is the [calc] section (marginflow.config;
    config.calc_defaults() for the project's defaults)."""

    def __init__(
        self,
        params: RiskParams,
        accounts: Mapping[str, AccountSpec] | Sequence[AccountSpec],
        positions: Positions | None = None,
        *,
        calc_config: CalcConfig,
        prices: Mapping[str, float] | None = None,
        multipliers: Mapping[str, float] | None = None,
        instruments: Sequence[str] = (),
        master: Instruments | None = None,
        vol_surface: VolSurface | None = None,
        as_of: Any = None,  # the options' valuation date (None: today; from_config: [calc] as_of)
    ):
        self.settings = calc_config
        self.specs = list(accounts.values()) if isinstance(accounts, Mapping) else list(accounts)
        positions = positions or Positions([], [], np.zeros(0))
        self.accounts = [s.account for s in self.specs]
        self.acc_index = {a: i for i, a in enumerate(self.accounts)}
        if len(self.acc_index) != len(self.accounts):
            raise InputError("accounts: an account appears twice")
        # instruments: the risk parameters' syms, then any others the positions or the caller name, then
        # the options of the instrument master whose underlying has risk parameters
        hist = set(params.syms)
        opts = (
            [] if master is None else [i for i in master.options if master.syms[master.underlying[i]] in hist]
        )
        opt_syms = [] if master is None else [master.syms[i] for i in opts]
        self.syms = list(dict.fromkeys([*params.syms, *positions.sym, *instruments, *opt_syms]))
        self.sym_index = {s: i for i, s in enumerate(self.syms)}
        # the instruments' names JSON-encoded (calc/drivers.py)
        self._names: JsonNames | None = None
        self.n_hist = len(params.syms)  # the first n_hist instruments carry risk parameters
        self.has_params = np.arange(len(self.syms)) < self.n_hist
        self.half_spread = np.zeros(len(self.syms))  # per instrument: half its last quoted bid-ask spread
        self.adv = self._adv_of(master)  # per instrument: average daily volume (NaN: not given)
        self.ext = ExternalAccounts(self.specs, calc_config, self.syms)  # accounts on external models
        self.external = self.ext.models  # model name -> the external model object
        self.model_code, self.max_stress = model_codes(self.specs, params)
        self.collateral = np.array([s.collateral for s in self.specs], dtype=np.float64)
        price, mult = start_prices(
            self.sym_index, positions, prices or {}, multipliers or {}, self.ext.contract
        )
        self.st = self._alloc(params, positions, price, mult)
        self.master, self.vol_surface = master, vol_surface
        self.history_file = str(calc_config.history_file)  # the history in force (a param event moves it)
        self._compare: dict[str, ExternalModel] | None = None  # what-if's comparison models, built when asked
        self.as_of = np.datetime64("today", "D") if as_of is None else np.datetime64(as_of, "D")
        self.options: OptionBook | None = None
        if opts:
            self.options = self._option_book(opts, params)
        self._set_params(params)
        self._queue: dict[str, list[np.ndarray]] = {k: [] for k in _QUEUES}
        n_acc = len(self.specs)
        self._changed = np.ones(n_acc, dtype=np.bool_)  # numbers moved since the last changed_rows
        self._published = np.full((n_acc, 5), np.nan)  # margin, var, es, stress, collateral last published
        self._force = np.zeros(n_acc, dtype=np.bool_)  # publish even if the numbers did not move
        self.last_seq = 0
        self.now = 0  # latest event time seen (ns since the epoch); the clock of the jump alert
        self.events = 0
        self._since_resync = 0
        self.rejects: deque[str] = deque(maxlen=1000)
        self.rejected = 0
        self.alerts = AlertBook(calc_config.alerts)
        self._alert_rows: list[dict[str, Any]] = []  # rule and data alerts, in order, for take_alerts
        self._unevaluated: list[tuple[str, float, float, int, int]] = []  # rows the rules have not seen
        self.recomputed = 0  # accounts recomputed in full because their incremental result was not finite
        self.withheld = 0  # margin rows withheld because an account's numbers stayed non-finite
        self._hold(positions, price)
        self.price_band = PriceBand(
            calc_config.price_band, calc_config.sectors, self.syms, price, self._alert_rows, self._reject
        )
        for m in self.external.values():  # models that read the engine (CCP models: prices, options)
            if hasattr(m, "bind"):
                m.bind(self)
        spread = {n for n, m in self.external.items() if getattr(m, "uses_spreads", False)}
        mask = np.array([s.model in spread for s in self.specs], dtype=np.bool_)
        self._spread_models = mask if mask.any() else None  # (a mask: per quote batch a lookup, no np.isin)
        self.ext.check_held(self.st)
        self.projector: Projector | None = None  # the forecast of the call, with [[calc.ccps]]
        self._callchecks: dict[str, list] = {}  # parallel-run rows waiting for take_callchecks
        if calc_config.ccps:
            self.projector = Projector(
                calc_config, {s.account: s for s in self.specs}, _history_of(self), _forecast_of(calc_config)
            )
        self.full_recompute()

    def _alloc(self, params: RiskParams, positions: Positions, price: np.ndarray, mult: np.ndarray):
        """The kernel state (calc/state.py) for the accounts' models, with room for twice the most
        positions an account starts with (at least 8 slots)."""
        self.stress_set: StressSet = build_stress(self.settings.stress, self.settings.sectors, self.syms)
        pcap = 8
        if positions.account:
            _, counts = np.unique(np.array(positions.account, dtype=object), return_counts=True)
            pcap = max(pcap, int(counts.max()) * 2)
        n_sc = 0 if params.scenarios is None else params.scenarios.shape[0]
        every = self.settings.stress_all and params.cov is not None  # (stress needs the covariance)
        return new_state(
            self.model_code,
            self.max_stress,
            len(self.syms),
            pcap,
            n_sc,
            self.stress_set,
            price,
            mult,
            every,
            self.accounts,
        )

    def _hold(self, positions: Positions, price: np.ndarray) -> None:
        """The start-of-day positions into their slots; refused: a held instrument of a built-in model
        with no price."""
        if len(positions.account):
            a_ix = _indices(self.acc_index, positions.account, "positions: unknown account")
            j_ix = _indices(self.sym_index, positions.sym, "positions: unknown sym")
            bad = (self.model_code[a_ix] != M_EXT) & ~self.has_params[j_ix]
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise InputError(
                    f"positions: unknown sym {self.syms[j_ix[i]]!r}: no price history or covariance for it "
                    f"(account {self.accounts[a_ix[i]]!r} uses model {self.specs[a_ix[i]].model!r})"
                )
            slots = self._slots_for(a_ix, j_ix)
            np.add.at(self.st.qty, (a_ix, slots), positions.qty)
        st = self.st
        builtin_held = np.unique(st.inst[(self.model_code != M_EXT)[:, None] & (st.qty != 0)])
        nan = builtin_held[~np.isfinite(price[builtin_held])]
        if len(nan):
            raise InputError(
                f"no price for sym {self.syms[int(nan[0])]!r} "
                "(give it in prices or the positions' price column)"
            )

    # ---- construction from config files

    @classmethod
    def from_config(cls, calc: CalcConfig, *, param_id: str | None = None) -> MarginEngine:
        """Engine for the [calc] section: history_file, positions_file, accounts_file; the latest
        close of the history is the start price."""
        history = load_prices(calc.history_file)
        accounts = load_accounts(calc.accounts_file, calc.default_policy)
        positions = load_positions(calc.positions_file)
        params = params_from_config(calc, history, param_id=param_id)
        return cls(
            params,
            accounts,
            positions,
            prices=history.latest,
            calc_config=calc,
            **option_inputs(calc, history.dates[-1]),
        )

    # ---- results (views on the kernel state)

    @property
    def margin(self) -> np.ndarray:
        return self.st.res[:, R_MARGIN]

    @property
    def var(self) -> np.ndarray:
        return self.st.res[:, R_VAR]

    @property
    def es(self) -> np.ndarray:
        return self.st.res[:, R_ES]

    @property
    def stress(self) -> np.ndarray:
        """Worst stress loss (floored at 0) of the accounts that keep stress state, else 0."""
        return np.maximum(self.st.res[:, R_STRESS], 0.0)

    @property
    def param_id(self) -> str:
        return self.params.param_id

    def scenario_work(self) -> dict[str, int]:
        """The HS scenario work since start: P&L rows flushed (scenarios x changed slots each) and tail
        candidates evaluated (changed slots each) by the lazy tails (calc/kernels.py `_hs_tail`)."""
        c = self.st.counts
        return {"flushes": int(c[kernels.N_FLUSH]), "evaluations": int(c[kernels.N_EVAL])}

    def memory(self) -> dict[str, float]:
        """Bytes of the kernel state (every array of kernels.State), in all and per account."""
        total = sum(getattr(self.st, k).nbytes for k in kernels.LAYOUT)
        return {"state_bytes": total, "bytes_per_account": total / max(1, len(self.accounts))}

    # ---- parameters

    def _set_params(self, params: RiskParams) -> None:
        """Install risk parameters in the kernel state, fitted to the engine's instruments (inputs.fit_params:
        reordered to them, an instrument missing from them refused, a part they lack kept). The engine
        keeps them light (`params`: no covariance or scenarios, which live in the state only; see
        params_in_force)."""
        st = self.st
        n = self.n_hist
        n_sc = st.rt.shape[1]
        lacks = params.cov is None or params.scenarios is None
        old = self.params_in_force() if lacks and hasattr(self, "params") else None
        params = fit_params(params, self.syms[:n], n_sc, old)
        self.scale = params.scale
        self.st = install_params(st, params, n, self.stress_set.vol_mult, self.settings.hvar_margin)
        if self.options is not None:
            self.options.set_params(params)
            self.st = self.options.install(self.st)
        else:
            self.st.orow[:] = -1
        self._parts = (params.cov is not None, params.scenarios is not None)
        self._vol_ratio = params.vol_ratio
        self.params = dataclasses.replace(params, cov=None, scenarios=None, vol_ratio=None)

    def params_in_force(self) -> RiskParams:
        """The risk parameters in force, whole: `params` with its covariance and scenarios read back from
        the state (copies of st.cov and st.rtT over the first n_hist instruments, which install_params
        wrote them into and nothing else writes) and the options' vol ratios."""
        st, n = self.st, self.n_hist
        has_cov, has_sc = self._parts
        return dataclasses.replace(
            self.params,
            cov=st.cov[:n, :n].copy() if has_cov else None,
            scenarios=st.rtT[:, :n].copy() if has_sc else None,
            vol_ratio=self._vol_ratio,
        )

    def set_params(self, params: RiskParams) -> None:
        """A `param` event: new covariance / scenarios (same syms; for a new universe build a new
        engine). Recomputes everything; every account republishes under the new param_id."""
        self.refresh()
        self._set_params(params)
        self.full_recompute()
        self._force[:] = True

    # ---- options

    def _adv_of(self, master: Instruments | None) -> np.ndarray:
        """Per engine instrument the instrument master's `adv` (NaN where it gives none)."""
        adv = np.full(len(self.syms), np.nan)
        if master is not None and master.adv is not None:
            for s, v in zip(master.syms, master.adv.tolist(), strict=True):
                if s in self.sym_index:
                    adv[self.sym_index[s]] = v
        return adv

    def _usable_options(self, master: Instruments) -> list[int]:
        """Indices into `master` of its options whose underlying has risk parameters."""
        hist = set(self.syms[: self.n_hist])
        return [int(i) for i in master.options if master.syms[master.underlying[i]] in hist]

    def _option_book(self, opts: Sequence[int], params: RiskParams) -> OptionBook:
        """The OptionBook of master options `opts` (already instruments of the engine): their multipliers
        and risk parameters (the underlying's) set; installed by the next _set_params."""
        contracts = OptionContracts.build(
            self.master,
            self.vol_surface,
            self.sym_index,
            self.as_of,
            self.settings.option_rate,
            lambda u: self.st.price[u],
            only=np.array(opts, dtype=np.int64),
            american=self.settings.american,
        )
        self.st.mult[contracts.inst] = contracts.mult
        self.has_params[contracts.inst] = self.has_params[contracts.und]
        book = OptionBook(contracts, params, self.settings.theta)
        book.reject = lambda seq, why: self._reject("quote", seq, why)
        return book

    def set_history_file(self, path: str, as_of: Any) -> None:
        """A `history` param event, after set_params: the CCP models' specs and scenario sets rebuilt from
        the file, the what-if's comparison models dropped (rebuilt from it when asked), and the options'
        valuation date moved to `as_of`."""
        self.history_file = path
        self._compare = None
        self.set_valuation_date(as_of)
        for name, model in self.external.items():
            if hasattr(model, "reload_history"):
                self.update_external(name, lambda m: m.reload_history(path))

    # ---- the forecast of the call (calc/projection.py) ---------------------------------------------
    def project(self, rows: MarginColumns, force: bool = False, evaluate: bool = True) -> dict[str, list]:
        """After changed_rows, before take_alerts: the event clock and the published rows into the forecast;
        returns the `forecast` rows of the accounts whose forecast moved ({} without [[calc.ccps]]), and
        queues the predicted_call alerts of the next-cycle rows (with drivers and stress in the text). With
        `evaluate` False the rows and the clock only (the accounts stay due for the next evaluation)."""
        p = self.projector
        if p is None:
            return {}
        if self.now > 0:
            p.advance(self.now)
        p.on_margin(rows, self.now)
        if self.now <= 0 or not (evaluate or force):  # no event yet: no clock to project from
            return {}
        out = p.forecast_rows(self.now, self.last_seq, force)
        if any(r.kind == "predicted_call" for r in self.alerts.rules):
            for i, h in enumerate(out["horizon"]):
                if h != "next":
                    continue
                name = out["account"][i]
                lead = (out["cycle_time"][i] - self.now) / 1e9
                cycle = f"{out['ccp'][i]} {out['cycle'][i]} {out['business_date'][i]}"
                self._alert_rows.extend(
                    self.alerts.evaluate_forecast(
                        name,
                        out["call_p50"][i],
                        out["call_p95"][i],
                        lead,
                        cycle,
                        self.now,
                        self.last_seq,
                        self._call_detail(name),
                    )
                )
        return out

    def _call_detail(self, name: str) -> str:
        """What drives a projected call, for its alert: the top drivers and the worst stress scenario."""
        a = self.acc_index[name]
        drivers = msgspec.json.decode(self._drivers_json(np.array([a]))[0])
        top = ", ".join(f"{d['sym']} {d['contribution']:,.0f}" for d in drivers[:3] if d["sym"] != "*other*")
        parts = [f"drivers {top}" if top else ""]
        if self.st.f_st[a] and self.settings.stress:
            name = self.settings.stress[int(self.st.ires[a, kernels.I_STK])].name
            parts.append(f"worst stress {name} {float(self.stress[a]):,.0f}")
        return "; ".join(p for p in parts if p)

    def apply_calls(
        self, cols: Mapping[str, Sequence[Any]], seq: np.ndarray | None = None, time: np.ndarray | None = None
    ) -> int:
        """Actual `call` rows: their parallel-run `callcheck` rows wait for take_callchecks; a row calc cannot
        place (unknown CCP, cycle or account) is counted as a reject naming the field. Returns the rows."""
        if self.projector is None:
            return 0
        seq = np.zeros(0, dtype=np.int64) if seq is None else np.asarray(seq, dtype=np.int64)
        self._clock(seq, time)  # (each call row is an event)
        check, issues = self.projector.on_calls(cols)
        for why in issues:
            self._reject("call", int(seq.max()) if len(seq) else 0, why)
        for k, v in check.items():
            self._callchecks.setdefault(k, []).extend(v)
        return len(cols.get("account", ()))

    def take_callchecks(self) -> dict[str, list]:
        out, self._callchecks = self._callchecks, {}
        return out

    def set_forecast_model(self, model: Any) -> str:
        """A trained forecast put in force (None: the replica and its error band)."""
        if self.projector is None:
            return "no [[calc.ccps]]: the forecast is off"
        self.projector.set_model(model)
        return f"forecast: {self.projector.method}"

    def set_valuation_date(self, as_of: Any) -> None:
        """The options' valuation date (time to expiry) moved, e.g. by a new price history under [calc]
        as_of = "": the options are rebuilt at it (set_options) and every account recomputed."""
        as_of = np.datetime64(as_of, "D")
        if as_of != self.as_of:
            self.as_of = as_of
            if self.master is not None:
                self.set_options()

    def set_options(self, master: Instruments | None = None, vol_surface: VolSurface | None = None) -> int:
        """An `instruments` or `vol_surface` param event: the options rebuilt from the new instrument master
        and / or vol surface (the other stays in force), new options added as instruments, every account
        recomputed and republished. Refused (InputError, the engine unchanged): an option held by an
        account that the new master lacks, an option with no vol. Returns the option contracts in force."""
        self.refresh()
        master = master or self.master
        surface = vol_surface or self.vol_surface
        if master is None:
            raise InputError(
                "vol_surface: no instrument master is in force (load one with --kind instruments)"
            )
        opts = self._usable_options(master)
        keep = {master.syms[i] for i in opts}
        st = self.st
        for j in [] if self.options is None else self.options.contracts.inst.tolist():
            holders, slots = st.hold_acc[j, : st.nhold[j]], st.hold_slot[j, : st.nhold[j]]
            held = holders[st.qty[holders, slots] != 0]
            if self.syms[j] not in keep and len(held):
                raise InputError(
                    f"instruments: option {self.syms[j]!r} is held by account "
                    f"{self.accounts[int(held[0])]!r} but not in the new file (the old file stays in force)"
                )
        add = [master.syms[i] for i in opts if master.syms[i] not in self.sym_index]
        trial = {**self.sym_index, **{s: len(self.syms) + k for k, s in enumerate(add)}}
        spot = lambda u: self.st.price[u]  # noqa: E731
        OptionContracts.build(master, surface, trial, self.as_of, self.settings.option_rate, spot, only=opts)
        if add:  # the checks passed: nothing below refuses
            self._add_syms(add, [(np.nan, 1.0)] * len(add))
        if self.options is not None:
            self.has_params[self.options.contracts.inst] = False
        self.master, self.vol_surface = master, surface
        self.adv = self._adv_of(master)
        params = self.params_in_force()
        self.options = self._option_book(opts, params) if opts else None
        self._set_params(params)
        self.full_recompute()
        self._force[:] = True
        return 0 if self.options is None else len(self.options.contracts)

    # ---- instruments and slots

    def _add_instruments(self, syms: Sequence[str], model: str) -> None:
        """New instruments (no risk parameters) first seen in a fill or what-if of an external model's
        account, priced from the model until a tick arrives: every per-instrument array grows."""
        self._add_syms(syms, [self.ext.instrument(model, s) or (np.nan, 1.0) for s in syms])

    def _add_syms(self, syms: Sequence[str], info: Sequence[tuple[float, float]]) -> None:
        """New instruments at (price, multiplier) `info`, without risk parameters: every per-instrument
        array grows."""
        n = len(self.syms) + len(syms)
        for s in syms:
            self.sym_index[s] = len(self.syms)
            self.syms.append(s)
        self.has_params = np.concatenate([self.has_params, np.zeros(len(syms), dtype=np.bool_)])
        self.half_spread = np.concatenate([self.half_spread, np.zeros(len(syms))])
        self.adv = np.concatenate([self.adv, np.full(len(syms), np.nan)])
        self.stress_set = build_stress(self.settings.stress, self.settings.sectors, self.syms)
        st = kernels.grow(self.st, N=n)
        st.price[n - len(syms) :], st.mult[n - len(syms) :] = zip(*info, strict=True)
        self.st = st._replace(shock=np.ascontiguousarray(self.stress_set.shocks[: st.shock.shape[0]]))
        if self.options is not None:
            self.options.map_rows(self.st)
        self.price_band.add(syms, st.price[n - len(syms) :])

    def _slots_for(self, a_ix: Sequence[int] | np.ndarray, j_ix: Sequence[int] | np.ndarray) -> np.ndarray:
        """Slot of each (account, instrument), opening new slots (and holder entries) as needed
        (calc/state.py place_slots); new slots are queued for initialisation by the next kernel step."""
        a = np.asarray(a_ix, dtype=np.int64)
        self.st, slots, opened = place_slots(self.st, a, np.asarray(j_ix, dtype=np.int64))
        if opened.any():
            self._queue["new_a"].append(a[opened])
            self._queue["new_s"].append(slots[opened])
        return slots

    # ---- events

    def _reject(self, what: str, seq: int, reason: str) -> None:
        self.rejected += 1
        self.rejects.append(f"{what} seq {seq}: {reason}")

    def _clock(self, seq: np.ndarray, time: np.ndarray | None) -> None:
        """Rows come in seq order (tickerplant batches): the last row carries the highest seq and time
        (a one-row batch, the live case, spares numpy's reductions)."""
        if len(seq):
            self.last_seq = max(self.last_seq, int(seq[-1]) if len(seq) == 1 else int(seq.max()))
        if time is not None and len(time):
            t = np.asarray(time)
            t = t if t.dtype == np.int64 else t.astype("datetime64[ns]").view(np.int64)
            self.now = max(self.now, int(t[-1]) if len(t) == 1 else int(t.max()))
        self.events += len(seq)
        self._since_resync += len(seq)

    def _queue_ticks(self, ix: np.ndarray, price: np.ndarray) -> None:
        """Queue accepted prices (instrument indices, prices) for the next refresh."""
        self._queue["tick_ix"].append(ix)
        self._queue["tick_px"].append(price)

    def apply_prices(
        self, sym: Sequence[str], price: np.ndarray, seq: np.ndarray, time: np.ndarray | None = None
    ) -> int:
        """New market prices (trade prices or quote mids), rows in seq order. A sym the engine does
        not know is ignored (market data for instruments nobody holds); a price that is not a finite
        number > 0 is rejected; one outside the instrument's acceptance band is held as suspect (see
        the module docstring). Returns the rows applied."""
        return self._apply_prices(self._sym_ix(sym), sym, price, seq, time)

    def _sym_ix(self, sym: Sequence[str]) -> np.ndarray:
        """The instrument index of each sym, -1 for one the engine does not know."""
        get = self.sym_index.get
        return np.fromiter((get(s, -1) for s in sym), dtype=np.int64, count=len(sym))

    def _apply_prices(
        self, ix: np.ndarray, sym: Sequence[str], price: np.ndarray, seq: np.ndarray, time: np.ndarray | None
    ) -> int:
        price = np.asarray(price, dtype=np.float64)
        seq = np.asarray(seq, dtype=np.int64)
        ok = (ix >= 0) & np.isfinite(price) & (price > 0)
        tick_seq = seq
        if not ok.all():
            for i in np.flatnonzero((ix >= 0) & ~ok):
                self._reject(
                    "price",
                    int(seq[i]),
                    f"price {float(price[i])!r} for {sym[i]!r} is not a finite number > 0",
                )
            ix, price, tick_seq = ix[ok], price[ok], seq[ok]
        if self.options is not None and len(ix) and (self.st.orow[ix] >= 0).any():
            quote = self.st.orow[ix] >= 0  # an option's own price: a quote (its kernel price is its delta)
            self.options.on_quotes(ix[quote], price[quote], tick_seq[quote])
            ix, price, tick_seq = ix[~quote], price[~quote], tick_seq[~quote]
        if len(ix):
            keep = self.price_band.check(ix, price, tick_seq)
            if keep is not None:
                ix, price = ix[keep], price[keep]
        self._queue_ticks(ix, price)
        self._clock(seq, time)
        return len(ix)

    def apply_quotes(
        self,
        sym: Sequence[str],
        bid: np.ndarray,
        ask: np.ndarray,
        seq: np.ndarray,
        time: np.ndarray | None = None,
    ) -> int:
        """Quote rows: the mid is a price (apply_prices: checked, banded); half the bid-ask spread of each
        sane quote (finite, 0 < bid <= ask) of an instrument not held as suspect is kept for the CCP
        models' liquidity add-on, and a changed spread re-evaluates the holders on such a model. Returns
        the rows applied."""
        bid, ask = np.asarray(bid, np.float64), np.asarray(ask, np.float64)
        ix = self._sym_ix(sym)
        n = self._apply_prices(ix, sym, (bid + ask) / 2.0, seq, time)
        half = (ask - bid) / 2.0
        ok = (ix >= 0) & np.isfinite(bid) & np.isfinite(ask) & (bid > 0) & (half >= 0)
        if self.price_band.suspects and ok.any():
            ok &= np.array([j not in self.price_band.suspects for j in ix.tolist()])
        ix, half = ix[ok], half[ok]
        moved = np.unique(ix[half != self.half_spread[ix]])
        self.half_spread[ix] = half
        spread = self._spread_models
        if len(moved) and spread is not None:
            st = self.st
            held = np.concatenate([st.hold_acc[j, : st.nhold[j]] for j in moved.tolist()])
            held = held[held < len(spread)]  # (accounts opened later are on no such model)
            self._mark_dirty(np.unique(held[spread[held]]))
        return n

    def _mark_dirty(self, acc: np.ndarray) -> None:
        """Accounts `acc` recomputed (external ones re-evaluated) at the next kernel step."""
        st = self.st
        new = acc[~st.dirty[acc]]
        c = int(st.counts[N_DIRTY])
        st.dirty[new] = True
        st.dirty_list[c : c + len(new)] = new
        st.counts[N_DIRTY] = c + len(new)

    def apply_fills(
        self,
        account: Sequence[str],
        sym: Sequence[str],
        side: Sequence[str],
        qty: np.ndarray,
        price: np.ndarray,
        seq: np.ndarray,
        time: np.ndarray | None = None,
    ) -> int:
        """Fills in seq order: side "B" adds qty to the position, "S" subtracts it. Rows for an
        unknown account or sym, a bad side or a quantity that is not > 0 are rejected (see
        `rejects`); the fill price becomes the market price only if the instrument has none yet.
        Returns the rows applied."""
        seq = np.asarray(seq, dtype=np.int64)
        n = len(account)
        acc_get, sym_get = self.acc_index.get, self.sym_index.get
        a_l = [acc_get(a, -1) for a in account]
        j_l = [sym_get(s, -1) for s in sym]
        q_l = np.asarray(qty, dtype=np.float64).tolist()
        px = np.asarray(price, dtype=np.float64).tolist()
        dq = []
        ext_ok = None
        if not self.ext.accounts.isdisjoint(a_l):  # an external model's account: the model knows its syms
            ext_ok = self.ext.admit(a_l, j_l, sym, self.sym_index, self._add_instruments)
        model, has_params, known_px = self.model_code, self.has_params, self.st.price
        keep = []
        for i in range(n):  # per row: a few dict lookups beat a dozen numpy calls for the usual small batch
            a, j, q, sign = a_l[i], j_l[i], q_l[i], _SIGN.get(side[i], 0.0)
            if a < 0:
                why = f"unknown account {account[i]!r}"
            elif ext_ok is not None and not ext_ok[i]:
                why = f"unknown sym {sym[i]!r} (not an instrument of model {self.specs[a].model!r})"
            elif j < 0:
                why = f"unknown sym {sym[i]!r}"
            elif sign == 0.0:
                why = f"side {side[i]!r} is not B or S"
            elif not 0.0 < q < math.inf:
                why = f"qty {q!r} is not a finite number > 0"
            elif model[a] != M_EXT and not has_params[j]:
                why = (
                    f"no risk parameters for sym {sym[i]!r} "
                    f"(account {account[i]!r} model {self.specs[a].model})"
                )
            else:
                keep.append(i)
                dq.append(sign * q)
                if not math.isfinite(known_px[j]) and 0.0 < px[i] < math.inf:
                    # first sight of an instrument: its fill price is the best price there is
                    known_px[j] = px[i]
                    self.price_band.ref_price[j] = px[i]
                    self._queue_ticks(np.array([j], dtype=np.int64), np.array([px[i]]))
                continue
            self._reject("fill", int(seq[i]), why)
        if len(keep) < n:
            a_l, j_l = [a_l[i] for i in keep], [j_l[i] for i in keep]
        slots = self._slots_for(a_l, j_l)
        self._queue["fill_a"].append(np.array(a_l, dtype=np.int64))
        self._queue["fill_s"].append(slots)
        self._queue["fill_dq"].append(np.array(dq, dtype=np.float64))
        self._clock(seq, time)
        return len(a_l)

    def accept_price(self, sym: str, price: float | None = None) -> str:
        """An operator's `price_accept` param event: the held suspect price of `sym` (or `price`) becomes
        its accepted price and market price; its data alert is cleared. Returns what happened."""
        j = self.sym_index.get(sym)
        if j is None:
            raise InputError(f"price_accept: unknown sym {sym!r}")
        if self.st.orow[j] >= 0:
            raise InputError(
                f"price_accept: {sym!r} is an option: its price follows its underlying and its implied vol "
                "(a quote of it sets the vol)"
            )
        sus = self.price_band.suspects.get(j)
        if price is None:
            if sus is None:
                return f"{sym}: no suspect price held, nothing to accept"
            price = sus.last
        if not (isinstance(price, float | int) and math.isfinite(price) and 0 < price):
            raise InputError(f"price_accept: price for {sym!r} must be a finite number > 0, got {price!r}")
        self.price_band.accept(j, float(price), self.last_seq, "accepted by an operator (prices accept)")
        self._queue_ticks(np.array([j], dtype=np.int64), np.array([float(price)]))
        return f"{sym}: price {price:,.6g} accepted as the reference and market price"

    def set_collateral(self, account: str, collateral: float) -> None:
        a = _indices(self.acc_index, [account], "collateral: unknown account")[0]
        if not (math.isfinite(collateral) and collateral > 0):
            raise InputError(f"collateral for {account!r} must be a finite number > 0, got {collateral!r}")
        self.collateral[a] = collateral
        self._changed[a] = True

    # ---- computing

    def _queued(self) -> dict[str, np.ndarray]:
        """The events queued since the last refresh, one array per kernels.step input (left queued)."""
        return {
            name: parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else empty
            for name, parts in self._queue.items()
            for empty in [_F0 if name in ("tick_px", "fill_dq") else _I0]
        }

    def _queued_prices(self) -> tuple[np.ndarray, np.ndarray]:
        """(price, ticked) per instrument once the queued ticks are applied (an instrument's last tick
        wins), and which instruments have a queued tick: what the next refresh prices at."""
        price, ticked = self.st.price.copy(), np.zeros(self.st.price.shape[0], dtype=np.bool_)
        q = self._queued()
        ix = q["tick_ix"]
        if len(ix):
            last = len(ix) - 1 - np.unique(ix[::-1], return_index=True)[1]
            price[ix[last]] = q["tick_px"][last]
            ticked[ix] = True
        return price, ticked

    def _take_queue(self) -> list[np.ndarray]:
        """The queued events as kernels.step's inputs, emptying the queue. Always writable arrays: a
        table's batch alone in a refresh arrives from Arrow's read-only buffers, and a read-only input is
        another numba signature of the step (compiled on calc's first live tick: seconds of silence)."""
        out = [np.require(a, requirements="W") for a in self._queued().values()]
        for parts in self._queue.values():
            parts.clear()
        return out

    def _step(self, all_dirty: bool = False) -> np.ndarray:
        quotes = self.options is not None and bool(self.options.pending)
        if not all_dirty and not quotes and not any(self._queue.values()):
            return _I0  # nothing queued: no kernel call
        if self.options is not None and (self._queue["tick_ix"] or self._queue["new_s"] or quotes):
            # the held options of ticked underlyings (and newly held stale ones) repriced
            self._queue_ticks(*self.options.before_step(self.st, *self._queued_prices()))
        n = kernels.run_step(self.st, *self._take_queue(), all_dirty)
        acc = self.st.dirty_list[:n].copy()
        if self.ext.accounts:
            self.ext.refresh(self.st, acc)
        self._changed[acc] = True
        jumped = self.price_band.jumped
        if jumped:  # accepted jumps: their holders' state rebuilt from scratch
            st = self.st
            held = [st.hold_acc[j, : st.nhold[j]] for j in sorted(jumped)]
            jumped.clear()
            self._rebuild(np.unique(np.concatenate(held)))
        res = self.st.res[acc]
        if not np.isfinite(res).all():
            bad = acc[~np.isfinite(res).all(axis=1)]
            self.recomputed += len(bad)
            log.warning(
                "accounts %s: incremental result not finite; recomputed in full",
                [self.accounts[a] for a in bad.tolist()],
            )
            self._rebuild(bad)
        return acc

    def _rebuild(self, acc: np.ndarray) -> None:
        """Accounts `acc` recomputed in full: their risk state rebuilt from positions and prices with the
        full recompute's dense products (reference.rebuild_state), then their numbers (one kernel step,
        no events)."""
        if not len(acc):
            return
        st = self.st
        reference.rebuild_state(st, acc, self.stress_set.vol_mult)
        self._mark_dirty(acc[self.model_code[acc] != M_EXT])
        kernels.run_step(self.st, _I0, _F0, _I0, _I0, _F0, _I0, _I0, False)
        self.ext.refresh(st, acc, full=True)
        self._changed[acc] = True

    def refresh(self) -> np.ndarray:
        """Run the queued events through the kernels: the risk state of every touched position is
        brought up to date and the numbers of the accounts that moved are recomputed; returns them."""
        if self.settings.resync_events and self._since_resync >= self.settings.resync_events:
            return self.full_recompute()
        return self._step()

    def update_external(self, model: str, update: Callable[[ExternalModel], Any]) -> np.ndarray:
        """A parameter event for external model `model` (e.g. a new SPAN file): brings its accounts up to
        date, calls `update(model object)` (an exception propagates and leaves the engine as it was),
        then re-evaluates those accounts; they republish under the model's `param_id`. Returns them."""
        if model not in self.external:
            return _I0
        self.refresh()
        acc = self.ext.update(model, update, self.st)
        self._changed[acc] = True
        self._force[acc] = True
        return acc

    def full_recompute(self) -> np.ndarray:
        """Rebuild every account's risk state from positions and prices with dense numpy products
        (the reference for the incremental kernels; also run on a parameter change and every
        resync_events events), then recompute all numbers. Returns all account indices."""
        self._step()  # apply queued events (their incremental work is redone below)
        reference.rebuild_state(self.st, None, self.stress_set.vol_mult)
        self._since_resync = 0
        return self._step(all_dirty=True)

    def compute_full(self) -> dict[str, np.ndarray]:
        """The reference numbers from scratch (calc/reference.py: full_numbers) after applying queued
        events: margin, var, es, stress per account, contrib (A, N) of the margin's drivers, exposure."""
        self.refresh()
        ext = lambda a: self.ext.evaluate(self.st, a, full=True)  # noqa: E731
        return reference.full_numbers(
            self.st, self.stress_set, self.params.confidence, self.scale, self.settings.hvar_margin, ext
        )

    # ---- publishing

    def _contrib(self, acc: np.ndarray) -> np.ndarray:
        """(len(acc), P) per-slot contributions to each account's margin number."""
        return contributions(self.st, acc, self.ext.contrib)

    def _drivers_json(self, acc: np.ndarray) -> list[str]:
        """Top drivers of each account's margin as JSON (calc/drivers.py)."""
        greeks = None if self.options is None else self._position_greeks
        self._names = json_names(self.syms, self._names)
        return drivers_json(self.st, acc, self.settings.top_drivers, self._names, self.ext.contrib, greeks)

    def _position_greeks(self, a: int, j: int) -> dict[str, float]:
        """Delta, gamma, vega of account a's position in option j: qty x multiplier x per unit."""
        q = float(self.st.qty[a, slot_of(self.st, a, j)] * self.st.mult[j])
        _, delta, gamma, vega = self.options.greeks[self.options.of_inst[j]].tolist()
        return {"delta": q * delta, "gamma": q * gamma, "vega": q * vega}

    def drivers(self, a: int) -> list[dict[str, Any]]:
        """Top drivers of account a's margin as a list of {sym, exposure, contribution}."""
        return msgspec.json.decode(self._drivers_json(np.array([a], dtype=np.int64))[0])

    def snapshot(self) -> MarginColumns:
        """Current margin rows for all accounts (change = since the last published row), without
        marking anything published (calc/margin_rows.py)."""
        self.refresh()
        return margin_rows.snapshot(self)

    def changed_rows(self, now: int | None = None, drivers: bool = True) -> MarginColumns:
        """One margin row per account whose margin, VaR, ES, stress or collateral differs from its
        last published row (every account on the first call and after new parameters); marks them
        published; `take_alerts` evaluates the alert rules on them. `now` (ns) overrides the event clock
        for the jump rule; drivers=False leaves the drivers column "[]" (for callers that keep only the
        numbers, like the backtest). Rows built in calc/margin_rows.py."""
        self.refresh()
        if now is not None:
            self.now = max(self.now, int(now))
        return margin_rows.changed_rows(self, drivers)

    def has_alerts(self) -> bool:
        """Alert rows wait for take_alerts (data alerts come with no margin row)."""
        return bool(self._alert_rows or self._unevaluated)

    def add_alert(self, row: dict[str, Any]) -> None:
        """An alert row raised outside the engine (a refused parameter file: calc/watch.py), published
        by the next take_alerts with the rule and data alerts, in order."""
        self._alert_rows.append(row)

    def take_alerts(self) -> AlertColumns:
        """Alert rows raised or cleared by the rows published since the last call, as columns of the
        alert table. The rules run here, not in changed_rows, so calc can send the margin rows first."""
        return margin_rows.take_alerts(self)

    def compare_models(self) -> dict[str, ExternalModel]:
        """The models a what-if compares side by side: the plain historical simulation ("hvar") and every
        [[calc.ccp_models]] entry (built once, bound to the engine); empty without CCP models."""
        if self._compare is None:
            from calc.ccp.engine_model import CcpEngineModel

            names = ["hvar", *(m.name for m in self.settings.ccp_models)] if self.settings.ccp_models else []
            hist = self.history_file
            self._compare = {
                n: self.external.get(n) or CcpEngineModel.from_config(n, self.settings, hist) for n in names
            }
            for m in self._compare.values():
                m.bind(self)
        return self._compare

    def what_if(
        self, account: str, trades: Sequence[Trade | Mapping[str, Any]], compare: bool = False
    ) -> dict[str, Any]:
        """Margin of `account` before and after hypothetical trades (calc/whatif.py), state untouched;
        compare=True adds the same before/after under every configured model (compare_models); with
        [[calc.ccps]], `forecast` is the call at the account's next cycle before and after."""
        out = what_if(self, account, trades, compare)
        if self.projector is not None:
            out["forecast"] = self.projector.what_if(account, out["margin_after"], self.now)
        return out


def _history_of(eng: MarginEngine) -> Any:
    """The price history in force (the forecast's market volatilities), or None if it cannot be read."""
    try:
        return load_prices(eng.history_file) if eng.history_file else None
    except (OSError, InputError) as e:
        log.warning("forecast: no market volatilities (%s)", e)
        return None


def _forecast_of(calc: CalcConfig) -> Any:
    """[calc] forecast_file's model if it beat the replica on held-out days (calc/forecast.py load), else
    None: the replica and its error band. A bad file is refused at start, naming it."""
    if not calc.forecast_file:
        return None
    from calc.forecast import load

    model = load(calc.forecast_file)
    if model is None:
        log.warning(
            "forecast %s did not beat the replica on held-out days: using the replica", calc.forecast_file
        )
    return model
