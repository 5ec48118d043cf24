"""`marginflow margin`: one-shot margin for a positions file with the streaming engine's kernels
(var, hvar, stress from a price history or covariance file; span from a SPAN parameter file), or with
full revaluation of options (--instruments) under plain HS (`--model hvar`) or a CCP model
([[calc.ccp_models]], calc/ccp/), `--compare` showing every configured CCP model beside hvar.

Bad input (unknown sym, missing column, NaN price, empty history, confidence outside (0,1)) exits
with status 2 and one line on stderr naming the field and the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from calc.history import InputError, load_covariance, load_latest_prices, load_prices
from calc.models import RiskParams, check_confidence, check_lambda, params_from_history
from schemas.tables import BUILTIN_MODELS

PROG = "marginflow margin"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--positions", required=True, help="CSV/Parquet: account,sym,qty[,multiplier][,price]")
    p.add_argument(
        "--model",
        help=f"{', '.join([*BUILTIN_MODELS, 'span'])} or a [[calc.ccp_models]] name (unless --compare)",
    )
    p.add_argument("--instruments", help="instrument master CSV: full revaluation of options (calc/ccp/)")
    p.add_argument("--vol-surface", help="implied vols underlying,expiry,moneyness,vol (default: each `vol`)")
    p.add_argument(
        "--as-of", help="valuation date YYYY-MM-DD: spots are the history's closes on it (default: last)"
    )
    p.add_argument(
        "--vol-scenarios",
        choices=["none", "proxy"],
        help="options' implied vol in the scenarios (default: calc.vol_scenarios)",
    )
    p.add_argument("--quotes", help="sym,bid,ask[,adv]: live spreads and volumes for the CCP add-ons")
    p.add_argument(
        "--compare",
        action="store_true",
        help="every configured CCP model and hvar side by side, with components",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--history",
        help="daily closes: wide (Date + one column per sym) or long (date,sym,close); CSV, CSV.gz, Parquet",
    )
    src.add_argument("--covariance", help="square CSV of daily return covariances with sym headers")
    p.add_argument("--span-file", help="SPAN XML risk parameter file (--model span)")
    p.add_argument("--prices", help="latest prices: sym,price, or a price history whose last row is used")
    p.add_argument(
        "--confidence",
        type=float,
        help="VaR/ES confidence, strictly between 0 and 1 (default 0.99; a CCP model's own)",
    )
    p.add_argument("--horizon-days", type=int, help="holding period in days (default 1; a CCP model's own)")
    p.add_argument("--lookback-days", type=int, default=None, help="daily returns used (default: all rows)")
    p.add_argument(
        "--ewma-lambda",
        type=float,
        default=0.0,
        help="0 = equal-weight covariance, e.g. 0.94 = RiskMetrics EWMA",
    )
    p.add_argument(
        "--filtered", action="store_true", help="historical simulation with EWMA volatility filtering"
    )
    p.add_argument(
        "--filter-lambda", type=float, default=0.94, help="EWMA decay for --filtered (default 0.94)"
    )
    p.add_argument(
        "--config", help="config file for stress scenarios, sectors and hvar_margin (default: the project's)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def _span(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from calc.span.oneshot import span_accounts
    except ImportError:
        raise InputError(
            "--model span: the SPAN one-shot (calc/span/oneshot.py: span_accounts) is not available"
        ) from None
    if not args.span_file:
        raise InputError("--model span needs --span-file (a SPAN XML risk parameter file)")
    return span_accounts(args.span_file, args.positions)


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON document for parsed arguments; raises InputError on bad input."""
    from calc.engine import MarginEngine
    from calc.inputs import AccountSpec, load_positions
    from marginflow import config

    if args.confidence is not None:
        check_confidence(args.confidence, "--confidence")
    if args.horizon_days is not None and args.horizon_days < 1:
        raise InputError(f"--horizon-days: must be >= 1, got {args.horizon_days}")
    if args.lookback_days is not None and args.lookback_days < 1:
        raise InputError(f"--lookback-days: must be >= 1, got {args.lookback_days}")
    check_lambda(args.ewma_lambda, "--ewma-lambda")
    if not (args.model or args.compare):
        raise InputError("--model: required (or --compare)")
    full_only = {"--as-of": args.as_of, "--quotes": args.quotes, "--vol-scenarios": args.vol_scenarios}
    only_full = [k for k, v in {**full_only, "--vol-surface": args.vol_surface}.items() if v]
    full = args.compare or args.instruments or args.model not in (*BUILTIN_MODELS, "span")
    if full or (args.model == "hvar" and only_full):
        return _ccp(args)
    if only_full:
        raise InputError(f"{only_full[0]}: only with --instruments, --compare, hvar or a CCP model")
    args.confidence = 0.99 if args.confidence is None else args.confidence
    args.horizon_days = args.horizon_days or 1
    if args.model == "span":
        return _span(args)
    if not (args.history or args.covariance):
        raise InputError(f"--model {args.model} needs --history or --covariance")
    if args.model == "hvar" and not args.history:
        raise InputError("--model hvar needs --history (historical scenarios); a covariance is not enough")
    positions = load_positions(args.positions)
    syms = list(dict.fromkeys(positions.sym))
    prices: dict[str, float] = {}
    if args.history:
        history = load_prices(args.history).select(syms)
        params = params_from_history(
            history,
            confidence=args.confidence,
            horizon_days=args.horizon_days,
            lookback_days=args.lookback_days,
            ewma_lambda=args.ewma_lambda,
            filtered=args.filtered,
            filter_lambda=args.filter_lambda,
            param_id=f"{Path(args.history).name}:{history.window(args.lookback_days).dates[-1]}",
        )
        prices.update(history.latest)
    else:
        cov_syms, cov = load_covariance(args.covariance)
        params = RiskParams(
            cov_syms, cov, None, args.confidence, args.horizon_days, Path(args.covariance).name
        ).select(syms)
    if args.prices:
        latest = load_latest_prices(args.prices)
        prices.update({s: p for s, p in latest.items() if s in set(syms)})
    calc = config.load(args.config).calc
    accounts = list(dict.fromkeys(positions.account))
    # collateral is not an input here: 1.0 keeps the engine's contract; utilisation is not reported
    specs = [AccountSpec(a, args.model, 1.0) for a in accounts]
    eng = MarginEngine(params, specs, positions, prices=prices, calc_config=calc)
    rows = eng.snapshot()
    out = []
    for i, a in enumerate(rows["account"]):
        out.append(
            {
                "account": a,
                "model": args.model,
                "margin": rows["margin"][i],
                "var": rows["var"][i],
                "es": rows["es"][i],
                "stress": rows["stress"][i],
                "drivers": json.loads(rows["drivers"][i]),
                "exposure": float(np.abs(eng.st.xa[i]).sum()),
            }
        )
    return {
        "confidence": args.confidence,
        "horizon_days": args.horizon_days,
        "param_id": params.param_id,
        "accounts": out,
    }


