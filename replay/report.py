"""Backtest report: a JSON file with every figure and a self-contained HTML page with inline SVG plots.

The HTML opens offline: no scripts, no external CSS, fonts or images; plots are SVG drawn here in Python.

API:
- `build_report(accuracy=None, coverage=None, predicted=None, meta=None, issues=()) -> dict`: the JSON
  document: {"meta", "accuracy": AccuracyResult.to_dict(), "coverage": CoverageResult.to_dict(),
  "predicted": per-account path summary (points, first/last time, min/max/last margin), "issues": all
  issue lines (the caller's, then accuracy's, then coverage's)}. NaN/inf become null; numpy scalars
  become plain numbers.
- `render_html(report, predicted=None, max_accounts=50, max_points=1500) -> str`: the page. Plots:
  predicted vs actual per account (the predicted path as a step line, downsampled to `max_points` by
  min/max per pixel bucket so spikes survive, and the actual calls as dots with the tolerance band; without
  `predicted`, the prediction at each call), exceptions over time (pooled cumulative exceptions against
  the expected count, and per account the P&L against -VaR with exceptions marked), and the distribution
  of percentage errors. Each plot is one `<figure class="plot">` holding one `<svg>`.
- `write_report(out_dir, name="backtest", **same as build_report) -> (json_path, html_path)`.
  `predicted` is the same {account: path} that accuracy.compare takes.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from replay.accuracy import DAY_NS, AccuracyResult, PathInput, as_path
from replay.coverage import CoverageResult

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 14, 40
COLORS = {
    "pred": "#1f5fbf",
    "actual": "#d9480f",
    "var": "#555",
    "pnl": "#2b8a3e",
    "exc": "#c92a2a",
    "expected": "#868e96",
    "bar": "#4c6ef5",
    "band": "#f08c00",
    "grid": "#e9ecef",
    "axis": "#495057",
}


# ------------------------------------------------------------------------------------------ JSON
def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats -> None, numpy -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_clean(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (dt.date, dt.datetime)):
        return obj.isoformat()
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _ns_iso(ns: int) -> str:
    return (dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(ns) // 1000)).isoformat() + "Z"


def build_report(
    accuracy: AccuracyResult | None = None,
    coverage: CoverageResult | None = None,
    predicted: Mapping[str, PathInput] | None = None,
    meta: Mapping[str, Any] | None = None,
    issues: Sequence[str] = (),
    forecast: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON document with every figure (see the module docstring)."""
    all_issues = list(issues)
    summary: dict[str, Any] = {}
    if predicted is not None:
        path_issues: list[str] = []
        for account, p in predicted.items():
            ts, vs = as_path(str(account), p, path_issues)
            summary[str(account)] = (
                {
                    "points": int(ts.size),
                    "first": _ns_iso(ts[0]),
                    "last": _ns_iso(ts[-1]),
                    "min": float(vs.min()),
                    "max": float(vs.max()),
                    "last_margin": float(vs[-1]),
                }
                if ts.size
                else {"points": 0}
            )
        if accuracy is None:
            all_issues += path_issues
    if accuracy is not None:
        all_issues += accuracy.issues
    if coverage is not None:
        all_issues += coverage.issues
    return _clean(
        {
            "meta": dict(meta or {}),
            "accuracy": accuracy.to_dict() if accuracy is not None else None,
            "coverage": coverage.to_dict() if coverage is not None else None,
            "predicted": summary,
            "forecast": dict(forecast) if forecast is not None else None,
            "issues": all_issues,
        }
    )


