"""The engine's output: its kernel state's numbers read out as margin rows (one per account whose numbers
moved since it last published) and the alert rows those rows raise or clear, as columns of the `margin`
and `alert` tables (schemas/tables.py). MarginEngine.changed_rows / snapshot / take_alerts call these
after a refresh; they read the engine's publish state: `_changed` (numbers moved since the last
changed_rows), `_published` (margin, var, es, stress, collateral last published), `_force` (publish even
if unmoved: new parameters).

A row is never published with a non-finite number: such an account (still not finite after the full
recompute of the kernel step) is withheld, counted in `eng.withheld` and in the engine's rejects.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from calc.kernels import R_ES, R_MARGIN, R_STRESS, R_VAR
from schemas.calc import AlertColumns, MarginColumns
from schemas.tables import TABLES

if TYPE_CHECKING:
    from calc.engine import MarginEngine

log = logging.getLogger("marginflow.calc.engine")
MARGIN_COLUMNS = [c.name for c in TABLES["margin"].input_columns]
ALERT_COLUMNS = [c.name for c in TABLES["alert"].input_columns]


def _components(c: object) -> str:
    return "{}" if c is None else msgspec.json.encode(c).decode()


def margin_rows(
    eng: MarginEngine, acc: np.ndarray, change: list[float], drivers: bool = True
) -> MarginColumns:
    """The margin rows of accounts `acc` (`change`: each margin's move since its last published row);
    drivers=False leaves the drivers column "[]". Columns are read out whole (one list per column, no
    per-row objects: 10,000 rows are a publish at CCP scale)."""
    acc_l = acc.tolist()
    k = len(acc_l)
    res = eng.st.res[acc]
    margin, collateral = res[:, R_MARGIN], eng.collateral[acc]
    specs, ext, comp = eng.specs, eng.external, eng.ext.components
    models = [specs[a].model for a in acc_l]
    pid = {m: getattr(ext[m], "param_id", eng.param_id) if m in ext else eng.param_id for m in set(models)}
    values: MarginColumns = {
        "account": [eng.accounts[a] for a in acc_l],
        "model": models,
        "margin": margin.tolist(),
        "var": res[:, R_VAR].tolist(),
        "es": res[:, R_ES].tolist(),
        "stress": np.maximum(res[:, R_STRESS], 0.0).tolist(),
        "collateral": collateral.tolist(),
        "utilisation": (margin / collateral).tolist(),
        "change": change,
        "drivers": eng._drivers_json(acc) if drivers else ["[]"] * k,
        "components": [_components(comp.get(a)) for a in acc_l] if comp else ["{}"] * k,
        "last_seq": [eng.last_seq] * k,
        "param_id": [pid[m] for m in models],
    }
    if list(values) != MARGIN_COLUMNS:
        raise AssertionError(f"engine's margin columns {list(values)} are not the table's {MARGIN_COLUMNS}")
    return values


def snapshot(eng: MarginEngine) -> MarginColumns:
    """Current margin rows of all accounts with finite numbers (change = since the last published row),
    without marking anything published."""
    acc = finite(eng, np.arange(len(eng.accounts)))
    prev = np.nan_to_num(eng._published[acc, 0], nan=0.0)
    return margin_rows(eng, acc, (eng.margin[acc] - prev).tolist())


def published_numbers(eng: MarginEngine, acc: np.ndarray) -> np.ndarray:
    """(len(acc), 5) the numbers a row publishes and `_published` keeps: margin, var, es, stress (>= 0),
    collateral."""
    res = eng.st.res[acc]
    cur = np.empty((len(acc), 5))
    cur[:, 0], cur[:, 1], cur[:, 2] = res[:, R_MARGIN], res[:, R_VAR], res[:, R_ES]
    cur[:, 3] = np.maximum(res[:, R_STRESS], 0.0)
    cur[:, 4] = eng.collateral[acc]
    return cur


def changed_rows(eng: MarginEngine, drivers: bool = True) -> MarginColumns:
    """The rows of the accounts whose margin, VaR, ES, stress or collateral differ from their last
    published row (or that must republish); marks them published and queues them for the alert rules."""
    cand = np.flatnonzero(eng._changed)
    eng._changed[cand] = False
    cur, prev = published_numbers(eng, cand), eng._published[cand]
    ok = np.isfinite(cur).all(axis=1)
    for i in np.flatnonzero(~ok).tolist():  # still not finite after a full recompute: never published
        withhold(eng, int(cand[i]), cur[i].tolist())
    # never published: prev holds NaNs, unequal to anything
    keep = ok & ((cur != prev).any(axis=1) | eng._force[cand])
    eng._force[cand] = False
    acc, cur, prev0 = cand[keep], cur[keep], prev[keep, 0]
    eng._published[acc] = cur
    change = np.where(np.isnan(prev0), cur[:, 0], cur[:, 0] - prev0).tolist()
    rows = margin_rows(eng, acc, change, drivers)
    if eng.alerts.rules:
        evaluate_alerts(eng)  # rows of an earlier call nobody took alerts for: in order, before these
        eng._unevaluated = list(
            zip(
                rows["account"],
                rows["margin"],
                rows["collateral"],
                [eng.now] * len(acc),
                rows["last_seq"],
                strict=True,
            )
        )
    return rows


def withhold(eng: MarginEngine, a: int, cur: list[float]) -> None:
    """Account a's row withheld: its numbers `cur` are not finite; counted, rejected, logged."""
    eng.withheld += 1
    why = f"account {eng.accounts[a]!r}: margin {cur[0]!r}, var {cur[1]!r}, es {cur[2]!r}, stress {cur[3]!r}"
    eng._reject("margin", eng.last_seq, f"{why}: not finite after a full recompute; row withheld")
    log.error("%s: not finite after a full recompute; row withheld", why)


def finite(eng: MarginEngine, acc: np.ndarray) -> np.ndarray:
    """The accounts of `acc` whose margin numbers are all finite (the others are never published)."""
    ok = np.isfinite(eng.st.res[acc][:, [R_MARGIN, R_VAR, R_ES, R_STRESS]]).all(axis=1)
    return acc if ok.all() else acc[ok]


def evaluate_alerts(eng: MarginEngine) -> None:
    """The alert rules (calc/alerts.py) run on the rows published and not yet evaluated, in order."""
    for account, margin, collateral, now, seq in eng._unevaluated:
        eng._alert_rows += eng.alerts.evaluate(account, margin, collateral, now, seq)
    eng._unevaluated = []


def take_alerts(eng: MarginEngine) -> AlertColumns:
    """The alert rows waiting (rule alerts of the published rows, data alerts of the price band) as
    columns of the alert table; none wait after."""
    evaluate_alerts(eng)
    rows = eng._alert_rows.copy()
    eng._alert_rows.clear()  # (in place: the price band appends to the same list)
    return {c: [r[c] for r in rows] for c in ALERT_COLUMNS}