def _ccp(args: argparse.Namespace) -> dict[str, Any]:
    """--instruments / a CCP model / --compare: full revaluation (calc/ccp/oneshot.py)."""
    from calc.ccp.oneshot import ccp_accounts, load_quotes, model_specs
    from calc.inputs import load_positions
    from calc.instruments import load_instruments
    from calc.volsurface import load_vol_surface
    from marginflow import config

    if not args.history:
        raise InputError(
            f"--model {args.model or 'hvar'} with full revaluation needs --history (daily closes)"
        )
    if args.model in ("var", "stress", "span"):
        raise InputError(f"--model {args.model}: not a historical-simulation model (use hvar or a CCP model)")
    try:
        calc = config.load(args.config).calc
    except SystemExit as e:
        raise InputError(str(e)) from None
    history = load_prices(args.history)
    as_of = args.as_of or str(history.dates[-1])
    try:
        as_of = str(np.datetime64(as_of, "D"))
    except ValueError:
        raise InputError(f"--as-of: {args.as_of!r} is not a date YYYY-MM-DD") from None
    names = ["hvar", *(m.name for m in calc.ccp_models)] if args.compare else [args.model]
    overrides = {
        "confidence": args.confidence,
        "holding_days": args.horizon_days,
        "lookback_days": args.lookback_days,
    }
    hvar = {"lookback_days": len(history.dates), "ewma_lambda": args.filter_lambda if args.filtered else 0.0}
    specs = model_specs(names, calc, as_of, overrides, hvar)
    accounts = ccp_accounts(
        specs,
        load_positions(args.positions),
        history,
        load_instruments(args.instruments) if args.instruments else None,
        load_vol_surface(args.vol_surface) if args.vol_surface else None,
        as_of,
        calc,
        args.vol_scenarios or calc.vol_scenarios,
        load_quotes(args.quotes) if args.quotes else None,
    )
    if args.compare:
        return {"as_of": as_of, "compare": names, "accounts": accounts}
    spec = specs[0]
    return {
        "model": spec.name,
        "as_of": as_of,
        "param_id": spec.param_id,
        "confidence": spec.confidence,
        "horizon_days": spec.holding_days,
        "accounts": [{"account": a["account"], **a["models"][spec.name]} for a in accounts],
    }


