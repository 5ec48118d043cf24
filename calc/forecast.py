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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
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


def matrix(x: FeatureInputs) -> np.ndarray:
    """The model's input matrix, columns in FEATURES order (nan = not known: LightGBM's missing); a ratio
    over a replica (or vol99) that is not > 0 is not known."""
    out = np.empty((len(x), len(FEATURES)), dtype=np.float64)
    _fill(out, *(np.asarray(getattr(x, f), dtype=np.float64) for f in _FIELDS))
    return out


_FIELDS = (
    "replica",
    "var",
    "es",
    "stress",
    "margin_last_cycle",
    "margin_1h",
    "to_cycle_s",
    "horizon",
    "last_break",
    "mean_break5",
    "weekday",
    "month_end",
    "vol94",
    "vol97",
    "vol99",
)


@numba.njit(cache=True, nogil=True)
def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else np.nan


@numba.njit(cache=True, nogil=True)
def _fill(out, rep, var, es, stress, last, m1h, to_s, hor, brk, brk5, wd, me, v94, v97, v99):  # noqa: ANN001
    """One row per entry in FEATURES order (the one definition of the features)."""
    for i in range(out.shape[0]):
        r = rep[i]
        out[i, 0] = np.log1p(max(r, 0.0)) if not np.isnan(r) else np.nan
        out[i, 1] = _ratio(var[i], r)
        out[i, 2] = _ratio(es[i], r)
        out[i, 3] = _ratio(stress[i], r)
        out[i, 4] = _ratio(last[i], r) - 1.0
        out[i, 5] = _ratio(m1h[i], r) - 1.0
        out[i, 6] = to_s[i] / 3600.0
        out[i, 7] = hor[i]
        out[i, 8] = brk[i]
        out[i, 9] = brk5[i]
        out[i, 10] = wd[i]
        out[i, 11] = me[i]
        out[i, 12] = v94[i]
        out[i, 13] = v97[i]
        out[i, 14] = v99[i]
        out[i, 15] = _ratio(v94[i], v99[i])


MISSING_NONE, MISSING_ZERO, MISSING_NAN = 0, 1, 2
K_ZERO = 1e-35  # LightGBM's kZeroThreshold


@dataclass(frozen=True)
class Trees:
    """A LightGBM model's numerical trees as flat arrays (calc evaluates them in a numba kernel: the
    booster's own predict costs ~1 ms a call in ctypes and configuration). Node k: split on `feature[k]`
    at `threshold[k]`, children `left[k]` / `right[k]` (>= 0 a node, < 0 the leaf ~child), missing
    values by `missing[k]` and `default_left[k]`, as LightGBM's NumericalDecision."""

    roots: np.ndarray  # (T,) int64: the root node of each tree, or ~leaf for a one-leaf tree
    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    default_left: np.ndarray  # uint8
    missing: np.ndarray  # uint8: MISSING_NONE | MISSING_ZERO | MISSING_NAN
    leaf: np.ndarray  # leaf values

    @classmethod
    def of(cls, booster: Any) -> Trees:
        nodes: dict[str, list] = {k: [] for k in ("feature", "threshold", "left", "right", "dl", "miss")}
        leaves: list[float] = []
        roots: list[int] = []

        def walk(n: dict[str, Any]) -> int:
            if "leaf_value" in n:
                leaves.append(float(n["leaf_value"]))
                return ~(len(leaves) - 1)
            if n.get("decision_type", "<=") != "<=":
                raise InputError(f"forecast model: a {n['decision_type']!r} split (only numerical ones)")
            k = len(nodes["feature"])
            for key in nodes:
                nodes[key].append(0)
            nodes["feature"][k] = int(n["split_feature"])
            nodes["threshold"][k] = float(n["threshold"])
            nodes["dl"][k] = int(bool(n["default_left"]))
            nodes["miss"][k] = {"None": MISSING_NONE, "Zero": MISSING_ZERO, "NaN": MISSING_NAN}[
                n["missing_type"]
            ]
            nodes["left"][k] = walk(n["left_child"])
            nodes["right"][k] = walk(n["right_child"])
            return k

        for tree in booster.dump_model()["tree_info"]:
            roots.append(walk(tree["tree_structure"]))
        return cls(
            np.array(roots, dtype=np.int64),
            np.array(nodes["feature"], dtype=np.int64),
            np.array(nodes["threshold"], dtype=np.float64),
            np.array(nodes["left"], dtype=np.int64),
            np.array(nodes["right"], dtype=np.int64),
            np.array(nodes["dl"], dtype=np.uint8),
            np.array(nodes["miss"], dtype=np.uint8),
            np.array(leaves, dtype=np.float64),
        )

    def predict(self, m: np.ndarray) -> np.ndarray:
        return _predict_trees(
            np.ascontiguousarray(m, dtype=np.float64),
            self.roots,
            self.feature,
            self.threshold,
            self.left,
            self.right,
            self.default_left,
            self.missing,
            self.leaf,
        )


@numba.njit(cache=True, nogil=True)
def _predict_trees(m, roots, feature, threshold, left, right, default_left, missing, leaf):  # noqa: ANN001
    out = np.zeros(m.shape[0])
    for i in range(m.shape[0]):
        s = 0.0
        for r in roots:
            k = r
            while k >= 0:
                v = m[i, feature[k]]
                miss = missing[k]
                if miss == MISSING_NAN and np.isnan(v):
                    go_left = default_left[k] == 1
                elif miss == MISSING_ZERO and (np.isnan(v) or abs(v) <= K_ZERO):
                    go_left = default_left[k] == 1
                else:
                    if np.isnan(v):
                        v = 0.0
                    go_left = v <= threshold[k]
                k = left[k] if go_left else right[k]
            s += leaf[~k]
        out[i] = s
    return out


class LgbmResidual:
    """A ResidualModel (calc/projection.py) over two LightGBM boosters (alpha 0.5 and 0.95), evaluated by
    `Trees`; P95 is kept at or above P50."""

    def __init__(self, doc: dict[str, Any], digest: str) -> None:
        import lightgbm as lgb

        self.id = f"lgbm:{digest[:10]}"
        self.doc = doc
        self.beats_replica = bool(doc.get("beats_replica"))
        self.band = dict(doc.get("band") or {})
        self.p50 = lgb.Booster(model_str=doc["models"]["p50"])
        self.p95 = lgb.Booster(model_str=doc["models"]["p95"])
        self.trees50, self.trees95 = Trees.of(self.p50), Trees.of(self.p95)

    def quantiles(self, x: FeatureInputs) -> tuple[np.ndarray, np.ndarray]:
        if not len(x):
            return np.zeros(0), np.zeros(0)
        m = matrix(x)
        q50, q95 = self.trees50.predict(m), self.trees95.predict(m)
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