def write_json(path: str | Path, report: Mapping[str, Any]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_clean(dict(report)), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------------- SVG
def _nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    start = math.ceil(lo / step - 1e-9) * step
    out = []
    v = start
    while v <= hi + step * 1e-9:
        out.append(round(v, 12))
        v += step
    return out


NUMBER_UNITS = ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k"))  # (from, divisor, suffix)
TIME_UNITS = ((86400, 86400, " d"), (3600, 3600, " h"), (60, 60, " min"))


def _in_units(
    v: float, size: float, units: Sequence[tuple[float, float, str]], spec: str, base: str = ""
) -> str:
    """v in the first of `units` whose start `size` reaches, else as it is with the suffix `base`."""
    for start, divisor, suffix in units:
        if size >= start:
            return f"{v / divisor:{spec}}{suffix}"
    return f"{v:{spec}}{base}"


def _fmt_num(v: float) -> str:
    return _in_units(v, abs(v), NUMBER_UNITS, ".4g")


class _Axes:
    """Maps data to pixels inside the plot area and draws the frame, grid and tick labels."""

    def __init__(
        self,
        x0: float,
        x1: float,
        y0: float,
        y1: float,
        width: int = WIDTH,
        height: int = HEIGHT,
        integer: bool = False,
    ):
        self.integer = integer
        if not x1 > x0:
            x0, x1 = x0 - 0.5, x1 + 0.5
        if not y1 > y0:
            pad = abs(y0) * 0.05 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        pad = (y1 - y0) * 0.05
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0 - pad, y1 + pad
        self.w, self.h = width, height
        self.pw, self.ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(self, x: np.ndarray | float) -> np.ndarray | float:
        return LEFT + (np.asarray(x, dtype=np.float64) - self.x0) / (self.x1 - self.x0) * self.pw

    def py(self, y: np.ndarray | float) -> np.ndarray | float:
        return TOP + (1 - (np.asarray(y, dtype=np.float64) - self.y0) / (self.y1 - self.y0)) * self.ph

    def frame(self, xticks: list[tuple[float, str]], y_label: str) -> list[str]:
        out = []
        for v in _nice_ticks(self.y0, self.y1, integer=self.integer):
            if self.y0 <= v <= self.y1:
                y = float(self.py(v))
                out.append(
                    f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + self.pw}" y2="{y:.1f}" '
                    f'stroke="{COLORS["grid"]}"/>'
                )
                out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt_num(v)}</text>')
        for j, (v, label) in enumerate(xticks):
            x = float(self.px(v))
            anchor = (
                "start" if j == 0 and len(xticks) > 1 else "end" if j == len(xticks) - 1 and j else "middle"
            )
            out.append(
                f'<line x1="{x:.1f}" y1="{TOP + self.ph}" x2="{x:.1f}" y2="{TOP + self.ph + 4}" '
                f'stroke="{COLORS["axis"]}"/>'
            )
            out.append(
                f'<text x="{x:.1f}" y="{TOP + self.ph + 17}" text-anchor="{anchor}">'
                f"{html.escape(label)}</text>"
            )
        out.append(
            f'<rect x="{LEFT}" y="{TOP}" width="{self.pw}" height="{self.ph}" fill="none" '
            f'stroke="{COLORS["axis"]}"/>'
        )
        out.append(
            f'<text x="14" y="{TOP + self.ph / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 14 {TOP + self.ph / 2:.1f})">{html.escape(y_label)}</text>'
        )
        return out


def _svg(body: list[str], label: str, legend: Sequence[tuple[str, str]] = ()) -> str:
    items = []
    x = LEFT
    for color, text in legend:
        items.append(
            f'<rect x="{x}" y="{HEIGHT - 13}" width="10" height="10" fill="{color}"/>'
            f'<text x="{x + 14}" y="{HEIGHT - 4}">{html.escape(text)}</text>'
        )
        x += 24 + 7 * len(text)
    return (
        f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" '
        f'aria-label="{html.escape(label)}" font-family="sans-serif" font-size="11">'
        + "".join(body)
        + "".join(items)
        + "</svg>"
    )


def _polyline(xs: np.ndarray, ys: np.ndarray, color: str, width: float = 1.5, dash: str = "") -> str:
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs.tolist(), ys.tolist(), strict=True))
    d = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}"{d}/>'


def _time_ticks(t0: int, t1: int, n: int = 6) -> list[tuple[float, str]]:
    if t1 <= t0:
        return [(float(t0), _ns_iso(t0)[:16].replace("T", " "))]
    short = (t1 - t0) < 3 * DAY_NS
    out = []
    for i in range(n):
        t = t0 + (t1 - t0) * i / (n - 1)
        s = _ns_iso(int(t))
        out.append((float(t), s[5:16].replace("T", " ") if short else s[:10]))
    return out