def _ccp_table(doc: dict[str, Any]) -> str:
    from calc.ccp.oneshot import COMPONENTS

    head = f"{'account':<12} {'model':<12} {'margin':>14} {'var':>14} {'es':>14}"
    lines = [head + "".join(f" {c:>14}" for c in COMPONENTS)]
    for a in doc["accounts"]:
        for r in a["models"].values() if "models" in a else [a]:
            cells = [r["margin"], r["var"], r["es"], *(r["components"][c] for c in COMPONENTS)]
            lines.append(f"{a['account']:<12} {r['model']:<12}" + "".join(f" {v:>14,.2f}" for v in cells))
    return "\n".join(lines)


def _table(doc: dict[str, Any]) -> str:
    if "as_of" in doc:  # full revaluation / CCP models
        return _ccp_table(doc)
    if "file_id" in doc:  # SPAN
        lines = [f"SPAN file {doc['file_id']}", f"{'account':<12} {'total':>16}"]
        lines += [f"{r['account']:<12} {r['total']:>16,.2f} {r.get('currency', '')}" for r in doc["accounts"]]
        return "\n".join(lines)
    head = f"{'account':<12} {'model':<7} {'margin':>16} {'var':>16} {'es':>16} {'stress':>16}  top driver"
    lines = [head]
    for r in doc.get("accounts", []):
        top = r.get("drivers") or [{}]
        drv = f"{top[0].get('sym', '')} {top[0].get('contribution', 0):,.2f}" if top[0] else ""
        lines.append(
            f"{r['account']:<12} {r.get('model', ''):<7} {r.get('margin', 0):>16,.2f} "
            f"{r.get('var', 0):>16,.2f} "
            f"{r.get('es', 0):>16,.2f} {r.get('stress', 0):>16,.2f}  {drv}"
        )
    return "\n".join(lines)


def run(
    compute: Callable[[], dict[str, Any]],
    errors: tuple[type[Exception], ...],
    table: Callable[[dict[str, Any]], str],
    as_json: bool,
    *,
    prefix: str = "error: ",
    indent: int = 1,
    first_line: bool = False,
) -> int:
    """A one-shot command's shell: print the document (JSON or a table), 0; or, for one of `errors`, the
    error on stderr (its first line only with `first_line`), 2."""
    try:
        doc = compute()
    except errors as e:
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__) if first_line else str(e)
        print(f"{prefix}{msg}", file=sys.stderr)
        return 2
    print(json.dumps(doc, indent=indent) if as_json else table(doc))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    errors = (InputError, ValueError, OSError)
    return run(lambda: compute(args), errors, _table, args.json, prefix=f"{PROG}: error: ", first_line=True)


if __name__ == "__main__":
    sys.exit(main())
