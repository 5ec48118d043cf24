"""The streaming margin engine: per-account positions and risk state in numpy arrays, updated
incrementally by fills and ticks (calc/kernels.py), read out as `margin` and `alert` rows.

    eng = MarginEngine.from_config(config.load().calc)        # or MarginEngine(params, accounts, positions, ...)
    eng.apply_fills(account, sym, side, qty, price, seq, time)  # a batch of fill rows, in seq order
    eng.apply_prices(sym, price, seq, time)                    # a batch of trade prices / quote mids
    rows = eng.changed_rows()      # {column: [values]}: one margin row per account whose numbers moved
    alerts = eng.take_alerts()     # {column: [values]}: alert rows raised / cleared by those rows
    eng.what_if("acct", [{"sym": "AAPL", "qty": -500}])        # margin before/after, state untouched
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from calc import kernels
from calc.alerts import AlertBook, AlertRule
from calc.history import InputError, load_prices, read_table
from calc.models import (
    BUILTIN_MODELS,
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
    tail_count,
    tail_weights,
    top_drivers,
)
from schemas.tables import TABLES

MARGIN_COLUMNS = [c.name for c in TABLES["margin"].input_columns]
ALERT_COLUMNS = [c.name for c in TABLES["alert"].input_columns]
M_VAR, M_HVAR, M_STRESS, M_EXT = 0, 1, 2, 3  # model codes
K_PAR, K_HVAR, K_HES, K_EXT, K_STRESS = 0, 1, 2, -1, 3  # driver kinds (kernels.contributions); stress is 3 + q
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
        if not (isinstance(self.collateral, float | int) and math.isfinite(self.collateral) and self.collateral > 0):
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
    pol = [str(v or default_policy).strip() for v in t.column(lower["policy"]).to_pylist()] if "policy" in lower else [default_policy] * len(names)
    desk = [str(v or "") for v in t.column(lower["desk"]).to_pylist()] if "desk" in lower else [""] * len(names)
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

    @classmethod
    def from_config(cls, c: Any) -> Settings:
        get = (lambda k, d: c.get(k, d)) if isinstance(c, dict) else (lambda k, d: getattr(c, k, d))
        s = cls(
            hvar_margin=get("hvar_margin", "var"), top_drivers=int(get("top_drivers", 5)),
            resync_events=int(get("resync_events", 0)), stress=tuple(get("stress", ()) or ()),
            sectors=dict(get("sectors", {}) or {}),
            alerts=tuple(AlertRule.from_config(r) for r in (get("alerts", ()) or ())),
        )
        if s.hvar_margin not in ("var", "es"):
            raise InputError(f"calc.hvar_margin: must be 'var' or 'es', got {s.hvar_margin!r}")
        if s.top_drivers < 1:
            raise InputError(f"calc.top_drivers: must be >= 1, got {s.top_drivers}")
        return s


# ---------------------------------------------------------------- the engine


def _grow(a: np.ndarray, axis: int, new: int, fill: Any = 0) -> np.ndarray:
    shape = list(a.shape)
    shape[axis] = new
    out = np.full(shape, fill, dtype=a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


class MarginEngine:
    """Positions, prices and risk state for all accounts; see the module docstring for the calls."""

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
        self.settings = settings or (Settings.from_config(calc_config) if calc_config is not None else Settings())
        specs = list(accounts.values()) if isinstance(accounts, Mapping) else list(accounts)
        positions = positions or Positions([], [], np.zeros(0))
        self.accounts = [s.account for s in specs]
        self.acc_index = {a: i for i, a in enumerate(self.accounts)}
        if len(self.acc_index) != len(self.accounts):
            raise InputError("accounts: an account appears twice")
        self.specs = specs
        # instruments: the risk parameters' syms, then any others positions or the caller name
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
        self.model_code = np.array([codes.get(s.model, M_EXT) for s in specs], dtype=np.int64)
        self.max_stress = np.array([s.policy == "max_stress" for s in specs], dtype=np.bool_)
        self.collateral = np.array([s.collateral for s in specs], dtype=np.float64)
        self.external: dict[str, ExternalModel] = {}
        for s in specs:
            if s.model not in BUILTIN_MODELS and s.model not in self.external:
                self.external[s.model] = external_model(s.model, calc_config)
        ext = self.model_code == M_EXT
        if (ext & self.max_stress).any():
            a = self.accounts[int(np.flatnonzero(ext & self.max_stress)[0])]
            raise InputError(f"account {a!r}: policy max_stress needs a built-in model (var, hvar, stress)")
        if params.scenarios is None and (self.model_code == M_HVAR).any():
            raise InputError("model hvar needs a price history (historical scenarios); only a covariance was given")
        if params.cov is None and ((self.model_code == M_VAR) | (self.model_code == M_STRESS) | self.max_stress).any():
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
        bad = ~(np.isfinite(mult) & (mult > 0))
        if bad.any():
            raise InputError(f"multiplier for sym {syms[int(np.flatnonzero(bad)[0])]!r} must be > 0")

        self.stress_set: StressSet = build_stress(self.settings.stress, dict(self.settings.sectors), syms)

        pcap = 8
        if positions.account:
            _, counts = np.unique(np.array(positions.account, dtype=object), return_counts=True)
            pcap = max(pcap, int(counts.max()) * 2)
        f_hs = self.model_code == M_HVAR
        f_par = (self.model_code == M_VAR) | (self.model_code == M_STRESS)
        f_st = (self.model_code == M_STRESS) | self.max_stress
        n_sc = 0 if params.scenarios is None else params.scenarios.shape[0]
        k_st = self.stress_set.k if f_st.any() else 0
        z_i = lambda *shape: np.zeros(shape, dtype=np.int64)  # noqa: E731
        z_f = lambda *shape: np.zeros(shape, dtype=np.float64)  # noqa: E731
        self.st = kernels.State(
            price=price, mult=mult, inst=z_i(n_acc, pcap), nslot=z_i(n_acc), qty=z_f(n_acc, pcap),
            xa=z_f(n_acc, pcap), nlive=z_i(n_acc), hold_acc=z_i(n_inst, 4), hold_slot=z_i(n_inst, 4), nhold=z_i(n_inst),
            f_hs=f_hs, f_par=f_par, f_st=f_st, rt=z_f(n_inst, n_sc), pnl=z_f(n_acc, n_sc),
            cov=z_f(n_inst, n_inst), y=z_f(n_acc, pcap), v=z_f(n_acc), sd=z_f(n_inst),
            shock=np.ascontiguousarray(self.stress_set.shocks[:k_st]), fk=z_f(k_st, n_inst),
            cmult=np.ascontiguousarray(self.stress_set.corr_mult[:k_st]), g=z_f(n_acc, k_st),
            yk=z_f(k_st, n_acc, pcap), vk=z_f(k_st, n_acc),
            inst_mark=np.zeros(n_inst, np.bool_), inst_list=z_i(n_inst), pair_mark=np.zeros((n_acc, pcap), np.bool_),
            pair_a=z_i(n_acc * pcap), pair_s=z_i(n_acc * pcap), dirty=np.zeros(n_acc, np.bool_),
            dirty_list=z_i(n_acc), counts=z_i(3),
        )
        self._slot: dict[int, int] = {}
        self._set_params(params)
        # results per account (kept for publishing and what-if "before")
        self.var_p, self.var_h, self.es_h, self.stress = z_f(n_acc), z_f(n_acc), z_f(n_acc), z_f(n_acc)
        self.hs_idx, self.st_k = z_i(n_acc), z_i(n_acc)
        self.var, self.es, self.margin, self.kind = z_f(n_acc), z_f(n_acc), z_f(n_acc), z_i(n_acc)
        self._ext_contrib: dict[int, np.ndarray] = {}
        self._dirty_buf = z_i(n_acc)
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

        if len(positions.account):
            a_ix = self._account_ix(positions.account, "positions")
            j_ix = self._sym_ix(positions.sym, "positions")
            self._check_holdable(a_ix, j_ix, "positions")
            slots = self._slots_for(a_ix, j_ix)
            np.add.at(self.st.qty, (a_ix, slots), positions.qty)
        builtin_held = np.unique(self.st.inst[(self.model_code != M_EXT)[:, None] & (self.st.qty != 0)])
        nan = builtin_held[~np.isfinite(price[builtin_held])]
        if len(nan):
            raise InputError(f"no price for sym {syms[int(nan[0])]!r} (give it in prices or the positions' price column)")
        self.full_recompute()

    # ---- construction from config files

    @classmethod
    def from_config(cls, calc: Any, *, param_id: str | None = None) -> MarginEngine:
        """Engine for the [calc] section: history_file, positions_file, accounts_file; the latest
        close of the history is the start price."""
        history = load_prices(calc.history_file)
        accounts = load_accounts(calc.accounts_file, getattr(calc, "default_policy", "model"))
        positions = load_positions(calc.positions_file)
        lookback = calc.lookback_days if calc.lookback_days > 0 else None
        params = params_from_history(
            history, confidence=calc.confidence, horizon_days=calc.horizon_days, lookback_days=lookback,
            ewma_lambda=calc.ewma_lambda, filtered=calc.filtered,
            filter_lambda=getattr(calc, "filter_lambda", 0.94),
            param_id=param_id or f"history:{Path(calc.history_file).name}:{history.dates[-1]}",
        )
        return cls(params, accounts, positions, prices=history.latest, calc_config=calc)

    # ---- parameters

    def _set_params(self, params: RiskParams) -> None:
        st, n = self.st, len(params.syms)
        if params.syms != self.syms[:n]:
            raise InputError("new risk parameters must cover the same syms in the same order as the engine's")
        self.params = params
        self.scale = params.scale
        self.tail_k = tail_count(params.confidence, max(1, st.rt.shape[1]))
        self.tail_w = tail_weights(params.confidence, max(1, st.rt.shape[1]))
        st.rt[:] = 0.0
        if params.scenarios is not None:
            if params.scenarios.shape[0] != st.rt.shape[1]:
                raise InputError(f"new scenarios: {params.scenarios.shape[0]} scenarios, engine has {st.rt.shape[1]}")
            st.rt[:n] = params.scenarios.T
        st.cov[:] = 0.0
        if params.cov is not None:
            st.cov[:n, :n] = params.cov
        st.sd[:] = np.sqrt(np.maximum(np.diag(st.cov), 0.0))
        k = st.shock.shape[0]
        st.fk[:] = self.stress_set.vol_mult[:k, None] * st.sd[None, :] * (1.0 + st.shock)

    def set_params(self, params: RiskParams) -> None:
        """A `param` event: new covariance / scenarios (same syms; for a new universe build a new
        engine). Recomputes everything."""
        self._set_params(params)
        self.full_recompute()
        self._force[:] = True  # every account republishes under the new param_id

    @property
    def param_id(self) -> str:
        return self.params.param_id

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

    def _check_holdable(self, a_ix: np.ndarray, j_ix: np.ndarray, where: str) -> None:
        bad = (self.model_code[a_ix] != M_EXT) & ~self.has_params[j_ix]
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(f"{where}: unknown sym {self.syms[j_ix[i]]!r}: no price history or covariance for it "
                             f"(account {self.accounts[a_ix[i]]!r} uses model {self.specs[a_ix[i]].model!r})")

    def _slots_for(self, a_ix: np.ndarray, j_ix: np.ndarray) -> np.ndarray:
        """Slot of each (account, instrument), opening new slots (and holder entries) as needed."""
        n_inst = len(self.syms)
        keys = (a_ix * n_inst + j_ix).tolist()
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
            kernels.init_slots(self.st, np.array(new_a, dtype=np.int64), np.array(new_s, dtype=np.int64))
        return np.array(slots, dtype=np.int64)

    def _open_slot(self, a: int, j: int) -> int:
        st = self.st
        s = int(st.nslot[a])
        if s == st.inst.shape[1]:
            self._grow_slots(2 * s)
            st = self.st
        h = int(st.nhold[j])
        if h == st.hold_acc.shape[1]:
            self.st = st = st._replace(hold_acc=_grow(st.hold_acc, 1, 2 * h), hold_slot=_grow(st.hold_slot, 1, 2 * h))
        st.inst[a, s] = j
        st.nslot[a] = s + 1
        st.hold_acc[j, h] = a
        st.hold_slot[j, h] = s
        st.nhold[j] = h + 1
        self._slot[a * len(self.syms) + j] = s
        return s

    def _grow_slots(self, new: int) -> None:
        st = self.st
        n_acc = len(self.accounts)
        pair_a, pair_s = np.zeros(n_acc * new, np.int64), np.zeros(n_acc * new, np.int64)
        pair_a[: len(st.pair_a)], pair_s[: len(st.pair_s)] = st.pair_a, st.pair_s
        self.st = st._replace(
            inst=_grow(st.inst, 1, new), qty=_grow(st.qty, 1, new), xa=_grow(st.xa, 1, new), y=_grow(st.y, 1, new),
            yk=_grow(st.yk, 2, new), pair_mark=_grow(st.pair_mark, 1, new), pair_a=pair_a, pair_s=pair_s,
        )

    # ---- events

    def _reject(self, what: str, seq: Any, reason: str) -> None:
        self.rejected += 1
        self.rejects.append(f"{what} seq {seq}: {reason}")

    def _clock(self, seq: np.ndarray, time: np.ndarray | None) -> None:
        if len(seq):
            self.last_seq = max(self.last_seq, int(np.max(seq)))
        if time is not None and len(time):
            self.now = max(self.now, int(np.max(np.asarray(time).astype("datetime64[ns]").astype(np.int64))))
        self.events += len(seq)
        self._since_resync += len(seq)

    def apply_prices(self, sym: Sequence[str], price: np.ndarray, seq: np.ndarray, time: np.ndarray | None = None) -> int:
        """New market prices (trade prices or quote mids), rows in seq order. A sym the engine does
        not know is ignored (market data for instruments nobody holds); a price that is not a finite
        number > 0 is rejected. Returns the rows applied."""
        price = np.asarray(price, dtype=np.float64)
        seq = np.asarray(seq, dtype=np.int64)
        ix = np.fromiter((self.sym_index.get(s, -1) for s in sym), dtype=np.int64, count=len(sym))
        ok = (ix >= 0) & np.isfinite(price) & (price > 0)
        if not ok.all():
            for i in np.flatnonzero((ix >= 0) & ~ok):
                self._reject("price", int(seq[i]), f"price {float(price[i])!r} for {sym[i]!r} is not a finite number > 0")
            ix, price = ix[ok], price[ok]
        kernels.apply_ticks(self.st, ix, price)
        self._clock(seq, time)
        return int(ok.sum())

    def apply_fills(
        self, account: Sequence[str], sym: Sequence[str], side: Sequence[str], qty: np.ndarray, price: np.ndarray,
        seq: np.ndarray, time: np.ndarray | None = None,
    ) -> int:
        """Fills in seq order: side "B" adds qty to the position, "S" subtracts it. Rows for an
        unknown account or sym, a bad side or a quantity that is not > 0 are rejected (see
        `rejects`); the fill price becomes the market price only if the instrument has none yet.
        Returns the rows applied."""
        qty = np.asarray(qty, dtype=np.float64)
        price = np.asarray(price, dtype=np.float64)
        seq = np.asarray(seq, dtype=np.int64)
        n = len(account)
        a_ix = np.fromiter((self.acc_index.get(a, -1) for a in account), dtype=np.int64, count=n)
        j_ix = np.fromiter((self.sym_index.get(s, -1) for s in sym), dtype=np.int64, count=n)
        sign = np.fromiter((1.0 if s == "B" else -1.0 if s == "S" else 0.0 for s in side), dtype=np.float64, count=n)
        ok = (a_ix >= 0) & (j_ix >= 0) & (sign != 0) & np.isfinite(qty) & (qty > 0)
        ok_ix = ok.copy()
        ok_ix[ok] &= (self.model_code[a_ix[ok]] == M_EXT) | self.has_params[j_ix[ok]]
        if not ok_ix.all():
            for i in np.flatnonzero(~ok_ix):
                if a_ix[i] < 0:
                    why = f"unknown account {account[i]!r}"
                elif j_ix[i] < 0:
                    why = f"unknown sym {sym[i]!r}"
                elif sign[i] == 0:
                    why = f"side {side[i]!r} is not B or S"
                elif not (np.isfinite(qty[i]) and qty[i] > 0):
                    why = f"qty {float(qty[i])!r} is not a finite number > 0"
                else:
                    why = f"no risk parameters for sym {sym[i]!r} (account {account[i]!r} model {self.specs[a_ix[i]].model})"
                self._reject("fill", int(seq[i]), why)
            a_ix, j_ix, sign, qty, price = a_ix[ok_ix], j_ix[ok_ix], sign[ok_ix], qty[ok_ix], price[ok_ix]
        no_price = ~np.isfinite(self.st.price[j_ix])
        if no_price.any():  # first sight of an instrument: its fill price is the best price there is
            fp = np.isfinite(price) & (price > 0) & no_price
            kernels.apply_ticks(self.st, j_ix[fp], price[fp])
        slots = self._slots_for(a_ix, j_ix)
        kernels.apply_fills(self.st, a_ix, slots, sign * qty)
        self._clock(seq, time)
        return int(ok_ix.sum())

    def set_collateral(self, account: str, collateral: float) -> None:
        a = self._account_ix([account], "collateral")[0]
        if not (math.isfinite(collateral) and collateral > 0):
            raise InputError(f"collateral for {account!r} must be a finite number > 0, got {collateral!r}")
        self.collateral[a] = collateral
        self._changed[a] = True

    # ---- computing

    def refresh(self) -> np.ndarray:
        """Bring the risk state up to date with the events applied so far and recompute the numbers
        of the accounts that moved; returns their indices."""
        if self.settings.resync_events and self._since_resync >= self.settings.resync_events:
            return self.full_recompute()
        st = self.st
        kernels.refresh(st)
        n = kernels.take_dirty(st, self._dirty_buf)
        acc = self._dirty_buf[:n].copy()
        self._measure(acc)
        return acc

    def _measure(self, acc: np.ndarray) -> None:
        st = self.st
        kernels.measures(st, acc, self.scale, self.tail_k, self.tail_w, self.var_p, self.var_h, self.es_h,
                         self.stress, self.hs_idx, self.st_k)
        code = self.model_code[acc]
        var = np.where(code == M_HVAR, self.var_h[acc], np.where(code == M_EXT, 0.0, self.var_p[acc]))
        es = np.where(code == M_HVAR, self.es_h[acc], 0.0)
        hs_num, hs_kind = (self.es_h[acc], K_HES) if self.settings.hvar_margin == "es" else (self.var_h[acc], K_HVAR)
        number = np.select([code == M_VAR, code == M_HVAR, code == M_STRESS], [self.var_p[acc], hs_num, self.stress[acc]], 0.0)
        kind = np.select([code == M_VAR, code == M_HVAR, code == M_STRESS], [K_PAR, hs_kind, K_STRESS + self.st_k[acc]], K_EXT)
        for i in np.flatnonzero(code == M_EXT):
            a = int(acc[i])
            r = self._evaluate_external(a)
            var[i], es[i], number[i] = r.var, r.es, r.var
            self._ext_contrib[a] = np.asarray(r.contrib, dtype=np.float64)
        stress_wins = self.max_stress[acc] & (self.stress[acc] > number)
        number = np.where(stress_wins, self.stress[acc], number)
        kind = np.where(stress_wins, K_STRESS + self.st_k[acc], kind)
        self.var[acc] = np.maximum(var, 0.0)
        self.es[acc] = np.maximum(es, 0.0)
        self.margin[acc] = np.maximum(number, 0.0)
        self.kind[acc] = kind
        self._changed[acc] = True

    def _evaluate_external(self, a: int):
        st = self.st
        n = int(st.nslot[a])
        inst = st.inst[a, :n]
        model = self.external[self.specs[a].model]
        return model.evaluate([self.syms[j] for j in inst], st.qty[a, :n].copy(), st.price[inst].copy(), st.mult[inst].copy())

    def full_recompute(self) -> np.ndarray:
        """Rebuild every account's risk state from positions and prices with dense numpy products
        (the reference for the incremental kernels; also run on a parameter change), then recompute
        all numbers. Returns all account indices."""
        st = self.st
        kernels.refresh(st)  # clears the touched lists (their work is redone below)
        x = self._dense_exposure()
        st.xa[:] = st.qty * (st.price * st.mult)[st.inst]
        st.xa[np.arange(st.inst.shape[1])[None, :] >= st.nslot[:, None]] = 0.0
        st.nlive[:] = (st.xa != 0).sum(axis=1)
        if st.f_hs.any():
            st.pnl[st.f_hs] = x[st.f_hs] @ st.rt
        if st.f_par.any():
            xp = x[st.f_par]
            yd = xp @ st.cov
            st.y[st.f_par] = np.take_along_axis(yd, st.inst[st.f_par], axis=1)
            st.v[st.f_par] = np.einsum("an,an->a", xp, yd)
        if st.f_st.any() and st.shock.shape[0]:
            xs = x[st.f_st]
            st.g[st.f_st] = xs @ st.shock.T
            for k in range(st.shock.shape[0]):
                ck = self._stressed_cov(k)
                yd = xs @ ck
                st.yk[k][st.f_st] = np.take_along_axis(yd, st.inst[st.f_st], axis=1)
                st.vk[k][st.f_st] = np.einsum("an,an->a", xs, yd)
        kernels.mark_all(st)
        n = kernels.take_dirty(st, self._dirty_buf)
        acc = self._dirty_buf[:n].copy()
        self._measure(acc)
        self._since_resync = 0
        return acc

    def _dense_exposure(self) -> np.ndarray:
        st = self.st
        x = np.zeros((len(self.accounts), len(self.syms)))
        live = np.arange(st.inst.shape[1])[None, :] < st.nslot[:, None]
        a_ix, s_ix = np.nonzero(live)
        j = st.inst[a_ix, s_ix]
        x[a_ix, j] = st.qty[a_ix, s_ix] * (st.price[j] * st.mult[j])
        return x

    def _stressed_cov(self, k: int) -> np.ndarray:
        from calc.models import stressed_cov

        st = self.st
        return stressed_cov(st.cov, st.shock[k], float(st.cmult[k]), float(self.stress_set.vol_mult[k]))

    def compute_full(self) -> dict[str, np.ndarray]:
        """The reference numbers from scratch with the numpy models (calc/models.py), touching no
        state: margin, var, es, stress per account and contrib (A, N) of the margin's drivers."""
        st = self.st
        x = self._dense_exposure()
        p = self.params
        n_acc = len(self.accounts)
        z = np.zeros(n_acc)
        var_p = parametric(x, st.cov, self.scale) if st.f_par.any() else None
        hs = historical(x, st.rt.T, p.confidence, self.settings.hvar_margin) if st.f_hs.any() else None
        ss = StressSet(self.stress_set.names[: st.shock.shape[0]], st.shock, st.cmult, self.stress_set.vol_mult[: st.shock.shape[0]])
        sr = stress(x, st.cov, ss, self.scale) if st.f_st.any() else None
        code = self.model_code
        var = np.where(code == M_HVAR, hs.var if hs else z, np.where(code == M_EXT, z, var_p.var if var_p else z))
        es = np.where(code == M_HVAR, hs.es if hs else z, z)
        hs_num = (hs.es if self.settings.hvar_margin == "es" else hs.var) if hs else z
        st_num = np.where(st.f_st, sr.var, 0.0) if sr else z
        number = np.select([code == M_VAR, code == M_HVAR, code == M_STRESS], [var_p.var if var_p else z, hs_num, st_num], 0.0)
        zc = np.zeros_like(x)
        contrib = np.select([c[:, None] for c in (code == M_VAR, code == M_HVAR, code == M_STRESS)],
                            [var_p.contrib if var_p else zc, hs.contrib if hs else zc, sr.contrib if sr else zc], zc)
        for a in np.flatnonzero(code == M_EXT):
            r = self._evaluate_external(int(a))
            var[a] = es[a] = 0.0
            var[a], number[a] = r.var, r.var
            contrib[a, st.inst[a, : st.nslot[a]]] = r.contrib
        wins = self.max_stress & (st_num > number)
        number = np.where(wins, st_num, number)
        if sr is not None:
            contrib[wins] = sr.contrib[wins]
        return {"margin": np.maximum(number, 0.0), "var": np.maximum(var, 0.0), "es": np.maximum(es, 0.0),
                "stress": st_num, "contrib": contrib, "exposure": x}

    # ---- publishing

    def _contrib(self, a: int) -> np.ndarray:
        """Per-slot contributions to account a's margin number."""
        st = self.st
        n = int(st.nslot[a])
        kind = int(self.kind[a])
        if kind == K_EXT:
            return self._ext_contrib.get(a, np.zeros(n))[:n]
        out = np.zeros(max(n, 1))
        kernels.contributions(st, a, kind, self.scale, self.tail_k, self.tail_w, out)
        return out[:n]

    def drivers(self, a: int) -> list[dict[str, Any]]:
        """Top drivers of account a's margin (they and the `*other*` entry add up to the margin)."""
        if self.margin[a] <= 0:
            return []
        st = self.st
        n = int(st.nslot[a])
        inst = st.inst[a, :n]
        return top_drivers([self.syms[j] for j in inst], st.xa[a, :n], self._contrib(a), self.settings.top_drivers)

    def _rows(self, acc: np.ndarray, change: np.ndarray) -> dict[str, list]:
        util = self.margin[acc] / self.collateral[acc]
        values: dict[str, list] = {
            "account": [self.accounts[a] for a in acc],
            "model": [self.specs[a].model for a in acc],
            "margin": self.margin[acc].tolist(),
            "var": self.var[acc].tolist(),
            "es": self.es[acc].tolist(),
            "stress": np.maximum(self.stress[acc], 0.0).tolist(),
            "collateral": self.collateral[acc].tolist(),
            "utilisation": util.tolist(),
            "change": change.tolist(),
            "drivers": [_json.encode(self.drivers(int(a))).decode() for a in acc],
            "last_seq": [self.last_seq] * len(acc),
            "param_id": [self.param_id] * len(acc),
        }
        extra = set(values) - set(MARGIN_COLUMNS)
        if extra:
            raise AssertionError(f"engine produces columns the margin table lacks: {sorted(extra)}")
        return {c: values[c] for c in MARGIN_COLUMNS}

    def snapshot(self) -> dict[str, list]:
        """Current margin rows for all accounts (change = since the last published row), without
        marking anything published."""
        self.refresh()
        acc = np.arange(len(self.accounts))
        prev = np.nan_to_num(self._published[acc, 0], nan=0.0)
        return self._rows(acc, self.margin[acc] - prev)

    def changed_rows(self, now: int | None = None) -> dict[str, list]:
        """One margin row per account whose margin, VaR, ES, stress or collateral differs from its
        last published row (every account on the first call and after new parameters); marks them published and evaluates
        the alert rules on them (collect the alert rows with `take_alerts`). `now` (ns) overrides
        the event clock for the jump rule."""
        self.refresh()
        if now is not None:
            self.now = max(self.now, int(now))
        cand = np.flatnonzero(self._changed)
        self._changed[cand] = False
        cur = np.column_stack([self.margin[cand], self.var[cand], self.es[cand], np.maximum(self.stress[cand], 0.0),
                               self.collateral[cand]])
        prev = self._published[cand]
        moved = np.isnan(prev[:, 0]) | (cur != prev).any(axis=1) | self._force[cand]
        self._force[cand] = False
        acc = cand[moved]
        change = self.margin[acc] - np.nan_to_num(prev[moved, 0], nan=0.0)
        self._published[acc] = cur[moved]
        rows = self._rows(acc, change)
        if self.alerts.rules:
            for a in acc.tolist():
                self._alert_rows += self.alerts.evaluate(self.accounts[a], float(self.margin[a]),
                                                         float(self.collateral[a]), self.now, self.last_seq)
        return rows

    def take_alerts(self) -> dict[str, list]:
        """Alert rows raised or cleared since the last call, as columns of the alert table."""
        rows, self._alert_rows = self._alert_rows, []
        return {c: [r[c] for r in rows] for c in ALERT_COLUMNS}

    # ---- what-if

    def what_if(self, account: str, trades: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Margin of `account` before and after hypothetical trades ({"sym", "qty"} with qty signed,
        or {"sym", "side": "B"/"S", "qty" > 0}), without touching the engine's state."""
        if account not in self.acc_index:
            raise InputError(f"what_if: unknown account {account!r}")
        a = self.acc_index[account]
        syms, dqs = [], []
        for i, t in enumerate(trades):
            s = t.get("sym")
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
            if not math.isfinite(self.st.price[j]):
                raise InputError(f"what_if: trade {i}: no price for sym {s!r}")
            syms.append(j)
            dqs.append(q)
        scratch = _Scratch(self, a, np.array(syms, dtype=np.int64))
        before = scratch.numbers()
        scratch.trade(np.array(dqs, dtype=np.float64))
        after = scratch.numbers()
        return {
            "account": account, "model": self.specs[a].model,
            "margin_before": before["margin"], "margin_after": after["margin"],
            "change": after["margin"] - before["margin"],
            "var_before": before["var"], "var_after": after["var"], "es_before": before["es"], "es_after": after["es"],
            "stress_before": before["stress"], "stress_after": after["stress"],
            "collateral": float(self.collateral[a]), "utilisation_after": after["margin"] / float(self.collateral[a]),
            "drivers_before": before["drivers"], "drivers": after["drivers"],
        }


class _Scratch:
    """A one-account copy of the engine's state for what-if: same kernels, nothing shared is written."""

    def __init__(self, eng: MarginEngine, a: int, extra_inst: np.ndarray):
        st = eng.st
        self.eng = eng
        self.a = a
        self._trade_inst = extra_inst
        n = int(st.nslot[a])
        inst = list(st.inst[a, :n])
        have = set(inst)
        new = [int(j) for j in dict.fromkeys(extra_inst.tolist()) if j not in have]
        p = n + len(new)
        self.slot_of = {int(j): i for i, j in enumerate(inst + new)}
        one = lambda x: np.ascontiguousarray(x.reshape((1, *x.shape)))  # noqa: E731
        pad = lambda x: np.concatenate([x, np.zeros(len(new))])  # noqa: E731
        self.st = st._replace(
            inst=one(np.array(inst + new, dtype=np.int64)), nslot=np.array([n], np.int64),
            qty=one(pad(st.qty[a, :n])), xa=one(pad(st.xa[a, :n])), nlive=st.nlive[a : a + 1].copy(),
            hold_acc=np.zeros((1, 1), np.int64), hold_slot=np.zeros((1, 1), np.int64), nhold=np.zeros(1, np.int64),
            f_hs=st.f_hs[a : a + 1].copy(), f_par=st.f_par[a : a + 1].copy(), f_st=st.f_st[a : a + 1].copy(),
            pnl=st.pnl[a : a + 1].copy(), y=one(pad(st.y[a, :n])), v=st.v[a : a + 1].copy(),
            g=st.g[a : a + 1].copy(), yk=np.ascontiguousarray(np.concatenate([st.yk[:, a : a + 1, :n], np.zeros((st.yk.shape[0], 1, len(new)))], axis=2)),
            vk=st.vk[:, a : a + 1].copy(),
            inst_mark=np.zeros(1, np.bool_), inst_list=np.zeros(1, np.int64), pair_mark=np.zeros((1, p), np.bool_),
            pair_a=np.zeros(p, np.int64), pair_s=np.zeros(p, np.int64), dirty=np.zeros(1, np.bool_),
            dirty_list=np.zeros(1, np.int64), counts=np.zeros(3, np.int64),
        )
        for i in range(len(new)):  # open the new slots one by one, as the engine would
            self.st.nslot[0] = n + i + 1
            kernels.init_slots(self.st, np.zeros(1, np.int64), np.array([n + i], np.int64))
        # bring the copy up to date with events the engine has applied but not refreshed yet
        kernels.apply_fills(self.st, np.zeros(p, np.int64), np.arange(p, dtype=np.int64), np.zeros(p))

    def trade(self, dq: np.ndarray) -> None:
        slots = np.array([self.slot_of[int(j)] for j in self._trade_inst], dtype=np.int64)
        kernels.apply_fills(self.st, np.zeros(len(slots), np.int64), slots, dq)

    def numbers(self) -> dict[str, Any]:
        eng, st, a = self.eng, self.st, self.a
        kernels.refresh(st)
        kernels.take_dirty(st, np.zeros(1, np.int64))
        one = np.zeros(1, np.int64)
        f = [np.zeros(1) for _ in range(4)]
        hs_idx, st_k = np.zeros(1, np.int64), np.zeros(1, np.int64)
        kernels.measures(st, one, eng.scale, eng.tail_k, eng.tail_w, *f, hs_idx, st_k)
        var_p, var_h, es_h, stress_v = (float(x[0]) for x in f)
        code = int(eng.model_code[a])
        n = int(st.nslot[0])
        syms = [eng.syms[j] for j in st.inst[0, :n]]
        if code == M_EXT:
            r = eng.external[eng.specs[a].model].evaluate(syms, st.qty[0, :n].copy(), st.price[st.inst[0, :n]].copy(),
                                                          st.mult[st.inst[0, :n]].copy())
            var, es, number, kind, contrib = r.var, r.es, r.var, K_EXT, np.asarray(r.contrib, dtype=np.float64)
        else:
            var = var_h if code == M_HVAR else var_p
            es = es_h if code == M_HVAR else 0.0
            hs_es = eng.settings.hvar_margin == "es"
            number = {M_VAR: var_p, M_HVAR: es_h if hs_es else var_h, M_STRESS: stress_v}[code]
            kind = {M_VAR: K_PAR, M_HVAR: K_HES if hs_es else K_HVAR, M_STRESS: K_STRESS + int(st_k[0])}[code]
            if eng.max_stress[a] and stress_v > number:
                number, kind = stress_v, K_STRESS + int(st_k[0])
            contrib = np.zeros(max(n, 1))
            kernels.contributions(st, 0, kind, eng.scale, eng.tail_k, eng.tail_w, contrib)
            contrib = contrib[:n]
        margin = max(number, 0.0)
        drivers = top_drivers(syms, st.xa[0, :n], contrib, eng.settings.top_drivers) if margin > 0 else []
        return {"margin": margin, "var": max(var, 0.0), "es": max(es, 0.0),
                "stress": max(stress_v, 0.0) if st.f_st[0] else 0.0, "drivers": drivers}


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
    eng = MarginEngine(params, specs, pos, prices={"A": 10.0, "B": 20.0, "C": 30.0},
                       settings=Settings(stress=({"name": "x", "default_shock": -0.1},)))
    eng.apply_fills(["v", "h"], ["B", "C"], ["B", "S"], np.array([1.0, 2.0]), np.array([20.0, 30.0]), np.array([1, 2]))
    eng.apply_prices(["A", "C"], np.array([11.0, 29.0]), np.array([3, 4]))
    eng.changed_rows()
    eng.what_if("s", [{"sym": "A", "qty": 1.0}])
    return time.perf_counter() - t0