def _downsample_step(
    ts: np.ndarray, vs: np.ndarray, t_end: int, buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Points of a step line: all steps if few, else first/min/max/last per time bucket (spikes kept)."""
    if ts.size == 0:
        return ts.astype(np.float64), vs
    if ts.size <= buckets:
        x = np.repeat(ts.astype(np.float64), 2)[1:]
        y = np.repeat(vs, 2)[:-1]
        return np.append(x, float(max(t_end, ts[-1]))), np.append(y, vs[-1])
    span = max(int(ts[-1] - ts[0]), 1)
    b = np.minimum((ts - ts[0]).astype(np.float64) / span * buckets, buckets - 1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
    ends = np.r_[starts[1:], ts.size] - 1
    mins = np.minimum.reduceat(vs, starts)
    maxs = np.maximum.reduceat(vs, starts)
    xt = ts[starts].astype(np.float64)
    x = np.repeat(xt, 4)
    y = np.stack([vs[starts], mins, maxs, vs[ends]], axis=1).ravel()
    return np.append(x, float(max(t_end, ts[-1]))), np.append(y, vs[-1])


def svg_predicted_vs_actual(
    account: str,
    calls: Sequence[Mapping[str, Any]],
    tolerance: float,
    path: tuple[np.ndarray, np.ndarray] | None = None,
    max_points: int = 1500,
) -> str:
    """Predicted margin (step line) and actual calls (dots, with the tolerance band) for one account."""
    ct = np.array([c["call_time_ns"] for c in calls], dtype=np.int64)
    ca = np.array([c["actual"] for c in calls], dtype=np.float64)
    cp = np.array([c["predicted"] for c in calls], dtype=np.float64)
    ts, vs = path if path is not None else (np.empty(0, np.int64), np.empty(0))
    times = np.concatenate([ts, ct]) if ts.size or ct.size else np.array([0], dtype=np.int64)
    t0, t1 = int(times.min()), int(times.max())
    px, py = _downsample_step(ts, vs, t1, max_points // 4)
    ys = (
        np.concatenate([vs, ca * (1 + tolerance), ca * (1 - tolerance), cp])
        if (vs.size or ca.size)
        else np.zeros(1)
    )
    ax = _Axes(t0, t1, float(ys.min()), float(ys.max()))
    body = ax.frame(_time_ticks(t0, t1), "margin")
    if px.size:
        body.append(_polyline(ax.px(px), ax.py(py), COLORS["pred"]))
    elif ct.size:
        order = np.argsort(ct)
        body.append(_polyline(ax.px(ct[order]), ax.py(cp[order]), COLORS["pred"], dash="4 3"))
    for t, a, p, c in zip(ct.tolist(), ca.tolist(), cp.tolist(), calls, strict=True):
        x = float(ax.px(t))
        y_hi, y_lo = float(ax.py(a * (1 + tolerance))), float(ax.py(a * (1 - tolerance)))
        body.append(
            f'<line x1="{x:.1f}" y1="{y_hi:.1f}" x2="{x:.1f}" y2="{y_lo:.1f}" stroke="{COLORS["band"]}" '
            f'stroke-width="3" opacity="0.5"/>'
        )
        tip = html.escape(f"{c['date']}: actual {a:,.2f}, predicted {p:,.2f}")
        body.append(
            f'<circle cx="{x:.1f}" cy="{float(ax.py(a)):.1f}" r="3.5" fill="{COLORS["actual"]}">'
            f"<title>{tip}</title></circle>"
        )
    legend = [
        (COLORS["pred"], "predicted" if px.size else "predicted at call"),
        (COLORS["actual"], "actual call"),
        (COLORS["band"], f"\u00b1{tolerance:.0%} band"),
    ]
    return _svg(body, f"predicted vs actual margin, account {account}", legend)


def _date_ticks(dates: Sequence[str], n: int = 6) -> list[tuple[float, str]]:
    if not dates:
        return []
    idx = sorted({int(round(i)) for i in np.linspace(0, len(dates) - 1, min(n, len(dates)))})
    return [(float(i), str(dates[i])) for i in idx]


def svg_pnl_vs_var(account: str, daily: Mapping[str, Any]) -> str:
    """Realised P&L per day (dots; exceptions red) against the loss threshold -VaR (line)."""
    dates = list(daily["date"])
    pnl = np.array([np.nan if v is None else v for v in daily["pnl"]], dtype=np.float64)
    var = np.array([np.nan if v is None else v for v in daily["var"]], dtype=np.float64)
    exc = np.array(daily["exception"], dtype=bool)
    x = np.arange(len(dates), dtype=np.float64)
    vals = np.concatenate([pnl, -var])
    vals = vals[np.isfinite(vals)]
    ax = _Axes(
        0,
        max(len(dates) - 1, 1),
        float(vals.min()) if vals.size else 0,
        float(vals.max()) if vals.size else 1,
    )
    body = ax.frame(_date_ticks(dates), "P&L")
    if x.size:
        body.append(_polyline(ax.px(x), ax.py(-var), COLORS["var"], 1.2))
        for i in np.flatnonzero(~exc):
            body.append(
                f'<circle cx="{float(ax.px(x[i])):.1f}" cy="{float(ax.py(pnl[i])):.1f}" r="1.8" '
                f'fill="{COLORS["pnl"]}"/>'
            )
        for i in np.flatnonzero(exc):
            tip = html.escape(f"{dates[i]}: P&L {pnl[i]:,.2f} beyond VaR {var[i]:,.2f}")
            body.append(
                f'<circle cx="{float(ax.px(x[i])):.1f}" cy="{float(ax.py(pnl[i])):.1f}" r="4" '
                f'fill="{COLORS["exc"]}"><title>{tip}</title></circle>'
            )
    return _svg(
        body,
        f"P&L against VaR, account {account}",
        [(COLORS["pnl"], "P&L"), (COLORS["var"], "-VaR"), (COLORS["exc"], "exception")],
    )


def svg_cumulative_exceptions(daily: Mapping[str, Mapping[str, Any]], p: float) -> str:
    """Exceptions summed over accounts, cumulative by date, against the expected p x account-days."""
    per_date: dict[str, list[int]] = {}
    for d in daily.values():
        for date, e in zip(d["date"], d["exception"], strict=True):
            c = per_date.setdefault(str(date), [0, 0])
            c[0] += int(bool(e))
            c[1] += 1
    dates = sorted(per_date)
    exc = np.cumsum([per_date[d][0] for d in dates]) if dates else np.zeros(0)
    exp = np.cumsum([per_date[d][1] * p for d in dates]) if dates else np.zeros(0)
    x = np.arange(len(dates), dtype=np.float64)
    top = float(max(exc.max() if exc.size else 0, exp.max() if exp.size else 0, 1))
    ax = _Axes(0, max(len(dates) - 1, 1), 0, top, integer=True)
    body = ax.frame(_date_ticks(dates), "exceptions (cumulative)")
    if x.size:
        body.append(_polyline(ax.px(x), ax.py(exp), COLORS["expected"], dash="5 4"))
        sx = np.repeat(x, 2)[1:]
        sy = np.repeat(exc, 2)[:-1]
        body.append(_polyline(ax.px(sx), ax.py(sy), COLORS["exc"], 2))
    return _svg(
        body,
        "cumulative exceptions over time, all accounts",
        [(COLORS["exc"], "exceptions"), (COLORS["expected"], f"expected ({p:.2%} of account-days)")],
    )


def svg_error_histogram(pct_errors: Sequence[float], tolerance: float, bins: int = 30) -> str:
    """Histogram of (predicted - actual) / actual in percent, with the tolerance band marked."""
    e = np.array([v for v in pct_errors if v is not None and math.isfinite(v)], dtype=np.float64)
    tol = tolerance * 100
    lo = float(min(e.min(), -tol)) if e.size else -tol
    hi = float(max(e.max(), tol)) if e.size else tol
    edges = np.linspace(lo, hi, bins + 1)
    counts = np.histogram(e, bins=edges)[0] if e.size else np.zeros(bins, dtype=np.int64)
    ax = _Axes(lo, hi, 0, float(max(counts.max(), 1)), integer=True)
    ax.y0 = 0.0  # bars start at zero
    body = ax.frame([(v, f"{v:g}%") for v in _nice_ticks(lo, hi, 8) if lo <= v <= hi], "calls")
    base = float(ax.py(0))
    for c, a, b in zip(counts.tolist(), edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if c:
            x0, x1, y = float(ax.px(a)), float(ax.px(b)), float(ax.py(c))
            body.append(
                f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                f'height="{base - y:.1f}" fill="{COLORS["bar"]}">'
                f"<title>{a:.2f}% to {b:.2f}%: {c}</title></rect>"
            )
    for v in (-tol, tol):
        x = float(ax.px(v))
        body.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ax.ph}" stroke="{COLORS["band"]}" '
            f'stroke-dasharray="4 3"/>'
        )
    return _svg(
        body,
        "distribution of prediction errors",
        [(COLORS["bar"], "calls per error bucket"), (COLORS["band"], f"\u00b1{tolerance:.0%}")],
    )


# ------------------------------------------------------------------------------------------ HTML
CSS = (
    "body{font-family:sans-serif;margin:24px;color:#212529;max-width:1100px}\n"
    "h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #dee2e6}\n"
    "table{border-collapse:collapse;font-size:13px;margin:8px 0}"
    "td,th{border:1px solid #dee2e6;padding:3px 8px;text-align:right}\n"
    "th{background:#f1f3f5}td.l,th.l{text-align:left}figure{margin:12px 0}"
    "figcaption{font-weight:bold;font-size:13px}\n"
    ".green{background:#d3f9d8}.yellow{background:#fff3bf}.red{background:#ffc9c9}"
    ".issues li{font-family:monospace;font-size:12px}\n"
    ".note{color:#868e96;font-size:12px}.verdict{font-size:15px;font-weight:bold}\n"
    "details.meta{margin-top:32px}details.meta summary{cursor:pointer;font-size:14px}"
)


def _v(x: Any, digits: int = 2, pct: bool = False) -> str:
    if x is None:
        return "\u2013"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}{'%' if pct else ''}" if isinstance(x, float) else f"{x:,}"
    return html.escape(str(x))


def _duration(s: float | None) -> str:
    return "\u2013" if s is None else _in_units(s, s, TIME_UNITS, ".1f", " s")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], cls: Sequence[str] = ()) -> str:
    h = "".join(
        f'<th class="l">{html.escape(c)}</th>' if i == 0 else f"<th>{html.escape(c)}</th>"
        for i, c in enumerate(head)
    )
    body = []
    for j, r in enumerate(rows):
        klass = f' class="{cls[j]}"' if j < len(cls) and cls[j] else ""
        body.append(
            f"<tr{klass}>"
            + "".join(f'<td class="l">{c}</td>' if i == 0 else f"<td>{c}</td>" for i, c in enumerate(r))
            + "</tr>"
        )
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def _figure(caption: str, svg: str) -> str:
    return f'<figure class="plot"><figcaption>{html.escape(caption)}</figcaption>{svg}</figure>'


def _accuracy_row(name: str, m: Mapping[str, Any], with_account: bool = False) -> list[str]:
    w = m.get("worst_under")
    where = f"{w['account']}, {w['date']}" if w and with_account else w["date"] if w else ""
    worst = f"{_v(w['shortfall'])} ({html.escape(where)})" if w else "none"
    return [
        html.escape(name),
        _v(m["calls"]),
        _v(m["mae"]),
        _v(m["mape_pct"], pct=True),
        _v(m["bias"]),
        _v(m["rmse"]),
        worst,
        _v(m["hit_rate"] * 100 if m["hit_rate"] is not None else None, 1, pct=True),
        _duration(m["lead_time_median_s"]),
        _duration(m["lead_time_min_s"]),
    ]


def _coverage_row(name: str, s: Mapping[str, Any]) -> list[str]:
    k, i, c, tl = s["kupiec"], s["independence"], s["conditional_coverage"], s["traffic_light"]
    return [
        html.escape(name),
        _v(s["days"]),
        _v(s["exceptions"]),
        _v(s["expected"]),
        f"{_v(k['statistic'], 3)} / {_v(k['p_value'], 4)}",
        f"{_v(i['statistic'], 3)} / {_v(i['p_value'], 4)}",
        f"{_v(c['statistic'], 3)} / {_v(c['p_value'], 4)}",
        f"{html.escape(tl['zone'])} (green \u2264 {tl['green_max']}, yellow \u2264 {tl['yellow_max']})",
    ]


# ------------------------------------------------------------------------------ the forecast of the call
METHOD_NAMES = {
    "forecast": "forecast (replica + learned residual)",
    "replica": "replica alone",
    "replica_band": "replica + its historical error band",
    "persistence": "persistence (the last call)",
}
METHOD_COLORS = {
    "forecast": "#1f5fbf",
    "replica": "#868e96",
    "replica_band": "#f08c00",
    "persistence": "#2b8a3e",
}


def verdict(fc: Mapping[str, Any]) -> str:
    """One plain sentence: did the forecast beat replica-alone on held-out MAE."""
    cmp = fc["comparison"]
    days = cmp.get("test_days") or []
    span = f" on {days[2]} held-out days ({days[0]}..{days[1]})" if len(days) == 3 else ""
    if cmp.get("beats_replica"):
        return f"The forecast beat replica-alone on MAE at every horizon{span}."
    lost = [h for h, b in (cmp.get("beats_replica_by_horizon") or {}).items() if not b]
    return (
        f"The forecast did NOT beat replica-alone on MAE{span} (not at: {', '.join(lost) or 'any'}); "
        "calc would use the replica with its historical error band."
    )


def headline(
    acc: Mapping[str, Any] | None, cov: Mapping[str, Any] | None, fc: Mapping[str, Any] | None
) -> list[str]:
    """What a treasurer reads first: per account the forecast's error, its coverage zone, the worst miss."""
    names = sorted(
        set((fc or {}).get("comparison", {}).get("accounts", {}))
        | set((acc or {}).get("accounts", {}))
        | set((cov or {}).get("accounts", {}))
    )
    if not names:
        return []
    out = ["<h2>Headline</h2>"]
    if fc is not None:
        out.append(f'<p class="verdict">{html.escape(verdict(fc))}</p>')
    rows, zones = [], []
    for a in names:
        f = ((fc or {}).get("comparison", {}).get("accounts", {}).get(a) or {}).get("forecast")
        r = ((fc or {}).get("comparison", {}).get("accounts", {}).get(a) or {}).get("replica")
        z = ((cov or {}).get("accounts", {}).get(a) or {}).get("traffic_light", {}).get("zone", "")
        m = (acc or {}).get("accounts", {}).get(a) or {}
        if f and f.get("worst_under") is not None:
            worst = _v(-f["worst_under"]) if f["worst_under"] < 0 else "none"
        else:
            w = m.get("worst_under")
            worst = f"{_v(w['shortfall'])} ({html.escape(w['date'])})" if w else "none"
        rows.append(
            [
                html.escape(a),
                _v(f["mae"]) if f else "\u2013",
                _v(f["mape_pct"], pct=True) if f else _v(m.get("mape_pct"), pct=True),
                _v(r["mae"]) if r else "\u2013",
                _v(f["coverage95"] * 100, 1, pct=True) if f and f["coverage95"] is not None else "\u2013",
                html.escape(z or "\u2013"),
                worst,
            ]
        )
        zones.append(z)
    out.append(
        _table(
            [
                "account",
                "forecast MAE",
                "forecast MAPE",
                "replica-alone MAE",
                "P95 coverage",
                "VaR coverage zone",
                "worst miss (under-prediction)",
            ],
            rows,
            zones,
        )
    )
    out.append(
        '<p class="note">Forecast figures: held-out days, every lead time and horizon pooled; P95 coverage '
        "is the share of calls at or below the forecast's P95 (95% expected). The coverage zone is the VaR "
        "backtest's Basel zone (below).</p>"
    )
    return out


def forecast_section(fc: Mapping[str, Any], max_accounts: int = 50) -> list[str]:
    """Per horizon: each method's MAE, MAPE, bias and P95 coverage; the band vs the actual calls over time
    per account; the error by lead time."""
    cmp = fc["comparison"]
    out = ["<h2>Forecast of the call, held-out days</h2>", f"<p>{html.escape(verdict(fc))}</p>"]
    rows = []
    for h, by in cmp["horizons"].items():
        for meth in METHOD_NAMES:
            m = by.get(meth)
            if m is None:
                continue
            rows.append(
                [
                    html.escape(h),
                    html.escape(METHOD_NAMES[meth]),
                    _v(m["n"]),
                    _v(m["mae"]),
                    _v(m["mape_pct"], pct=True),
                    _v(m["bias"]),
                    _v(m["coverage95"] * 100 if m["coverage95"] is not None else None, 1, pct=True),
                ]
            )
    out.append(_table(["horizon", "method", "entries", "MAE", "MAPE", "bias", "P95 coverage"], rows))
    out.append(
        f'<p class="note">model: {html.escape(str(fc.get("model", "")))}. Entries: the forecasts taken '
        "every 15 min of the session and 15 min, 1 h and 2 h before each cycle, against the cycle&#39;s "
        "actual requirement.</p>"
    )
    if cmp.get("by_lead"):
        out.append(_figure("Error by lead time (MAE, all horizons)", svg_error_by_lead(cmp["by_lead"])))
    for a, ser in list((fc.get("series") or {}).items())[:max_accounts]:
        out.append(_figure(f"Forecast band vs actual calls, 1 h before each cycle: {a}", svg_band(a, ser)))
    return out


def svg_band(account: str, ser: Mapping[str, Sequence[float]]) -> str:
    """The P50..P95 band (shaded) and P50 line 1 h ahead, the replica (dashed), the actual calls (dots)."""
    t = np.asarray(ser["t"], dtype=np.float64)
    act, p50, p95 = (np.asarray(ser[k], dtype=np.float64) for k in ("actual", "p50", "p95"))
    rep = np.asarray(ser["replica"], dtype=np.float64)
    if not t.size:
        return _svg([], f"forecast band, account {account}")
    ys = np.concatenate([act, p50, p95, rep])
    ax = _Axes(float(t.min()), float(t.max()), float(ys.min()), float(ys.max()))
    body = ax.frame(_time_ticks(int(t.min()), int(t.max())), "requirement")
    xs = ax.px(t)
    poly = " ".join(
        f"{x:.1f},{y:.1f}"
        for x, y in [
            *zip(xs.tolist(), ax.py(p95).tolist(), strict=True),
            *zip(xs[::-1].tolist(), ax.py(p50)[::-1].tolist(), strict=True),
        ]
    )
    body.append(f'<polygon points="{poly}" fill="{COLORS["pred"]}" opacity="0.18"/>')
    body.append(_polyline(xs, ax.py(p50), COLORS["pred"]))
    body.append(_polyline(xs, ax.py(rep), COLORS["expected"], 1.0, "4 3"))
    for x, y in zip(xs.tolist(), ax.py(act).tolist(), strict=True):
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{COLORS["actual"]}"/>')
    legend = [
        (COLORS["pred"], "forecast P50 (band to P95)"),
        (COLORS["expected"], "replica"),
        (COLORS["actual"], "actual"),
    ]
    return _svg(body, f"forecast band vs actual calls, account {account}", legend)


def _lead_label(key: str) -> str:
    lo, _, hi = key.partition("-")
    return f"{_duration(float(lo))}-{_duration(float(hi))}" if hi else f"> {_duration(float(lo))}"


def svg_error_by_lead(by_lead: Mapping[str, Mapping[str, float | None]]) -> str:
    """MAE of each method per lead-time bucket (lines over the buckets)."""
    keys = list(by_lead)
    vals = [v for k in keys for v in by_lead[k].values() if v is not None]
    ax = _Axes(0, max(len(keys) - 1, 1), 0.0, max(vals) if vals else 1.0)
    body = ax.frame([(float(i), _lead_label(k)) for i, k in enumerate(keys)], "MAE")
    legend = []
    for meth, color in METHOD_COLORS.items():
        pts = [(i, by_lead[k].get(meth)) for i, k in enumerate(keys)]
        pts = [(i, v) for i, v in pts if v is not None]
        if not pts:
            continue
        xs, ys = np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)
        body.append(_polyline(ax.px(xs), ax.py(ys), color))
        for x, y in zip(ax.px(xs).tolist(), ax.py(ys).tolist(), strict=True):
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        legend.append((color, meth))
    return _svg(body, "forecast error by lead time", legend)


