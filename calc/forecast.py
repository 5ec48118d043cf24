"""The trained forecast of the replica's residual: a LightGBM quantile model (P50, P95) of
actual / replica - 1 per (account, horizon), stored as one JSON file (`marginflow forecast train`,
replay/forecast_train.py) and loaded by calc (calc/projection.py asks it through ResidualModel).

    FEATURES                      # the model's input columns, in order (the file must name the same)
    matrix(x: FeatureInputs)      # -> (n, len(FEATURES)) float64, LightGBM's input
    model = load(path)            # LgbmResidual if the file's forecast beat the replica, else None
    p50, p95 = model.quantiles(x) # relative residuals per entry

The file (JSON): {"format": FORMAT, "features": FEATURES, "models": {"p50": <LightGBM model string>,
"p95": ...}, "comparison": {...}, "beats_replica": bool, "band": {"p50": q, "p95": q} (the replica's
historical relative errors, the fallback band), "trained": {...}}. A file naming other features than
FEATURES is refused naming the difference: a model trained on other columns would read them wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError
from calc.projection import FeatureInputs

FORMAT = "marginflow-forecast/1"
FEATURES: tuple[str, ...] = (
    "log_replica",  # log1p of the replica's requirement: the size of the account
    "var_rel",  # VaR / replica
    "es_rel",  # ES / replica
    "stress_rel",  # stress / replica
    "last_cycle_rel",  # replica at the previous cycle / replica - 1
    "move_1h",  # margin 1 h ago / replica - 1
    "to_cycle_h",  # hours to the horizon's cycle
    "horizon",  # 0 next, 1 eod, 2 t+1
    "last_break",  # the account's last actual / replica-at-cycle - 1
    "mean_break5",  # mean of its last 5
    "weekday",
    "month_end",
    "vol94",  # EWMA daily vol of the market index, decays 0.94 / 0.97 / 0.99
    "vol97",
    "vol99",
    "vol_ratio",  # vol94 / vol99: short-term against long-term volatility
)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / b, np.nan)


def matrix(x: FeatureInputs) -> np.ndarray:
    """The model's input matrix, columns in FEATURES order (nan = not known: LightGBM's missing)."""
    rep = np.asarray(x.replica, dtype=np.float64)
    cols = (
        np.log1p(np.maximum(rep, 0.0)),
        _rel(x.var, rep),
        _rel(x.es, rep),
        _rel(x.stress, rep),
        _rel(x.margin_last_cycle, rep) - 1.0,
        _rel(x.margin_1h, rep) - 1.0,
        np.asarray(x.to_cycle_s, dtype=np.float64) / 3600.0,
        x.horizon,
        x.last_break,
        x.mean_break5,
        x.weekday,
        x.month_end,
        x.vol94,
        x.vol97,
        x.vol99,
        _rel(x.vol94, x.vol99),
    )
    assert len(cols) == len(FEATURES)
    out = np.empty((len(rep), len(FEATURES)), dtype=np.float64)
    for j, c in enumerate(cols):
        out[:, j] = c
    return out


class LgbmResidual:
    """A ResidualModel (calc/projection.py) over two LightGBM boosters (alpha 0.5 and 0.95); P95 is kept
    at or above P50."""

    def __init__(self, doc: dict[str, Any], digest: str) -> None:
        import lightgbm as lgb

        self.id = f"lgbm:{digest[:10]}"
        self.doc = doc
        self.beats_replica = bool(doc.get("beats_replica"))
        self.band = dict(doc.get("band") or {})
        self.p50 = lgb.Booster(model_str=doc["models"]["p50"])
        self.p95 = lgb.Booster(model_str=doc["models"]["p95"])

    def quantiles(self, x: FeatureInputs) -> tuple[np.ndarray, np.ndarray]:
        if not len(x):
            return np.zeros(0), np.zeros(0)
        m = matrix(x)
        q50 = np.asarray(self.p50.predict(m, num_threads=1), dtype=np.float64)
        q95 = np.asarray(self.p95.predict(m, num_threads=1), dtype=np.float64)
        return q50, np.maximum(q95, q50)


def check(doc: Any, where: str) -> dict[str, Any]:
    """The file's document, refused (InputError naming the field and why) unless it is a forecast file
    with exactly FEATURES."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{where}: field format: expected {FORMAT!r}, got {got!r}")
    feats = doc.get("features")
    if not isinstance(feats, list) or tuple(feats) != FEATURES:
        have = list(feats) if isinstance(feats, list) else []
        missing = [f for f in FEATURES if f not in have]
        extra = [f for f in have if f not in FEATURES]
        what = (
            f"missing {missing}" if missing else "",
            f"unknown {extra}" if extra else "",
            "" if missing or extra else "in another order",
        )
        raise InputError(
            f"{where}: field features: the model was trained on other features than calc's "
            f"({'; '.join(w for w in what if w)}); retrain it with `marginflow forecast train`"
        )
    models = doc.get("models")
    if not isinstance(models, dict) or not all(isinstance(models.get(k), str) for k in ("p50", "p95")):
        raise InputError(f"{where}: field models: expected LightGBM model strings p50 and p95")
    band = doc.get("band") or {}
    for k in ("p50", "p95"):
        v = band.get(k, 0.0) if isinstance(band, dict) else None
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise InputError(f"{where}: field band.{k}: expected a finite number, got {v!r}")
    if not isinstance(doc.get("beats_replica"), bool):
        raise InputError(f"{where}: field beats_replica: expected true or false")
    return doc


def read(path: str | Path) -> tuple[dict[str, Any], str]:
    """(document, sha256 of the bytes) of a forecast file, checked (InputError otherwise)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InputError(f"{p}: {e.strerror or e}") from None
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not a forecast file (not JSON: {e})") from None
    return check(doc, str(p)), hashlib.sha256(data).hexdigest()


def load_any(path: str | Path) -> LgbmResidual:
    """The file's model whether or not it beat the replica (the backtest evaluates it either way)."""
    doc, digest = read(path)
    try:
        return LgbmResidual(doc, digest)
    except Exception as e:  # LightGBM raises its own LightGBMError on a bad model string
        raise InputError(f"{path}: field models: not a LightGBM model ({e})") from None


def load(path: str | Path) -> LgbmResidual | None:
    """calc's model: the file's forecast if it beat the replica on held-out days, else None (calc then
    uses the replica with its historical error band). A bad file raises InputError naming the field."""
    model = load_any(path)
    return model if model.beats_replica else None


def file_id(path: str | Path) -> str:
    """`params load --kind forecast`'s validation: the file's id (lgbm:<sha256[:10]>)."""
    _, digest = read(path)
    load_any(path)
    return f"lgbm:{digest[:10]}"
