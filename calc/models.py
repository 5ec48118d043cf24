"""The margin models as plain numpy over dense exposures: parametric VaR, historical-simulation
VaR/ES, stress; risk parameters, policy, drivers and the registry through which SPAN plugs in.

This is the reference ("full recompute") path: the one-shot calculator uses it and the streaming
engine's incremental numba kernels (calc/kernels.py) are tested against it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

from calc.history import (
    InputError,
    PriceHistory,
    check_lambda,
    covariance,
    log_returns,
    scenario_returns,
    vol_multipliers,
)
from marginflow.config import StressScenarioConfig
from schemas.tables import BUILTIN_MODELS

OTHER = "*other*"  # drivers entry that sums the positions outside the top N

# ---------------------------------------------------------------- the normal quantile

_NORMAL = NormalDist()


def norm_ppf(p: float) -> float:
    """The standard normal quantile Phi^-1(p) for 0 < p < 1 (the standard library's NormalDist.inv_cdf:
    Wichura's AS 241, ~1e-16 relative accuracy)."""
    check_confidence(p, "p")
    return _NORMAL.inv_cdf(p)


def check_confidence(c: float, name: str = "confidence") -> None:
    if not (isinstance(c, float | int) and 0.0 < c < 1.0):
        raise InputError(f"{name}: must be strictly between 0 and 1, got {c!r}")


def tail_size(confidence: float, n_scenarios: int) -> float:
    """(1 - c) * T, snapped to the nearest integer when within rounding noise ((1-0.99)*500 is
    5.000000000000004 in floating point and must count as 5)."""
    t = (1.0 - confidence) * n_scenarios
    r = round(t)
    return float(r) if abs(t - r) <= 1e-9 * max(1.0, t) else t


def tail_count(confidence: float, n_scenarios: int) -> int:
    """k = ceil((1 - c) T): VaR is the k-th worst loss (at least 1)."""
    return max(1, math.ceil(tail_size(confidence, n_scenarios)))


def tail_weights(confidence: float, n_scenarios: int) -> np.ndarray:
    """ES weights on the k worst losses (worst first): 1/tail each, the last one weighted by the
    fractional remainder (Rockafellar-Uryasev); they sum to 1."""
    tail = tail_size(confidence, n_scenarios)
    if tail < 1.0:  # fewer scenarios than 1/(1-c): the worst loss alone
        return np.array([1.0])
    w = np.ones(tail_count(confidence, n_scenarios))
    w[-1] = tail - (len(w) - 1)  # 1 when the tail is a whole number of scenarios
    return w / tail


# ---------------------------------------------------------------- risk parameters


@dataclass(frozen=True)
class RiskParams:
    """What the models need per instrument: the daily covariance (parametric, stress) and the
    historical scenarios as simple returns over the holding period (HS)."""

    syms: list[str]
    cov: np.ndarray | None  # (N, N) daily return covariance
    scenarios: np.ndarray | None  # (S, N) simple returns over the horizon
    confidence: float
    horizon_days: int
    param_id: str = ""
    filtered: bool = False
    # (S, N) per scenario the implied-vol multiplier of options on each instrument (history.ewma_vol_ratio,
    # vol_scenarios = "proxy"); None: implied vols do not move in the scenarios
    vol_ratio: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_confidence(self.confidence)
        if not (isinstance(self.horizon_days, int) and self.horizon_days >= 1):
            raise InputError(f"horizon_days: must be an integer >= 1, got {self.horizon_days!r}")
        n = len(self.syms)
        if self.cov is not None and self.cov.shape != (n, n):
            raise InputError(f"covariance: shape {self.cov.shape} does not match {n} syms")
        if self.scenarios is not None and (self.scenarios.ndim != 2 or self.scenarios.shape[1] != n):
            raise InputError(f"scenarios: shape {self.scenarios.shape} does not match {n} syms")
        if self.scenarios is not None and len(self.scenarios) == 0:
            raise InputError("history: no scenarios (the history is shorter than the holding period)")
        if self.vol_ratio is not None and (
            self.scenarios is None or self.vol_ratio.shape != self.scenarios.shape
        ):
            raise InputError("vol_ratio: shape does not match the scenarios")

    @property
    def z(self) -> float:
        return norm_ppf(self.confidence)

    @property
    def scale(self) -> float:
        """z * sqrt(h): daily-covariance VaR to holding-period VaR."""
        return self.z * math.sqrt(self.horizon_days)

    def select(self, syms: Sequence[str]) -> RiskParams:
        index = {s: i for i, s in enumerate(self.syms)}
        missing = [s for s in syms if s not in index]
        if missing:
            raise InputError(f"unknown sym {missing[0]!r}: no risk parameters (history or covariance) for it")
        ix = np.array([index[s] for s in syms], dtype=np.int64)
        return dataclasses.replace(
            self,
            syms=list(syms),
            cov=None if self.cov is None else self.cov[np.ix_(ix, ix)],
            scenarios=None if self.scenarios is None else self.scenarios[:, ix],
            vol_ratio=None if self.vol_ratio is None else self.vol_ratio[:, ix],
        )


def params_from_history(
    history: PriceHistory,
    *,
    confidence: float,
    horizon_days: int,
    lookback_days: int | None,
    ewma_lambda: float = 0.0,
    filtered: bool = False,
    filter_lambda: float = 0.94,
    param_id: str = "",
    vol_scenarios: str = "none",
    implied_vols: PriceHistory | None = None,
) -> RiskParams:
    """Covariance of daily log returns and HS scenarios from the last `lookback_days` returns; with
    vol_scenarios "proxy" the options' implied-vol multipliers per scenario (history.ewma_vol_ratio,
    EWMA decay filter_lambda, or the implied-vol history `implied_vols` where it has the underlying:
    history.vol_multipliers)."""
    check_confidence(confidence)
    check_lambda(ewma_lambda, "ewma_lambda")
    if filtered:
        check_lambda(filter_lambda, "filter_lambda", allow_zero=False)
    w = history.window(lookback_days).validate()
    daily = log_returns(w.closes)
    return RiskParams(
        list(w.syms),
        covariance(daily, ewma_lambda),
        scenario_returns(w.closes, horizon_days, filtered, filter_lambda),
        confidence,
        horizon_days,
        param_id,
        filtered,
        vol_multipliers(w, horizon_days, filter_lambda, implied_vols) if vol_scenarios == "proxy" else None,
    )


# ---------------------------------------------------------------- stress scenarios


@dataclass(frozen=True)
class StressSet:
    """K named stress scenarios over N instruments: price shocks and stressed covariances."""

    names: list[str]
    shocks: np.ndarray  # (K, N) relative price moves
    corr_mult: np.ndarray  # (K,) correlation multiplier (off-diagonal correlations, clipped to [-1, 1])
    vol_mult: np.ndarray  # (K,) volatility multiplier

    @property
    def k(self) -> int:
        return len(self.names)


def build_stress(
    scenarios: Sequence[StressScenarioConfig], sectors: dict[str, str], syms: Sequence[str]
) -> StressSet:
    """Compile [[calc.stress]] scenarios (checked by StressScenarioConfig) over instruments `syms`: a
    sym's own shock beats its sector's, which beats the default."""
    rows = [
        [sc.shocks.get(s, sc.shocks.get(sectors.get(s, ""), sc.default_shock)) for s in syms]
        for sc in scenarios
    ]
    return StressSet(
        [sc.name for sc in scenarios],
        np.array(rows, dtype=np.float64).reshape(len(scenarios), len(syms)),
        np.array([sc.correlation_multiplier for sc in scenarios], dtype=np.float64),
        np.array([sc.volatility_multiplier for sc in scenarios], dtype=np.float64),
    )


def stressed_cov(cov: np.ndarray, shock: np.ndarray, corr_mult: float, vol_mult: float) -> np.ndarray:
    """Covariance of the post-shock exposures x*(1+shock) under stressed volatilities and
    correlations: f_i f_j clip(m * rho_ij, -1, 1), f = vol_mult * sd * (1 + shock), rho_ii = 1."""
    sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(np.outer(sd, sd) > 0, cov / np.outer(sd, sd), 0.0)
    rho = np.clip(rho * corr_mult, -1.0, 1.0)
    np.fill_diagonal(rho, 1.0)
    f = vol_mult * sd * (1.0 + shock)
    return rho * np.outer(f, f)


# ---------------------------------------------------------------- reference computations


@dataclass
class ModelResult:
    """Per account (rows) results of one model; `contrib` per instrument sums to the model number."""

    var: np.ndarray
    es: np.ndarray
    contrib: np.ndarray  # (A, N): contribution of each position to the number that sets the margin
    extra: dict[str, Any] = field(default_factory=dict)


def parametric(x: np.ndarray, cov: np.ndarray, scale: float) -> ModelResult:
    """VaR = z sqrt(h) sqrt(x'Cx) per row of dollar exposures x (A, N); component VaR drivers
    scale * x_i (Cx)_i / sqrt(x'Cx)."""
    y = x @ cov
    v = np.maximum(np.einsum("an,an->a", x, y), 0.0)
    sq = np.sqrt(v)
    var = scale * sq
    with np.errstate(divide="ignore", invalid="ignore"):
        contrib = np.where(sq[:, None] > 0, scale * x * y / sq[:, None], 0.0)
    return ModelResult(var, np.zeros_like(var), contrib)


def historical(
    x: np.ndarray,
    scenarios: np.ndarray,
    confidence: float,
    margin_on: str = "var",
    revalued: np.ndarray | None = None,
) -> ModelResult:
    """HS VaR = k-th worst loss, k = ceil((1-c)T); ES = mean of the worst (1-c)T losses with the
    fractional last one weighted. Drivers: each position's loss in the VaR scenario (margin_on
    "var") or its ES-weighted loss over the tail scenarios ("es"). Losses floor at 0.
    `revalued` (A, N, S): the scenario P&L of positions revalued in full (options), added to the linear
    ones' x @ scenarios.T (their x is 0)."""
    pnl = x @ scenarios.T  # (A, S)
    if revalued is not None:
        pnl = pnl + revalued.sum(axis=1)
    t = scenarios.shape[0]
    k = tail_count(confidence, t)
    w = tail_weights(confidence, t)
    order = np.argsort(pnl, axis=1, kind="stable")  # ascending P&L = worst loss first, ties by scenario
    worst = order[:, :k]
    losses = -np.take_along_axis(pnl, worst, axis=1)
    var_raw = losses[:, k - 1]
    es_raw = losses @ w
    if margin_on == "es":
        contrib = -x * np.einsum("ak,akn->an", np.broadcast_to(w, worst.shape), scenarios[worst])
        if revalued is not None:
            contrib -= np.einsum("k,ank->an", w, np.take_along_axis(revalued, worst[:, None, :], axis=2))
    else:
        contrib = -x * scenarios[worst[:, k - 1]]
        if revalued is not None:
            contrib -= np.take_along_axis(revalued, worst[:, None, k - 1 : k], axis=2)[:, :, 0]
    return ModelResult(
        np.maximum(var_raw, 0.0),
        np.maximum(es_raw, 0.0),
        contrib,
        {"var_scenario": worst[:, k - 1], "tail": worst},
    )


def stress(x: np.ndarray, cov: np.ndarray, ss: StressSet, scale: float) -> ModelResult:
    """Per scenario: loss from the shock, -x.shock, plus the parametric VaR of the shocked
    exposures under the stressed covariance; the account's stress is the worst scenario (floor 0).
    `var` holds the stress number, `extra["by_scenario"]` the (A, K) losses."""
    a, n = x.shape
    by = np.zeros((a, ss.k))
    contribs = np.zeros((ss.k, a, n))
    for k in range(ss.k):
        shock_loss = -x * ss.shocks[k]
        r = parametric(x, stressed_cov(cov, ss.shocks[k], ss.corr_mult[k], ss.vol_mult[k]), scale)
        by[:, k] = shock_loss.sum(axis=1) + r.var
        contribs[k] = shock_loss + r.contrib
    if ss.k == 0:
        return ModelResult(
            np.zeros(a), np.zeros(a), np.zeros((a, n)), {"by_scenario": by, "worst": np.zeros(a, int)}
        )
    worst = np.argmax(by, axis=1)
    value = by[np.arange(a), worst]
    contrib = contribs[worst, np.arange(a)]
    return ModelResult(np.maximum(value, 0.0), np.zeros(a), contrib, {"by_scenario": by, "worst": worst})


def policy_margin(model_number: float, stress_number: float, policy: str) -> float:
    """The margin the account must post: the model's number, or max(model, stress)."""
    return max(model_number, stress_number) if policy == "max_stress" else model_number


# ---------------------------------------------------------------- external models (SPAN plugs in here)


@dataclass
class ExternalResult:
    var: float  # the model's number (e.g. SPAN total)
    es: float
    contrib: np.ndarray  # per position, sums to the margin
    margin: float | None = None  # the margin when it is not the VaR (CCP models: with add-ons)
    components: Any = None  # the margin's parts (schemas.calc.CcpComponents for CCP models), or None


class ExternalModel(Protocol):
    """A margin model the engine calls per changed account (plain Python, e.g. SPAN)."""

    def evaluate(
        self, syms: list[str], qty: np.ndarray, price: np.ndarray, multiplier: np.ndarray
    ) -> ExternalResult: ...


EXTERNAL_MODELS: dict[str, Callable[[Any], ExternalModel]] = {}


def register_model(name: str, factory: Callable[[Any], ExternalModel]) -> None:
    """Register an external model: `factory(calc_config)` returns an `ExternalModel`. A package
    `calc.<name>` (e.g. calc.span) may call this when imported."""
    if name in BUILTIN_MODELS:
        raise ValueError(f"model {name!r} is built in")
    EXTERNAL_MODELS[name] = factory


def external_model(name: str, calc_config: Any) -> ExternalModel:
    """The external model `name`, importing `calc.<name>` to let it register if needed."""
    if any(m.name == name for m in getattr(calc_config, "ccp_models", ())):
        from calc.ccp.engine_model import CcpEngineModel

        return CcpEngineModel.from_config(name, calc_config)
    if name not in EXTERNAL_MODELS:
        try:
            importlib.import_module(f"calc.{name}")
        except ImportError:
            pass
    if name not in EXTERNAL_MODELS:
        known = ", ".join([*BUILTIN_MODELS, *sorted(EXTERNAL_MODELS)])
        raise InputError(f"model: unknown model {name!r} (known: {known})")
    return EXTERNAL_MODELS[name](calc_config)