def render_html(
    report: Mapping[str, Any],
    predicted: Mapping[str, PathInput] | None = None,
    max_accounts: int = 50,
    max_points: int = 1500,
) -> str:
    """The self-contained HTML page for a report dict from build_report (plots as inline SVG)."""
    meta = report.get("meta") or {}
    acc = report.get("accuracy")
    cov = report.get("coverage")
    title = f" \u2013 {html.escape(str(meta['title']))}" if meta.get("title") else ""
    parts = [f"<h1>marginflow backtest{title}</h1>"]
    fc = report.get("forecast")
    parts += headline(acc, cov, fc)
    if fc is not None:
        parts += forecast_section(fc, max_accounts)
    paths: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if predicted is not None:
        sink: list[str] = []
        paths = {str(a): as_path(str(a), p, sink) for a, p in predicted.items()}

    if acc is not None:
        tol = float(acc["tolerance"])
        parts.append("<h2>Predicted vs actual margin calls</h2>")
        names = sorted(acc["accounts"])
        parts.append(
            _table(
                [
                    "account",
                    "calls",
                    "MAE",
                    "MAPE",
                    "bias",
                    "RMSE",
                    "worst under-prediction",
                    f"within {tol:.0%}",
                    "lead time (median)",
                    "lead time (min)",
                ],
                [_accuracy_row(a, acc["accounts"][a]) for a in names]
                + [_accuracy_row("all accounts", acc["overall"], True)],
            )
        )
        parts.append(
            '<p class="note">error = predicted - actual; bias &gt; 0 is over-prediction. Lead time: how '
            f"long before the call the prediction had been continuously within {tol:.0%} of it.</p>"
        )
        by_acct: dict[str, list[Mapping[str, Any]]] = {}
        for c in acc["calls"]:
            by_acct.setdefault(c["account"], []).append(c)
        shown = names[:max_accounts]
        for a in shown:
            parts.append(
                _figure(
                    f"Predicted vs actual: {a}",
                    svg_predicted_vs_actual(a, by_acct.get(a, []), tol, paths.get(a), max_points),
                )
            )
        if len(names) > len(shown):
            parts.append(f'<p class="note">{len(names) - len(shown)} more accounts are in the JSON file.</p>')
        parts.append("<h2>Error distribution</h2>")
        parts.append(
            _figure(
                "Prediction error, % of the actual call",
                svg_error_histogram([c["pct_error"] for c in acc["calls"]], tol),
            )
        )

    if cov is not None:
        p = float(cov["p"])
        parts.append(f"<h2>VaR coverage ({1 - p:.1%} confidence)</h2>")
        names = sorted(cov["accounts"])
        rows = [_coverage_row(a, cov["accounts"][a]) for a in names]
        zones = [cov["accounts"][a]["traffic_light"]["zone"] for a in names]
        if cov.get("pooled"):
            rows.append(_coverage_row("all accounts (pooled)", cov["pooled"]))
            zones.append(cov["pooled"]["traffic_light"]["zone"])
        parts.append(
            _table(
                [
                    "account",
                    "days",
                    "exceptions",
                    "expected",
                    "Kupiec LR / p",
                    "independence LR / p",
                    "cond. coverage LR / p",
                    "Basel zone",
                ],
                rows,
                zones,
            )
        )
        parts.append(
            '<p class="note">Kupiec and independence: chi-square 1 dof; conditional coverage: 2 dof. '
            "Basel zones: yellow from the count whose binomial probability P(X &le; x) reaches 95%, red "
            "from 99.99% (green 0-4, yellow 5-9, red 10+ in 250 days at 99%); the bounds shown are for "
            "each row&#39;s number of days; below 250 days the zone is indicative.</p>"
        )
        daily = cov.get("daily") or {}
        if daily:
            parts.append(_figure("Exceptions over time, all accounts", svg_cumulative_exceptions(daily, p)))
        shown = names[:max_accounts]
        for a in shown:
            if a in daily:
                parts.append(_figure(f"P&L vs VaR: {a}", svg_pnl_vs_var(a, daily[a])))

    issues = report.get("issues") or []
    parts.append("<h2>Input issues</h2>")
    parts.append(
        '<ul class="issues">' + "".join(f"<li>{html.escape(str(i))}</li>" for i in issues) + "</ul>"
        if issues
        else "<p>none</p>"
    )
    if meta:
        rows = [[html.escape(str(k)), html.escape(str(v))] for k, v in meta.items() if k != "title"]
        parts.append(
            '<details class="meta"><summary>Run metadata (dates, parameter ids, counts)</summary>'
            + _table(["item", "value"], rows)
            + "</details>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>marginflow backtest</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def write_report(
    out_dir: str | Path,
    name: str = "backtest",
    accuracy: AccuracyResult | None = None,
    coverage: CoverageResult | None = None,
    predicted: Mapping[str, PathInput] | None = None,
    meta: Mapping[str, Any] | None = None,
    issues: Sequence[str] = (),
    max_accounts: int = 50,
    forecast: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.json and <out_dir>/<name>.html; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(accuracy, coverage, predicted, meta, issues, forecast)
    jp = write_json(out / f"{name}.json", rep)
    hp = out / f"{name}.html"
    hp.write_text(render_html(rep, predicted, max_accounts), encoding="utf-8")
    return jp, hp
