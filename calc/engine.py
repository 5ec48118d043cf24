"""The streaming margin engine: per-account positions and risk state in numpy arrays, updated
incrementally by fills and ticks (calc/kernels.py), read out as `margin` and `alert` rows.

    eng = MarginEngine.from_config(config.load().calc)        # or MarginEngine(params, accounts, positions, ...)
    eng.apply_fills(account, sym, side, qty, price, seq, time)  # a batch of fill rows, in seq order
    eng.apply_prices(sym, price, seq, time)                    # a batch of trade prices / quote mids
    rows = eng.changed_rows()      # {column: [values]}: one margin row per account whose numbers moved
    alerts = eng.take_alerts()     # {column: [values]}: alert rows raised / cleared by those rows
    eng.what_if("acct", [{"sym": "AAPL", "qty": -500}])        # margin before/after, state untouched
    eng.set_params(params_from_config(calc, new_history_path))  # a `param` event: full recompute
    eng.update_external("span", lambda m: m.reload(spn))       # an external model's param event (calc/params.py)
    eng.accept_price("AAPL")                                   # a `price_accept` param event: take the held price
    warm_up()                                                  # at start: load/compile the numba kernels

Market data that cannot poison state: each instrument has a last accepted price (at start the price
the engine is given: history close, positions) and a band (calc.price_band: default, per sector, per
sym). A tick moving further than the band from it is held as suspect, not applied: counted in
`rejected` / `rejects` with its reason, and a data alert is raised (account "*", rule
"price-band:SYM", kind "data"). confirm_ticks consecutive suspect ticks within the band of the first
confirm the new level; a tick back inside the band ends the suspicion; `accept_price` (an operator's
journaled param event) takes the held or a given price. Either way the alert is cleared. The check is
numpy over the batch; only a batch with a tick outside the band (or for a suspect instrument) walks
its ticks one by one. Decisions depend on the events only, not on how they were batched.

The engine never publishes a non-finite number: an account whose incremental result is not finite
is recomputed in full from positions and prices (the full recompute's path, for that account); if it
is still not finite its row is withheld (counted in `withheld`, logged) until its numbers are finite.
An accepted jump (confirmed or by an operator) also rebuilds the holders' state that way, so a large
rank-one update leaves no cancellation residue.

External models (calc.models.register_model; SPAN in calc/span/engine_model.py) are called per changed
account with `evaluate(syms, qty, price, multiplier)`, or `evaluate_account(account, ...)` if they keep
per-account state; optional `instrument(sym) -> (price, multiplier) | None` names the contracts their
accounts may hold (added to the engine when first traded) and `param_id` the file their rows carry.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from calc import kernels
from calc.alerts import ALL_ACCOUNTS, DATA_KIND, AlertBook, AlertRule
from calc.history import InputError, load_covariance, load_prices, read_table
from calc.kernels import (
    I_KIND,
    K_EXT,
    M_EXT,
    M_HVAR,
    M_STRESS,
    M_VAR,
    N_DIRTY,
    R_ES,
    R_MARGIN,
    R_STRESS,
    R_VAR,
)
from calc.models import (
    BUILTIN_MODELS,
    OTHER,
    POLICIES,
    ExternalModel,
    RiskParams,
    StressSet,
    build_stress,
    external_model,
    historical,
    parametric,
    params_from_history,
    stress,
    stressed_cov,
    tail_count,
    tail_weights,
    top_drivers,
)
from schemas.tables import TABLES

log = logging.getLogger("marginflow.calc.engine")
MARGIN_COLUMNS = [c.name for c in TABLES["margin"].input_columns]
BAND_RULE = "price-band"  # data alerts' rule: "price-band:SYM"
ALERT_COLUMNS = [c.name for c in TABLES["alert"].input_columns]
_json = msgspec.json.Encoder()


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class AccountSpec:
    """An account's margin model, collateral posted and policy ("model" or "max_stress")."""

    account: str
    model: str
    collateral: float
    policy: str = "model"
    desk: str = ""

    def __post_init__(self) -> None:
        where = f"account {self.account!r}"
        if not self.account:
            raise InputError("account: empty account name")
        if not (
            isinstance(self.collateral, float | int)
            and math.isfinite(self.collateral)
            and self.collateral > 0
        ):
            raise InputError(f"{where}: collateral must be a finite number > 0, got {self.collateral!r}")
        if self.policy not in POLICIES:
            raise InputError(f"{where}: policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.model:
            raise InputError(f"{where}: empty model")


@dataclass(frozen=True)
class Positions:
    """Start-of-day positions: parallel columns, one row per (account, sym)."""

    account: list[str]
    sym: list[str]
    qty: np.ndarray
    multiplier: dict[str, float] = field(default_factory=dict)
    price: dict[str, float] = field(default_factory=dict)


def _strings(table: Any, name: str, path: Path) -> list[str]:
    lower = {c.lower(): c for c in table.column_names}
    if name not in lower:
        raise InputError(f"{path}: missing column {name!r} (columns are {table.column_names})")
    vals = table.column(lower[name]).to_pylist()
    for i, v in enumerate(vals):
        if v is None or str(v).strip() == "":
            raise InputError(f"{path}: row {i + 1}: empty {name!r}")
    return [str(v).strip() for v in vals]


def _numbers(table: Any, name: str, path: Path, required: bool = True) -> np.ndarray | None:
    lower = {c.lower(): c for c in table.column_names}
    if name not in lower:
        if required:
            raise InputError(f"{path}: missing column {name!r} (columns are {table.column_names})")
        return None
    col = table.column(lower[name])
    try:
        vals = np.array([np.nan if v is None else float(v) for v in col.to_pylist()], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{path}: column {name!r}: not a number") from None
    bad = ~np.isfinite(vals)
    if bad.any():
        raise InputError(f"{path}: row {int(np.flatnonzero(bad)[0]) + 1}: {name!r} is NaN or missing")
    return vals


def load_positions(path: str | Path) -> Positions:
    """`account,sym,qty` with optional `multiplier` (per sym, > 0) and `price` (per sym, > 0);
    CSV, CSV.gz or Parquet. Rows of the same (account, sym) add up."""
    path = Path(path)
    t = read_table(path)
    account, sym = _strings(t, "account", path), _strings(t, "sym", path)
    qty = _numbers(t, "qty", path)
    assert qty is not None
    per_sym: dict[str, dict[str, float]] = {}
    for name in ("multiplier", "price"):
        vals = _numbers(t, name, path, required=False)
        per_sym[name] = {}
        if vals is None:
            continue
        for i, (s, v) in enumerate(zip(sym, vals.tolist(), strict=True)):
            if v <= 0:
                raise InputError(f"{path}: row {i + 1}: {name} for {s!r} must be > 0, got {v!r}")
            if per_sym[name].setdefault(s, v) != v:
                raise InputError(f"{path}: row {i + 1}: {name} for {s!r} differs from an earlier row")
    return Positions(account, sym, qty, per_sym["multiplier"], per_sym["price"])


def load_accounts(path: str | Path, default_policy: str = "model") -> dict[str, AccountSpec]:
    """`account,model,collateral` with optional `policy` and `desk`."""
    path = Path(path)
    t = read_table(path)
    names, models = _strings(t, "account", path), _strings(t, "model", path)
    coll = _numbers(t, "collateral", path)
    assert coll is not None
    lower = {c.lower(): c for c in t.column_names}
    pol = (
        [str(v or default_policy).strip() for v in t.column(lower["policy"]).to_pylist()]
        if "policy" in lower
        else [default_policy] * len(names)
    )
    desk = (
        [str(v or "") for v in t.column(lower["desk"]).to_pylist()] if "desk" in lower else [""] * len(names)
    )
    out: dict[str, AccountSpec] = {}
    for i, a in enumerate(names):
        if a in out:
            raise InputError(f"{path}: row {i + 1}: account {a!r} appears twice")
        try:
            out[a] = AccountSpec(a, models[i], float(coll[i]), pol[i], desk[i])
        except InputError as e:
            raise InputError(f"{path}: row {i + 1}: {e}") from None
    return out


@dataclass(frozen=True)
class Settings:
    """Engine behaviour from the [calc] config section (defaults when a key is absent)."""

    hvar_margin: str = "var"
    top_drivers: int = 5
    resync_events: int = 0
    stress: tuple[Any, ...] = ()
    sectors: Mapping[str, str] = field(default_factory=dict)
    alerts: tuple[AlertRule, ...] = ()
    price_band: float = 0.5  # calc.price_band.default: relative move beyond which a tick is suspect (0 = off)
    band_sectors: Mapping[str, float] = field(default_factory=dict)  # calc.price_band.sectors
    band_syms: Mapping[str, float] = field(default_factory=dict)  # calc.price_band.syms
    confirm_ticks: int = 3  # calc.price_band.confirm_ticks

    @classmethod
    def from_config(cls, c: Any) -> Settings:
        get = (lambda k, d: c.get(k, d)) if isinstance(c, dict) else (lambda k, d: getattr(c, k, d))
        band = get("price_band", None) or {}
        bget = (lambda k, d: band.get(k, d)) if isinstance(band, dict) else (lambda k, d: getattr(band, k, d))
        s = cls(
            hvar_margin=get("hvar_margin", "var"),
            top_drivers=int(get("top_drivers", 5)),
            resync_events=int(get("resync_events", 0)),
            stress=tuple(get("stress", ()) or ()),
            sectors=dict(get("sectors", {}) or {}),
            alerts=tuple(AlertRule.from_config(r) for r in (get("alerts", ()) or ())),
            price_band=float(bget("default", 0.5)),
            band_sectors=dict(bget("sectors", {}) or {}),
            band_syms=dict(bget("syms", {}) or {}),
            confirm_ticks=int(bget("confirm_ticks", 3)),
        )
        if s.hvar_margin not in ("var", "es"):
            raise InputError(f"calc.hvar_margin: must be 'var' or 'es', got {s.hvar_margin!r}")
        if s.top_drivers < 1:
            raise InputError(f"calc.top_drivers: must be >= 1, got {s.top_drivers}")
        return s

    def __post_init__(self) -> None:
        for where, b in [
            ("default", self.price_band),
            *((f"sectors.{k}", v) for k, v in self.band_sectors.items()),
            *((f"syms.{k}", v) for k, v in self.band_syms.items()),
        ]:
            if not (isinstance(b, float | int) and math.isfinite(b) and b >= 0):
                raise InputError(
                    f"calc.price_band.{where}: must be a finite number >= 0 (0 = off), got {b!r}"
                )
        if self.confirm_ticks < 1:
            raise InputError(f"calc.price_band.confirm_ticks: must be >= 1, got {self.confirm_ticks}")

    def band_of(self, sym: str) -> float:
        """The acceptance band of an instrument: its own, else its sector's, else the default; 0 (off) -> inf."""
        b = self.band_syms.get(sym)
        if b is None:
            b = self.band_sectors.get(self.sectors.get(sym, ""), self.price_band)
        return float(b) if b > 0 else math.inf


@dataclass
class Suspect:
    """An instrument's held suspect ticks: the first price (the level others must agree with), the
    latest, how many agreeing ticks so far, and the reference they moved away from."""

    first: float
    last: float
    count: int
    reference: float


def params_from_config(
    calc: Any, history: Any = None, *, covariance_file: str | Path | None = None, param_id: str | None = None
) -> RiskParams:
    """Risk parameters under the [calc] settings (confidence, horizon, lookback, EWMA, filtering)
    from a price history (a PriceHistory, a path, or calc.history_file) or, for a `covariance`
    param event, a covariance file (parametric and stress models only). For `set_params`."""
    if covariance_file is not None:
        syms, cov = load_covariance(covariance_file)
        return RiskParams(
            syms,
            cov,
            None,
            calc.confidence,
            calc.horizon_days,
            param_id or f"covariance:{Path(covariance_file).name}",
        )
    if history is None or isinstance(history, str | Path):
        history = load_prices(history or calc.history_file)
    lookback = calc.lookback_days if calc.lookback_days > 0 else None
    return params_from_history(
        history,
        confidence=calc.confidence,
        horizon_days=calc.horizon_days,
        lookback_days=lookback,
        ewma_lambda=calc.ewma_lambda,
        filtered=calc.filtered,
        filter_lambda=getattr(calc, "filter_lambda", 0.94),
        param_id=param_id or f"history:{Path(calc.history_file).name}:{history.dates[-1]}",
    )


# ---------------------------------------------------------------- the engine


def _grow(a: np.ndarray, axis: int, new: int, fill: Any = 0) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = new
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


_I0 = np.zeros(0, dtype=np.int64)
_SIGN = {"B": 1.0, "S": -1.0}  # fill side -> sign of the position change
_F0 = np.zeros(0, dtype=np.float64)


class MarginEngine:
    """Positions, prices and risk state for all accounts; see the module docstring for the calls.

    apply_prices / apply_fills validate and queue events; the next refresh (called by
    changed_rows, snapshot, or directly) runs them through one kernel call, in order. The numbers a
    refresh produces depend only on the events and on where the refreshes fell, so replaying the
    same batches gives bit-identical rows."""

    def __init__(
        self,
        params: RiskParams,
        accounts: Mapping[str, AccountSpec] | Sequence[AccountSpec],
        positions: Positions | None = None,
        *,
        prices: Mapping[str, float] | None = None,
        multipliers: Mapping[str, float] | None = None,
        instruments: Sequence[str] = (),
        settings: Settings | None = None,
        calc_config: Any = None,
    ):
        self.settings = settings or (
            Settings.from_config(calc_config) if calc_config is not None else Settings()
        )
        specs = list(accounts.values()) if isinstance(accounts, Mapping) else list(accounts)
        positions = positions or Positions([], [], np.zeros(0))
        self.accounts = [s.account for s in specs]
        self.acc_index = {a: i for i, a in enumerate(self.accounts)}
        if len(self.acc_index) != len(self.accounts):
            raise InputError("accounts: an account appears twice")
        self.specs = specs
        # instruments: the risk parameters' syms, then any others the positions or the caller name
        syms = list(params.syms)
        seen = set(syms)
        for s in [*positions.sym, *instruments]:
            if s not in seen:
                seen.add(s)
                syms.append(s)
        self.syms = syms
        self.sym_index = {s: i for i, s in enumerate(syms)}
        n_inst, n_acc = len(syms), len(specs)
        self.has_params = np.zeros(n_inst, dtype=np.bool_)
        self.has_params[: len(params.syms)] = True

        codes = {"var": M_VAR, "hvar": M_HVAR, "stress": M_STRESS}
        model = np.array([codes.get(s.model, M_EXT) for s in specs], dtype=np.int64)
        max_stress = np.array([s.policy == "max_stress" for s in specs], dtype=np.bool_)
        self.model_code = model
        self._ext_accounts = frozenset(np.flatnonzero(model == M_EXT).tolist())  # accounts on external models
        self.collateral = np.array([s.collateral for s in specs], dtype=np.float64)
        self.external: dict[str, ExternalModel] = {}
        for s in specs:
            if s.model not in BUILTIN_MODELS and s.model not in self.external:
                self.external[s.model] = external_model(s.model, calc_config)
        ext = model == M_EXT
        if (ext & max_stress).any():
            a = self.accounts[int(np.flatnonzero(ext & max_stress)[0])]
            raise InputError(f"account {a!r}: policy max_stress needs a built-in model (var, hvar, stress)")
        if params.scenarios is None and (model == M_HVAR).any():
            raise InputError(
                "model hvar needs a price history (historical scenarios); only a covariance was given"
            )
        if params.cov is None and ((model == M_VAR) | (model == M_STRESS) | max_stress).any():
            raise InputError("models var and stress need a covariance (a price history or a covariance file)")

        price = np.full(n_inst, np.nan)
        for s, p in (prices or {}).items():
            if s in self.sym_index:
                price[self.sym_index[s]] = p
        for s, p in positions.price.items():
            price[self.sym_index[s]] = p
        mult = np.ones(n_inst)
        for s, m in {**(multipliers or {}), **positions.multiplier}.items():
            if s in self.sym_index:
                mult[self.sym_index[s]] = m
        given_mult = {**(multipliers or {}), **positions.multiplier}
        for a, s in zip(positions.account, positions.sym, strict=True):  # an external model's own contracts
            spec = specs[self.acc_index[a]] if a in self.acc_index else None
            info = (
                self._ext_instrument(spec.model, s)
                if spec is not None and spec.model in self.external
                else ()
            )
            if info is None:
                raise InputError(
                    f"positions: account {a!r}: unknown sym {s!r} (not an instrument of model {spec.model!r})"
                )
            if info:
                j = self.sym_index[s]
                price[j] = info[0] if np.isnan(price[j]) else price[j]
                mult[j] = mult[j] if s in given_mult else info[1]
        bad = ~(np.isfinite(mult) & (mult > 0))
        if bad.any():
            raise InputError(f"multiplier for sym {syms[int(np.flatnonzero(bad)[0])]!r} must be > 0")

        self.stress_set: StressSet = build_stress(self.settings.stress, dict(self.settings.sectors), syms)
        pcap = 8
        if positions.account:
            _, counts = np.unique(np.array(positions.account, dtype=object), return_counts=True)
            pcap = max(pcap, int(counts.max()) * 2)
        f_st = (model == M_STRESS) | max_stress
        f_par = (model == M_VAR) | (model == M_STRESS)
        n_sc = 0 if params.scenarios is None else params.scenarios.shape[0]
        k_st = self.stress_set.k if f_st.any() else 0
        z_i = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        z_f = lambda *shape: np.zeros(shape, dtype=np.float64)  # noqa: E731
        z_b = lambda *shape: np.zeros(shape, dtype=np.bool_)  # noqa: E731
        self.st = kernels.State(
            price=price,
            mult=mult,
            inst=z_i(n_acc, pcap),
            nslot=z_i(n_acc),
            qty=z_f(n_acc, pcap),
            xa=z_f(n_acc, pcap),
            nlive=z_i(n_acc),
            hold_acc=z_i(n_inst, 4),
            hold_slot=z_i(n_inst, 4),
            nhold=z_i(n_inst),
            model=model,
            max_stress=max_stress,
            f_hs=model == M_HVAR,
            f_par=f_par,
            f_st=f_st,
            rt=z_f(n_inst, n_sc),
            rmax=z_f(n_inst),
            pnl=z_f(n_acc, n_sc),
            kth=np.full(n_acc, np.nan),
            cov=z_f(n_inst, n_inst),
            par_row=np.where(f_par, np.cumsum(f_par) - 1, -1).astype(np.int64),
            ca=z_f(int(f_par.sum()), pcap, pcap),
            y=z_f(n_acc, pcap),
            v=z_f(n_acc),
            sd=z_f(n_inst),
            shock=np.ascontiguousarray(self.stress_set.shocks[:k_st]),
            fk=z_f(k_st, n_inst),
            cmult=np.ascontiguousarray(self.stress_set.corr_mult[:k_st]),
            g=z_f(n_acc, k_st),
            yk=z_f(k_st, n_acc, pcap),
            vk=z_f(k_st, n_acc),
            fpar=z_f(2),
            w=z_f(1),
            res=z_f(n_acc, kernels.N_RES),
            ires=z_i(n_acc, kernels.N_IRES),
            inst_mark=z_b(n_inst),
            inst_list=z_i(n_inst),
            pair_mark=z_b(n_acc, pcap),
            pair_a=z_i(n_acc * pcap),
            pair_s=z_i(n_acc * pcap),
            npend=z_i(n_acc),
            pend_s=z_i(n_acc, pcap),
            pend_dx=z_f(n_acc, pcap),
            dirty=z_b(n_acc),
            dirty_list=z_i(n_acc),
            counts=z_i(3),
        )
        self._slot: dict[int, int] = {}
        self._set_params(params)
        self._ext_contrib: dict[int, np.ndarray] = {}
        self._queue: dict[str, list[np.ndarray]] = {
            k: [] for k in ("tick_ix", "tick_px", "fill_a", "fill_s", "fill_dq", "new_a", "new_s")
        }
        self._changed = np.ones(n_acc, dtype=np.bool_)  # numbers moved since the last changed_rows
        self._published = np.full((n_acc, 5), np.nan)  # margin, var, es, stress, collateral last published
        self._force = np.zeros(n_acc, dtype=np.bool_)  # publish even if the numbers did not move
        self.last_seq = 0
        self.now = 0  # latest event time seen (ns since the epoch); the clock of the jump alert
        self.events = 0
        self._since_resync = 0
        self.rejects: deque[str] = deque(maxlen=1000)
        self.rejected = 0
        self.alerts = AlertBook(self.settings.alerts)
        self._alert_rows: list[dict[str, Any]] = []
        self._unevaluated: list[
            tuple[str, float, float, int, int]
        ] = []  # published rows the alert rules have not seen
        self.suspects: dict[int, Suspect] = {}  # instrument -> its held suspect ticks
        self.held_ticks = 0  # ticks held as suspect (also counted in `rejected`)
        self.recomputed = 0  # accounts recomputed in full because their incremental result was not finite
        self.withheld = 0  # margin rows withheld because an account's numbers stayed non-finite
        self._rebuild_inst: set[int] = (
            set()
        )  # instruments whose price jumped by an accepted move: rebuild holders

        if len(positions.account):
            a_ix = self._account_ix(positions.account, "positions")
            j_ix = self._sym_ix(positions.sym, "positions")
            self._check_holdable(a_ix, j_ix, "positions")
            slots = self._slots_for(a_ix, j_ix)
            np.add.at(self.st.qty, (a_ix, slots), positions.qty)
        st = self.st
        builtin_held = np.unique(st.inst[(model != M_EXT)[:, None] & (st.qty != 0)])
        nan = builtin_held[~np.isfinite(price[builtin_held])]
        if len(nan):
            raise InputError(
                f"no price for sym {syms[int(nan[0])]!r} (give it in prices or the positions' price column)"
            )
        self.ref_price = (
            price.copy()
        )  # last accepted price per instrument (NaN: none yet, the first tick sets it)
        self.band = np.array([self.settings.band_of(x) for x in syms], dtype=np.float64)
        self._suspect_mask = np.zeros(n_inst, dtype=np.bool_)
        self.full_recompute()

    # ---- construction from config files

    @classmethod
    def from_config(cls, calc: Any, *, param_id: str | None = None) -> MarginEngine:
        """Engine for the [calc] section: history_file, positions_file, accounts_file; the latest
        close of the history is the start price."""
        history = load_prices(calc.history_file)
        accounts = load_accounts(calc.accounts_file, getattr(calc, "default_policy", "model"))
        positions = load_positions(calc.positions_file)
        params = params_from_config(calc, history, param_id=param_id)
        return cls(params, accounts, positions, prices=history.latest, calc_config=calc)

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

    # ---- parameters

    def _set_params(self, params: RiskParams) -> None:
        """Install risk parameters for the engine's instruments (reordered to them; an instrument
        missing from them is refused). A part they lack (a covariance file has no scenarios) keeps
        the engine's current one."""
        st = self.st
        n = int(self.has_params.sum())
        params = params if params.syms == self.syms[:n] else params.select(self.syms[:n])
        n_sc = st.rt.shape[1]
        if params.scenarios is not None and params.scenarios.shape[0] != n_sc:
            raise InputError(f"new scenarios: {params.scenarios.shape[0]} scenarios, the engine has {n_sc}")
        old = getattr(self, "params", None)
        if old is not None:
            params = RiskParams(
                params.syms,
                params.cov if params.cov is not None else old.cov,
                params.scenarios if params.scenarios is not None else old.scenarios,
                params.confidence,
                params.horizon_days,
                params.param_id,
                params.filtered,
            )
        self.params = params
        self.scale = params.scale
        st.rt[:] = 0.0
        if params.scenarios is not None:
            st.rt[:n] = params.scenarios.T
        st.rmax[:] = np.abs(st.rt).max(axis=1) if n_sc else 0.0
        st.cov[:] = 0.0
        if params.cov is not None:
            st.cov[:n, :n] = params.cov
        st.sd[:] = np.sqrt(np.maximum(np.diag(st.cov), 0.0))
        k = st.shock.shape[0]
        st.fk[:] = self.stress_set.vol_mult[:k, None] * st.sd[None, :] * (1.0 + st.shock)
        st.fpar[:] = (params.scale, 1.0 if self.settings.hvar_margin == "es" else 0.0)
        w = tail_weights(params.confidence, max(1, n_sc))
        if len(w) != len(st.w):
            self.st = st._replace(w=w)
        else:
            st.w[:] = w
        self.tail_k = tail_count(params.confidence, max(1, n_sc))

    def set_params(self, params: RiskParams) -> None:
        """A `param` event: new covariance / scenarios (same syms; for a new universe build a new
        engine). Recomputes everything; every account republishes under the new param_id."""
        self.refresh()
        self._set_params(params)
        self.full_recompute()
        self._force[:] = True

    # ---- index helpers

    def _account_ix(self, names: Sequence[str], where: str) -> np.ndarray:
        ix = np.fromiter((self.acc_index.get(a, -1) for a in names), dtype=np.int64, count=len(names))
        if (ix < 0).any():
            raise InputError(f"{where}: unknown account {names[int(np.flatnonzero(ix < 0)[0])]!r}")
        return ix

    def _sym_ix(self, names: Sequence[str], where: str) -> np.ndarray:
        ix = np.fromiter((self.sym_index.get(s, -1) for s in names), dtype=np.int64, count=len(names))
        if (ix < 0).any():
            raise InputError(f"{where}: unknown sym {names[int(np.flatnonzero(ix < 0)[0])]!r}")
        return ix

    def _ext_instrument(self, model: str, sym: str) -> tuple[float, float] | tuple[()] | None:
        """(price, multiplier) of a contract of external model `model` (its `instrument(sym)`), None when
        the model does not know the sym, () when the model takes any sym (no `instrument` method)."""
        look = getattr(self.external[model], "instrument", None)
        return () if look is None else look(sym)

    def _add_instruments(self, syms: Sequence[str], model: str) -> None:
        """New instruments (no risk parameters) first seen in a fill or what-if of an external model's
        account, priced from the model until a tick arrives: every per-instrument array grows."""
        st = self.st
        info = [self._ext_instrument(model, s) or (np.nan, 1.0) for s in syms]
        n = len(self.syms) + len(syms)
        for s in syms:
            self.sym_index[s] = len(self.syms)
            self.syms.append(s)
        self.has_params = _grow(self.has_params, 0, n, False)
        self.stress_set = build_stress(self.settings.stress, dict(self.settings.sectors), self.syms)
        k = st.shock.shape[0]
        price, mult = _grow(st.price, 0, n, np.nan), _grow(st.mult, 0, n, 1.0)
        price[n - len(syms) :], mult[n - len(syms) :] = zip(*info, strict=True)
        self.ref_price = _grow(self.ref_price, 0, n, np.nan)
        self.ref_price[n - len(syms) :] = price[n - len(syms) :]
        self.band = np.concatenate([self.band, [self.settings.band_of(x) for x in syms]])
        self._suspect_mask = _grow(self._suspect_mask, 0, n, False)
        self.st = st._replace(
            price=price,
            mult=mult,
            hold_acc=_grow(st.hold_acc, 0, n),
            hold_slot=_grow(st.hold_slot, 0, n),
            nhold=_grow(st.nhold, 0, n),
            rt=_grow(st.rt, 0, n),
            rmax=_grow(st.rmax, 0, n),
            cov=_grow(_grow(st.cov, 0, n), 1, n),
            sd=_grow(st.sd, 0, n),
            shock=np.ascontiguousarray(self.stress_set.shocks[:k]),
            fk=_grow(st.fk, 1, n),
            inst_mark=_grow(st.inst_mark, 0, n, False),
            inst_list=_grow(st.inst_list, 0, n),
        )

    def _check_holdable(self, a_ix: np.ndarray, j_ix: np.ndarray, where: str) -> None:
        bad = (self.model_code[a_ix] != M_EXT) & ~self.has_params[j_ix]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                f"{where}: unknown sym {self.syms[j_ix[i]]!r}: no price history or covariance for it "
                f"(account {self.accounts[a_ix[i]]!r} uses model {self.specs[a_ix[i]].model!r})"
            )

    def _slots_for(self, a_ix: Sequence[int], j_ix: Sequence[int]) -> np.ndarray:
        """Slot of each (account, instrument), opening new slots (and holder entries) as needed;
        new slots are queued for initialisation by the next kernel step."""
        n_acc = len(self.accounts)
        keys = [j * n_acc + a for a, j in zip(a_ix, j_ix, strict=True)]
        get = self._slot.get
        slots = [get(k, -1) for k in keys]
        if -1 in slots:
            new_a, new_s = [], []
            for i, k in enumerate(keys):
                if slots[i] >= 0:
                    continue
                s = self._slot.get(k, -1)
                if s < 0:
                    s = self._open_slot(int(a_ix[i]), int(j_ix[i]))
                    new_a.append(int(a_ix[i]))
                    new_s.append(s)
                slots[i] = s
            self._queue["new_a"].append(np.array(new_a, dtype=np.int64))
            self._queue["new_s"].append(np.array(new_s, dtype=np.int64))
        return np.array(slots, dtype=np.int64)

    def _open_slot(self, a: int, j: int) -> int:
        st = self.st
        s = int(st.nslot[a])
        if s == st.inst.shape[1]:
            self._grow_slots(2 * s)
            st = self.st
        h = int(st.nhold[j])
        if h == st.hold_acc.shape[1]:
            self.st = st = st._replace(
                hold_acc=_grow(st.hold_acc, 1, 2 * h), hold_slot=_grow(st.hold_slot, 1, 2 * h)
            )
        st.inst[a, s] = j
        st.nslot[a] = s + 1
        st.hold_acc[j, h] = a
        st.hold_slot[j, h] = s
        st.nhold[j] = h + 1
        self._slot[j * len(self.accounts) + a] = s
        return s

    def _grow_slots(self, new: int) -> None:
        st = self.st
        n_acc = len(self.accounts)
        pair_a, pair_s = np.zeros(n_acc * new, np.int64), np.zeros(n_acc * new, np.int64)
        pair_a[: len(st.pair_a)], pair_s[: len(st.pair_s)] = st.pair_a, st.pair_s
        self.st = st._replace(
            inst=_grow(st.inst, 1, new),
            qty=_grow(st.qty, 1, new),
            xa=_grow(st.xa, 1, new),
            y=_grow(st.y, 1, new),
            ca=_grow(_grow(st.ca, 1, new), 2, new),
            yk=_grow(st.yk, 2, new),
            pair_mark=_grow(st.pair_mark, 1, new),
            pair_a=pair_a,
            pair_s=pair_s,
            pend_s=_grow(st.pend_s, 1, new),
            pend_dx=_grow(st.pend_dx, 1, new),
        )

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

    def apply_prices(
        self, sym: Sequence[str], price: np.ndarray, seq: np.ndarray, time: np.ndarray | None = None
    ) -> int:
        """New market prices (trade prices or quote mids), rows in seq order. A sym the engine does
        not know is ignored (market data for instruments nobody holds); a price that is not a finite
        number > 0 is rejected; one outside the instrument's acceptance band is held as suspect (see
        the module docstring). Returns the rows applied."""
        price = np.asarray(price, dtype=np.float64)
        seq = np.asarray(seq, dtype=np.int64)
        get = self.sym_index.get
        ix = np.fromiter((get(s, -1) for s in sym), dtype=np.int64, count=len(sym))
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
        if len(ix):
            keep = self._band_check(ix, price, tick_seq)
            if keep is not None:
                ix, price = ix[keep], price[keep]
        self._queue["tick_ix"].append(ix)
        self._queue["tick_px"].append(price)
        self._clock(seq, time)
        return len(ix)

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
        ext_ok = self._admit_external(a_l, j_l, sym) if not self._ext_accounts.isdisjoint(a_l) else None
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
                why = f"no risk parameters for sym {sym[i]!r} (account {account[i]!r} model {self.specs[a].model})"
            else:
                keep.append(i)
                dq.append(sign * q)
                if not math.isfinite(known_px[j]) and 0.0 < px[i] < math.inf:
                    # first sight of an instrument: its fill price is the best price there is
                    known_px[j] = px[i]
                    self.ref_price[j] = px[i]
                    self._queue["tick_ix"].append(np.array([j], dtype=np.int64))
                    self._queue["tick_px"].append(np.array([px[i]]))
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

    def _admit_external(self, a_l: list[int], j_l: list[int], sym: Sequence[str]) -> list[bool]:
        """Rows of external-model accounts: False where the model does not know the sym; a sym it knows
        that the engine does not yet is added as an instrument (j_l updated in place)."""
        ok = [True] * len(a_l)
        rows = [i for i, a in enumerate(a_l) if a >= 0 and self.model_code[a] == M_EXT]
        new: dict[str, dict[str, None]] = {}
        for i in rows:
            model = self.specs[a_l[i]].model
            if self._ext_instrument(model, sym[i]) is None:
                ok[i] = False
            elif j_l[i] < 0:
                new.setdefault(model, {})[sym[i]] = None
        for model, syms in new.items():
            self._add_instruments([s for s in syms if s not in self.sym_index], model)
        if new:
            for i in rows:
                j_l[i] = self.sym_index.get(sym[i], -1)
        return ok

    # ---- the acceptance band

    def _band_check(self, ix: np.ndarray, price: np.ndarray, seq: np.ndarray) -> np.ndarray | None:
        """None when every tick is inside its instrument's band, measured from the tick before it (the
        common case: one pass of kernels.band_scan, which moves the references); else the mask of the
        ticks to apply, the ticks from the first one outside decided one by one (_band_walk)."""
        k = kernels.band_scan(ix, price, self.ref_price, self.band, self._suspect_mask)
        if k == len(ix):
            return None
        keep = np.ones(len(ix), dtype=np.bool_)
        keep[k:] = self._band_walk(ix[k:], price[k:], seq[k:])
        return keep

    def _band_walk(self, ix: np.ndarray, price: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """The band tick by tick: inside (from the last accepted price) -> accepted, ending any suspicion;
        outside -> held as suspect, or, as the confirm_ticks-th consecutive tick agreeing with the first
        suspect price (within the band of it), accepted as the new level."""
        keep = np.ones(len(ix), dtype=np.bool_)
        need = self.settings.confirm_ticks
        for i, (j, p, q) in enumerate(zip(ix.tolist(), price.tolist(), seq.tolist(), strict=True)):
            r, b = float(self.ref_price[j]), float(self.band[j])
            sus = self.suspects.get(j)
            if not abs(p - r) > b * r:  # inside the band (or no reference yet)
                self.ref_price[j] = p
                if sus is not None:
                    self._end_suspicion(j, p, q, f"back inside the band at {p:,.6g}")
                continue
            if sus is not None and abs(p - sus.first) <= b * sus.first:
                sus.count += 1
                sus.last = p
            else:  # a first suspect tick, or one disagreeing with the held level: a new suspect level
                if sus is None:
                    self._data_alert(
                        j,
                        "raised",
                        p,
                        q,
                        self._band_text(j, p, r, b) + f": held as suspect (confirm: "
                        f"{need} agreeing ticks or `marginflow prices accept {self.syms[j]}`)",
                    )
                sus = self.suspects[j] = Suspect(p, p, 1, r)
                self._suspect_mask[j] = True
            if sus.count >= need:
                self._accept(j, p, q, f"confirmed by {need} consecutive agreeing ticks", queue=False)
                continue
            keep[i] = False
            self.held_ticks += 1
            self._reject(
                "price", q, self._band_text(j, p, r, b) + f": held as suspect ({sus.count} of {need})"
            )
        return keep

    def _band_text(self, j: int, p: float, r: float, b: float) -> str:
        return (
            f"{self.syms[j]} price {p:,.6g} moved {p / r - 1:+.1%} from the last accepted {r:,.6g}, "
            f"outside the {b:.0%} band"
        )

    def _data_alert(self, j: int, state: str, value: float, seq: int, text: str) -> None:
        self._alert_rows.append(
            {
                "account": ALL_ACCOUNTS,
                "rule": f"{BAND_RULE}:{self.syms[j]}",
                "kind": DATA_KIND,
                "state": state,
                "value": float(value),
                "threshold": float(self.band[j]) if math.isfinite(self.band[j]) else 0.0,
                "message": text,
                "last_seq": int(seq),
            }
        )

    def _end_suspicion(self, j: int, p: float, seq: int, how: str) -> None:
        sus = self.suspects.pop(j)
        self._suspect_mask[j] = False
        self._data_alert(
            j,
            "cleared",
            p,
            seq,
            f"{self.syms[j]}: suspect price {sus.last:,.6g} (from "
            f"{sus.reference:,.6g}) {how}; price in force {p:,.6g}",
        )

    def _accept(self, j: int, p: float, seq: int, how: str, queue: bool) -> None:
        """Price p becomes instrument j's accepted price (a jump): the holders' risk state is rebuilt
        after the step that applies it (no residue of a large rank-one update)."""
        self.ref_price[j] = p
        if j in self.suspects:
            self._end_suspicion(j, p, seq, how)
        self._rebuild_inst.add(j)
        if queue:
            self._queue["tick_ix"].append(np.array([j], dtype=np.int64))
            self._queue["tick_px"].append(np.array([p]))

    def accept_price(self, sym: str, price: float | None = None) -> str:
        """An operator's `price_accept` param event: the held suspect price of `sym` (or `price`) becomes
        its accepted price and market price; its data alert is cleared. Returns what happened."""
        j = self.sym_index.get(sym)
        if j is None:
            raise InputError(f"price_accept: unknown sym {sym!r}")
        sus = self.suspects.get(j)
        if price is None:
            if sus is None:
                return f"{sym}: no suspect price held, nothing to accept"
            price = sus.last
        if not (isinstance(price, float | int) and math.isfinite(price) and 0 < price):
            raise InputError(f"price_accept: price for {sym!r} must be a finite number > 0, got {price!r}")
        self._accept(j, float(price), self.last_seq, "accepted by an operator (prices accept)", queue=True)
        return f"{sym}: price {price:,.6g} accepted as the reference and market price"

    def set_collateral(self, account: str, collateral: float) -> None:
        a = self._account_ix([account], "collateral")[0]
        if not (math.isfinite(collateral) and collateral > 0):
            raise InputError(f"collateral for {account!r} must be a finite number > 0, got {collateral!r}")
        self.collateral[a] = collateral
        self._changed[a] = True

    # ---- computing

    def _take_queue(self) -> list[np.ndarray]:
        out = []
        for name, parts in self._queue.items():
            empty = _F0 if name in ("tick_px", "fill_dq") else _I0
            out.append(parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else empty)
            parts.clear()
        return out

    def _step(self, all_dirty: bool = False) -> np.ndarray:
        if not all_dirty and not any(self._queue.values()):
            return _I0  # nothing queued: no kernel call
        n = kernels.step(self.st, *self._take_queue(), all_dirty)
        acc = self.st.dirty_list[:n].copy()
        if self._ext_accounts:
            for a in [a for a in acc.tolist() if a in self._ext_accounts]:
                self._store_external(a, self._evaluate_external(a))
        self._changed[acc] = True
        if self._rebuild_inst:  # accepted jumps: their holders' state rebuilt from scratch
            st = self.st
            held = [st.hold_acc[j, : st.nhold[j]] for j in sorted(self._rebuild_inst)]
            self._rebuild_inst.clear()
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
        full recompute's dense products (_rebuild_state), then their numbers (one kernel step, no events)."""
        if not len(acc):
            return
        st = self.st
        self._rebuild_state(acc)
        own = acc[self.model_code[acc] != M_EXT]
        st.dirty[own] = True
        st.dirty_list[: len(own)] = own
        st.counts[N_DIRTY] = len(own)
        kernels.step(self.st, _I0, _F0, _I0, _I0, _F0, _I0, _I0, False)
        for a in acc[self.model_code[acc] == M_EXT].tolist():
            self._store_external(a, self._evaluate_external(a, full=True))
        self._changed[acc] = True

    def _store_external(self, a: int, r: Any) -> None:
        self.st.res[a, [R_VAR, R_ES, R_MARGIN]] = (max(r.var, 0.0), max(r.es, 0.0), max(r.var, 0.0))
        self._ext_contrib[a] = np.asarray(r.contrib, dtype=np.float64)

    def refresh(self) -> np.ndarray:
        """Run the queued events through the kernels: the risk state of every touched position is
        brought up to date and the numbers of the accounts that moved are recomputed; returns them."""
        if self.settings.resync_events and self._since_resync >= self.settings.resync_events:
            return self.full_recompute()
        return self._step()

    def _evaluate_external(self, a: int, full: bool = False):
        """Account a under its external model: `evaluate_account(account, ...)` when the model keeps
        per-account state (e.g. SPAN's book, updated incrementally), else (or for the `full`
        reference path) the stateless `evaluate(...)` on the account's positions."""
        st = self.st
        n = int(st.nslot[a])
        inst = st.inst[a, :n]
        model = self.external[self.specs[a].model]
        args = (
            [self.syms[j] for j in inst],
            st.qty[a, :n].copy(),
            st.price[inst].copy(),
            st.mult[inst].copy(),
        )
        per_account = None if full else getattr(model, "evaluate_account", None)
        return per_account(self.accounts[a], *args) if per_account is not None else model.evaluate(*args)

    def update_external(self, model: str, update: Callable[[ExternalModel], Any]) -> np.ndarray:
        """A parameter event for external model `model` (e.g. a new SPAN file): brings its accounts up to
        date, calls `update(model object)` (an exception propagates and leaves the engine as it was),
        then re-evaluates those accounts; they republish under the model's `param_id`. Returns them."""
        if model not in self.external:
            return _I0
        self.refresh()
        update(self.external[model])
        acc = np.array([a for a, s in enumerate(self.specs) if s.model == model], dtype=np.int64)
        for a in acc.tolist():
            self._store_external(a, self._evaluate_external(a))
        self._changed[acc] = True
        self._force[acc] = True
        return acc

    def full_recompute(self) -> np.ndarray:
        """Rebuild every account's risk state from positions and prices with dense numpy products
        (the reference for the incremental kernels; also run on a parameter change and every
        resync_events events), then recompute all numbers. Returns all account indices."""
        self._step()  # apply queued events (their incremental work is redone below)
        self._rebuild_state(None)
        self._since_resync = 0
        return self._step(all_dirty=True)

    def _rebuild_state(self, acc: np.ndarray | None) -> None:
        """The risk state of accounts `acc` (None: all) from positions and prices with dense numpy
        products, never from the incremental state; their numbers are recomputed by the next step."""
        st = self.st
        every = acc is None
        acc = np.arange(len(self.accounts)) if acc is None else acc
        x = self._dense_exposure(None if every else acc)
        xa = st.qty[acc] * (st.price * st.mult)[st.inst[acc]]
        xa[np.arange(st.inst.shape[1])[None, :] >= st.nslot[acc][:, None]] = 0.0
        st.xa[acc] = xa
        st.nlive[acc] = (xa != 0).sum(axis=1)
        st.npend[acc] = 0
        f_hs, f_par, f_st = st.f_hs[acc], st.f_par[acc], st.f_st[acc]
        if f_hs.any():
            st.pnl[acc[f_hs]] = x[f_hs] @ st.rt
        st.kth[acc] = np.nan  # select from scratch
        if f_par.any():
            if every:
                kernels.fill_ca(st)
            else:
                for a in acc[f_par].tolist():
                    n, inst = int(st.nslot[a]), st.inst[a, : st.nslot[a]]
                    st.ca[st.par_row[a], :n, :n] = st.cov[np.ix_(inst, inst)]
            xp = x[f_par]
            yd = xp @ st.cov
            st.y[acc[f_par]] = np.take_along_axis(yd, st.inst[acc[f_par]], axis=1)
            st.v[acc[f_par]] = np.einsum("an,an->a", xp, yd)
        if f_st.any() and st.shock.shape[0]:
            xs = x[f_st]
            st.g[acc[f_st]] = xs @ st.shock.T
            for k in range(st.shock.shape[0]):
                yd = xs @ stressed_cov(
                    st.cov, st.shock[k], float(st.cmult[k]), float(self.stress_set.vol_mult[k])
                )
                st.yk[k][acc[f_st]] = np.take_along_axis(yd, st.inst[acc[f_st]], axis=1)
                st.vk[k][acc[f_st]] = np.einsum("an,an->a", xs, yd)

    def _dense_exposure(self, acc: np.ndarray | None = None) -> np.ndarray:
        """(accounts, N) exposures qty * price * multiplier of accounts `acc` (None: all)."""
        st = self.st
        acc = np.arange(len(self.accounts)) if acc is None else acc
        x = np.zeros((len(acc), len(self.syms)))
        live = np.arange(st.inst.shape[1])[None, :] < st.nslot[acc][:, None]
        r_ix, s_ix = np.nonzero(live)
        a_ix = acc[r_ix]
        j = st.inst[a_ix, s_ix]
        x[r_ix, j] = st.qty[a_ix, s_ix] * (st.price[j] * st.mult[j])
        return x

    def compute_full(self) -> dict[str, np.ndarray]:
        """The reference numbers from scratch with the numpy models (calc/models.py), after applying
        queued events: margin, var, es, stress per account and contrib (A, N) of the margin's
        drivers. Reads the positions and prices only, never the incremental risk state."""
        self.refresh()
        st = self.st
        x = self._dense_exposure()
        n_acc = len(self.accounts)
        z = np.zeros(n_acc)
        zc = np.zeros_like(x)
        par = parametric(x, st.cov, self.scale) if st.f_par.any() else None
        hs = (
            historical(x, st.rt.T, self.params.confidence, self.settings.hvar_margin)
            if st.f_hs.any()
            else None
        )
        k = st.shock.shape[0]
        ss = StressSet(self.stress_set.names[:k], st.shock, st.cmult, self.stress_set.vol_mult[:k])
        sr = stress(x, st.cov, ss, self.scale) if st.f_st.any() else None
        code = self.model_code
        par_var = par.var if par else z
        var = np.where(code == M_HVAR, hs.var if hs else z, np.where(code == M_EXT, z, par_var))
        es = np.where(code == M_HVAR, hs.es if hs else z, z)
        hs_num = (hs.es if self.settings.hvar_margin == "es" else hs.var) if hs else z
        st_num = np.where(st.f_st, sr.var, 0.0) if sr else z
        conds = [code == M_VAR, code == M_HVAR, code == M_STRESS]
        number = np.select(conds, [par_var, hs_num, st_num], 0.0)
        contrib = np.select(
            [c[:, None] for c in conds],
            [par.contrib if par else zc, hs.contrib if hs else zc, sr.contrib if sr else zc],
            zc,
        )
        for a in np.flatnonzero(code == M_EXT):
            r = self._evaluate_external(int(a), full=True)
            var[a], number[a] = r.var, r.var
            contrib[a, st.inst[a, : st.nslot[a]]] = r.contrib
        wins = st.max_stress & (st_num > number)
        number = np.where(wins, st_num, number)
        if sr is not None:
            contrib[wins] = sr.contrib[wins]
        return {
            "margin": np.maximum(number, 0.0),
            "var": np.maximum(var, 0.0),
            "es": np.maximum(es, 0.0),
            "stress": st_num,
            "contrib": contrib,
            "exposure": x,
        }

    # ---- publishing

    def _contrib(self, acc: np.ndarray) -> np.ndarray:
        """(len(acc), P) per-slot contributions to each account's margin number."""
        st = self.st
        out = np.zeros((len(acc), st.inst.shape[1]))
        kernels.contributions(st, acc, out)
        for i in np.flatnonzero(st.ires[acc, I_KIND] == K_EXT).tolist():
            c = self._ext_contrib.get(int(acc[i]), _F0)
            out[i, : len(c)] = c
        return out

    def _drivers_json(self, acc: np.ndarray) -> list[str]:
        """Top drivers of each account's margin as JSON: the top_drivers positions by |contribution|
        (ties by slot), then `*other*` summing the rest, so the list adds up to the margin. One
        kernel call for the built-in models (kernels.drivers); external models' contributions are
        ranked by the same kernels.top_slots."""
        k, top_n, st = len(acc), self.settings.top_drivers, self.st
        if not k:
            return []
        j_top, cnt = np.zeros((k, top_n), np.int64), np.zeros((k, 2), np.int64)
        c_top, x_top, rest = np.zeros((k, top_n)), np.zeros((k, top_n)), np.zeros((k, 2))
        kernels.drivers(st, acc, j_top, c_top, x_top, cnt, rest)
        acc_l, cnt_l = acc.tolist(), cnt.tolist()
        for i in [i for i, (m, _) in enumerate(cnt_l) if m < 0]:  # external models
            a = acc_l[i]
            n = int(st.nslot[a])
            c = np.zeros(n)
            own = self._ext_contrib.get(a, _F0)[:n]
            c[: len(own)] = own
            kernels.top_slots(c, st.xa[a, :n], n, j_top[i], c_top[i], x_top[i], cnt[i], rest[i])
            j_top[i, : cnt[i, 0]] = st.inst[a, j_top[i, : cnt[i, 0]]]
            cnt_l[i] = cnt[i].tolist()
        syms, margin = self.syms, st.res[acc, R_MARGIN].tolist()
        out = []
        for i, ((m, held), j_i, c_i, x_i, (rc, rx)) in enumerate(
            zip(cnt_l, j_top.tolist(), c_top.tolist(), x_top.tolist(), rest.tolist(), strict=True)
        ):
            if margin[i] <= 0:
                out.append("[]")
                continue
            d = [
                {"sym": syms[j], "exposure": x, "contribution": c}
                for j, x, c in zip(j_i[:m], x_i[:m], c_i[:m], strict=True)
            ]
            if held > m:
                d.append({"sym": OTHER, "exposure": rx, "contribution": rc})
            out.append(_json.encode(d).decode())
        return out

    def drivers(self, a: int) -> list[dict[str, Any]]:
        """Top drivers of account a's margin as a list of {sym, exposure, contribution}."""
        return msgspec.json.decode(self._drivers_json(np.array([a], dtype=np.int64))[0])

    def _rows(self, acc: np.ndarray, change: list[float], drivers: bool = True) -> dict[str, list]:
        acc_l = acc.tolist()
        res = self.st.res[acc].tolist()
        collateral = self.collateral[acc].tolist()
        models = [self.specs[a].model for a in acc_l]
        ext = self.external
        pid = {
            m: getattr(ext[m], "param_id", self.param_id) if m in ext else self.param_id for m in set(models)
        }
        values: dict[str, list] = {
            "account": [self.accounts[a] for a in acc_l],
            "model": models,
            "margin": [r[R_MARGIN] for r in res],
            "var": [r[R_VAR] for r in res],
            "es": [r[R_ES] for r in res],
            "stress": [max(r[R_STRESS], 0.0) for r in res],
            "collateral": collateral,
            "utilisation": [r[R_MARGIN] / c for r, c in zip(res, collateral, strict=True)],
            "change": change,
            "drivers": self._drivers_json(acc) if drivers else ["[]"] * len(acc_l),
            "last_seq": [self.last_seq] * len(acc_l),
            "param_id": [pid[m] for m in models],
        }
        if list(values) != MARGIN_COLUMNS:
            raise AssertionError(
                f"engine's margin columns {list(values)} are not the table's {MARGIN_COLUMNS}"
            )
        return values

    def snapshot(self) -> dict[str, list]:
        """Current margin rows for all accounts (change = since the last published row), without
        marking anything published."""
        self.refresh()
        acc = self._finite(np.arange(len(self.accounts)))
        prev = np.nan_to_num(self._published[acc, 0], nan=0.0)
        return self._rows(acc, (self.margin[acc] - prev).tolist())

    def changed_rows(self, now: int | None = None, drivers: bool = True) -> dict[str, list]:
        """One margin row per account whose margin, VaR, ES, stress or collateral differs from its
        last published row (every account on the first call and after new parameters); marks them
        published; `take_alerts` evaluates the alert rules on them. `now` (ns) overrides the event clock
        for the jump rule; drivers=False leaves the drivers column "[]" (for callers that keep only the
        numbers, like the backtest)."""
        self.refresh()
        if now is not None:
            self.now = max(self.now, int(now))
        cand = np.flatnonzero(self._changed)
        self._changed[cand] = False
        moved, now_pub, change = [], [], []
        # per account in Python: a handful of changed accounts is the usual publish
        for a, r, prev, forced, coll in zip(
            cand.tolist(),
            self.st.res[cand].tolist(),
            self._published[cand].tolist(),
            self._force[cand].tolist(),
            self.collateral[cand].tolist(),
            strict=True,
        ):
            cur = [r[R_MARGIN], r[R_VAR], r[R_ES], max(r[R_STRESS], 0.0), coll]
            if not all(map(math.isfinite, cur)):  # still not finite after a full recompute: never published
                self._withhold(a, cur)
                continue
            if cur != prev or forced:  # never published: prev holds NaNs, unequal to anything
                moved.append(a)
                now_pub.append(cur)
                change.append(cur[0] - prev[0] if prev[0] == prev[0] else cur[0])
        self._force[cand] = False
        acc = np.array(moved, dtype=np.int64)
        if moved:
            self._published[acc] = now_pub
        rows = self._rows(acc, change, drivers)
        if self.alerts.rules:
            self._evaluate_alerts()  # rows of an earlier call nobody took alerts for: in order, before these
            self._unevaluated = [
                (self.accounts[a], cur[0], cur[4], self.now, self.last_seq)
                for a, cur in zip(moved, now_pub, strict=True)
            ]
        return rows

    def _withhold(self, a: int, cur: list[float]) -> None:
        self.withheld += 1
        why = f"account {self.accounts[a]!r}: margin {cur[0]!r}, var {cur[1]!r}, es {cur[2]!r}, stress {cur[3]!r}"
        self._reject("margin", self.last_seq, f"{why}: not finite after a full recompute; row withheld")
        log.error("%s: not finite after a full recompute; row withheld", why)

    def _finite(self, acc: np.ndarray) -> np.ndarray:
        """The accounts of `acc` whose margin numbers are all finite (the others are never published)."""
        ok = np.isfinite(self.st.res[acc][:, [R_MARGIN, R_VAR, R_ES, R_STRESS]]).all(axis=1)
        return acc if ok.all() else acc[ok]

    def _evaluate_alerts(self) -> None:
        for account, margin, collateral, now, seq in self._unevaluated:
            self._alert_rows += self.alerts.evaluate(account, margin, collateral, now, seq)
        self._unevaluated = []

    def has_alerts(self) -> bool:
        """Alert rows wait for take_alerts (data alerts come with no margin row)."""
        return bool(self._alert_rows or self._unevaluated)

    def take_alerts(self) -> dict[str, list]:
        """Alert rows raised or cleared by the rows published since the last call, as columns of the
        alert table. The rules run here, not in changed_rows, so calc can send the margin rows first."""
        self._evaluate_alerts()
        rows, self._alert_rows = self._alert_rows, []
        return {c: [r[c] for r in rows] for c in ALERT_COLUMNS}

    # ---- what-if

    def what_if(self, account: str, trades: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Margin of `account` before and after hypothetical trades ({"sym", "qty"} with qty signed,
        or {"sym", "side": "B"/"S", "qty" > 0}), without touching the engine's state: "before"
        includes events queued since the last refresh."""
        if account not in self.acc_index:
            raise InputError(f"what_if: unknown account {account!r}")
        a = self.acc_index[account]
        ix, dqs = [], []
        for i, t in enumerate(trades):
            s = t.get("sym")
            if self.model_code[a] == M_EXT and isinstance(s, str):
                known = self._ext_instrument(self.specs[a].model, s)
                if known is None:
                    raise InputError(
                        f"what_if: trade {i}: unknown sym {s!r} (not an instrument of model "
                        f"{self.specs[a].model!r})"
                    )
                if known and s not in self.sym_index:
                    self._add_instruments([s], self.specs[a].model)
            if s not in self.sym_index:
                raise InputError(f"what_if: trade {i}: unknown sym {s!r}")
            try:
                q = float(t.get("qty"))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InputError(f"what_if: trade {i}: qty {t.get('qty')!r} is not a number") from None
            side = t.get("side")
            if side is not None:
                if side not in ("B", "S") or not q > 0:
                    raise InputError(f"what_if: trade {i}: side must be B or S with qty > 0")
                q = q if side == "B" else -q
            if not math.isfinite(q):
                raise InputError(f"what_if: trade {i}: qty must be finite")
            j = self.sym_index[s]
            if self.model_code[a] != M_EXT and not self.has_params[j]:
                raise InputError(f"what_if: trade {i}: no risk parameters for sym {s!r}")
            ix.append(j)
            dqs.append(q)
        st = self.st
        # the account's view of queued events: prices (last one wins), its own fills and new slots
        q = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in self._queue.items()}
        price = st.price.copy()
        if len(q["tick_ix"]):
            last = len(q["tick_ix"]) - 1 - np.unique(q["tick_ix"][::-1], return_index=True)[1]
            price[q["tick_ix"][last].astype(np.int64)] = q["tick_px"][last]
        for i, j in enumerate(ix):
            if not math.isfinite(price[j]):
                raise InputError(f"what_if: trade {i}: no price for sym {self.syms[j]!r}")
        n = int(st.nslot[a])
        n_old = n - int((q["new_a"] == a).sum())
        inst = st.inst[a, :n].tolist()
        slot_of = {j: s for s, j in enumerate(inst)}
        for j in ix:
            if j not in slot_of:
                slot_of[j] = len(inst)
                inst.append(j)
        p = len(inst)
        qty = np.zeros(p)
        qty[:n] = st.qty[a, :n]
        mine = q["fill_a"] == a
        np.add.at(qty, q["fill_s"][mine].astype(np.int64), q["fill_dq"][mine])
        pad = lambda x: np.concatenate([x, np.zeros(p - n, dtype=x.dtype)])[None, :]  # noqa: E731
        one = slice(a, a + 1)
        z_i = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        ca = np.zeros((1, p, p))  # the account's slots so far; the kernel fills new slots' rows
        if st.par_row[a] >= 0:
            ca[0, :n, :n] = st.ca[st.par_row[a], :n, :n]
        scratch = st._replace(
            price=price,
            inst=np.array([inst], dtype=np.int64),
            nslot=np.array([p], np.int64),
            qty=qty[None, :],
            xa=pad(st.xa[a, :n]),
            nlive=st.nlive[one].copy(),
            hold_acc=z_i(1, 1),
            hold_slot=z_i(1, 1),
            nhold=z_i(1),
            model=st.model[one].copy(),
            max_stress=st.max_stress[one].copy(),
            f_hs=st.f_hs[one].copy(),
            f_par=st.f_par[one].copy(),
            f_st=st.f_st[one].copy(),
            pnl=st.pnl[one].copy(),
            kth=st.kth[one].copy(),
            par_row=np.zeros(1, np.int64),
            ca=ca,
            y=pad(st.y[a, :n]),
            v=st.v[one].copy(),
            g=st.g[one].copy(),
            yk=np.ascontiguousarray(
                np.concatenate([st.yk[:, one, :n], np.zeros((st.yk.shape[0], 1, p - n))], axis=2)
            ),
            vk=st.vk[:, one].copy(),
            res=st.res[one].copy(),
            ires=st.ires[one].copy(),
            inst_mark=np.zeros(1, np.bool_),
            inst_list=z_i(1),
            pair_mark=np.zeros((1, p), np.bool_),
            pair_a=z_i(p),
            pair_s=z_i(p),
            npend=z_i(1),
            pend_s=z_i(1, p),
            pend_dx=np.zeros((1, p)),
            dirty=np.zeros(1, np.bool_),
            dirty_list=z_i(1),
            counts=z_i(3),
        )
        res, ires, contrib = np.zeros((2, kernels.N_RES)), z_i(2, kernels.N_IRES), np.zeros((2, p))
        slots = np.array([slot_of[j] for j in ix], dtype=np.int64)
        qty_before = qty.copy()
        x_before = qty_before * (price * st.mult)[inst]
        kernels.what_if(scratch, n_old, slots, np.array(dqs, dtype=np.float64), res, ires, contrib)
        syms = [self.syms[j] for j in inst]
        out: dict[str, Any] = {"account": account, "model": self.specs[a].model}
        for r, when in enumerate(("before", "after")):
            x = scratch.xa[0] if r == 1 else x_before
            if self.model_code[a] == M_EXT:
                e = self.external[self.specs[a].model].evaluate(
                    syms,
                    qty_before if r == 0 else scratch.qty[0].copy(),
                    price[inst].copy(),
                    st.mult[inst].copy(),
                )
                res[r, [R_VAR, R_ES, R_MARGIN]] = (max(e.var, 0.0), max(e.es, 0.0), max(e.var, 0.0))
                contrib[r, : len(e.contrib)] = e.contrib
            margin = float(res[r, R_MARGIN])
            out[f"margin_{when}"] = margin
            out[f"var_{when}"] = float(res[r, R_VAR])
            out[f"es_{when}"] = float(res[r, R_ES])
            out[f"stress_{when}"] = max(float(res[r, R_STRESS]), 0.0)
            out[f"drivers_{when}"] = (
                top_drivers(syms, x, contrib[r], self.settings.top_drivers) if margin > 0 else []
            )
        out["change"] = out["margin_after"] - out["margin_before"]
        out["collateral"] = float(self.collateral[a])
        out["utilisation_after"] = out["margin_after"] / float(self.collateral[a])
        out["drivers"] = out["drivers_after"]
        return out


def warm_up() -> float:
    """Compile (or load from numba's cache) every kernel on a tiny engine; returns seconds taken."""
    import time

    t0 = time.perf_counter()
    syms = ["A", "B", "C"]
    rng = np.random.default_rng(0)
    r = rng.normal(0, 0.01, (40, 3))
    params = RiskParams(syms, np.cov(r.T), np.expm1(r), 0.99, 1, "warm-up")
    specs = [AccountSpec("v", "var", 1e6), AccountSpec("h", "hvar", 1e6), AccountSpec("s", "stress", 1e6)]
    pos = Positions(["v", "h", "s"], ["A", "B", "C"], np.array([10.0, -5.0, 3.0]))
    eng = MarginEngine(
        params,
        specs,
        pos,
        prices={"A": 10.0, "B": 20.0, "C": 30.0},
        settings=Settings(stress=({"name": "x", "default_shock": -0.1},)),
    )
    eng.apply_fills(
        ["v", "h"], ["B", "C"], ["B", "S"], np.array([1.0, 2.0]), np.array([20.0, 30.0]), np.array([1, 2])
    )
    eng.apply_prices(["A", "C"], np.array([11.0, 29.0]), np.array([3, 4]))
    readonly = np.array([11.5])
    readonly.flags.writeable = False  # prices straight from Arrow buffers are read-only: that variant too
    eng.apply_prices(["A"], readonly, np.array([6]))
    eng.changed_rows()
    eng.what_if("s", [{"sym": "A", "qty": 1.0}])
    i1, f1 = np.zeros(1, np.int64), np.zeros(1)  # drivers of an external model's account: called directly
    kernels.top_slots(np.ones(1), np.ones(1), 1, i1, f1, f1.copy(), np.zeros(2, np.int64), np.zeros(2))
    return time.perf_counter() - t0
