"""One-shot SPAN: margin every account of a positions file (CSV or Parquet) under one SPAN XML file.

`span_accounts(span_file, positions_path)` returns the JSON-ready dict; `main(argv)` is the command-line
shell.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from calc.oneshot import run
from calc.span.model import OPTION_PF_TYPES, SpanFileError, SpanPositionError, contract_key, format_key
from calc.span.parser import load_span_file
from calc.span.portfolio import SpanBook

REQUIRED = ("account", "exch", "pf_code", "pf_type", "pe", "qty")
TEXT_COLUMNS = ("account", "exch", "pf_code", "pf_type", "pe", "o", "k")


def read_positions(path: str | Path) -> list[tuple[str, tuple, float]]:
    """Rows (account, contract key, qty) of a POS file; SpanPositionError names each bad row and field."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in TEXT_COLUMNS}),
            )
    except (OSError, pa.ArrowInvalid) as e:
        raise SpanPositionError([f"{path}: cannot read positions: {e}"]) from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise SpanPositionError(
            [f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(REQUIRED)})"]
        )
    cols = {c: table.column(c).to_pylist() for c in (*REQUIRED, "o", "k") if c in table.column_names}
    n = table.num_rows
    o_col = cols.get("o", [None] * n)
    k_col = cols.get("k", [None] * n)
    rows: list[tuple[str, tuple, float]] = []
    problems: list[str] = []
    for i in range(n):
        line = f"row {i + 1}"
        acct = cols["account"][i]
        if acct is None or not str(acct).strip():
            problems.append(f"{line}: account is empty")
            continue
        try:
            qty = float(cols["qty"][i])
        except (TypeError, ValueError):
            problems.append(f"{line}: qty {cols['qty'][i]!r} is not a number")
            continue
        if not math.isfinite(qty):
            problems.append(f"{line}: qty {cols['qty'][i]!r} is not finite")
            continue
        pf_type = str(cols["pf_type"][i] or "").strip().upper()
        is_opt = pf_type in OPTION_PF_TYPES
        try:
            key = contract_key(
                cols["exch"][i] or "", cols["pf_code"][i] or "", pf_type, cols["pe"][i] or "",
                o_col[i] if is_opt else None, k_col[i] if is_opt else None,
            )  # fmt: skip
        except ValueError as e:
            problems.append(f"{line}: {e}")
            continue
        rows.append((str(acct).strip(), key, qty))
    if problems:
        raise SpanPositionError(problems)
    return rows


def span_accounts(span_file: str, positions_path: str) -> dict:
    """{"file_id", "sha256", "accounts": [{"account", "total", "currency", "ccs": [...]}]} for a POS file.

    One entry per (account, currency) the account holds CCs in (accounts sorted by name, CCs by name).

    Raises SpanFileError (bad SPAN file) or SpanPositionError (bad rows, contracts not in the file, by name).
    """
    params = load_span_file(span_file)
    rows = read_positions(positions_path)
    unknown = sorted({format_key(key) for _, key, _ in rows if key not in params.index})
    if unknown:
        raise SpanPositionError([f"contract {u} is not in SPAN file {params.file_id}" for u in unknown])
    book = SpanBook(params, capacity=len({r[0] for r in rows}))
    book.set_positions(rows)
    accounts = [m.as_dict() for acct in sorted(book.accounts) for m in book.margin(acct)]
    return {"file_id": params.file_id, "sha256": params.sha256, "accounts": accounts}


def _table(result: dict) -> str:
    lines = [f"SPAN file {result['file_id']}"]
    head = (
        f"{'account':<14}{'cc':<10}{'scan':>12}{'intra':>10}{'spot':>8}{'inter':>10}{'som':>10}"
        f"{'nov':>12}{'req':>12}"
    )
    for acc in result["accounts"]:
        lines.append(f"\n{acc['account']}  total {acc['total']:,.2f} {acc['currency']}")
        lines.append(head)
        for c in acc["ccs"]:
            lines.append(
                f"{'':<14}{c['cc']:<10}{c['scan']:>12,.2f}{c['intra']:>10,.2f}{c['spot']:>8,.2f}"
                f"{c['inter']:>10,.2f}{c['som']:>10,.2f}{c['nov']:>12,.2f}{c['requirement']:>12,.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="span-margin", description="SPAN margin of a positions file")
    ap.add_argument("--span-file", required=True, help="SPAN XML risk parameter file")
    ap.add_argument(
        "--positions", required=True, help="CSV/Parquet: account,exch,pf_code,pf_type,pe,qty[,o,k]"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    errors = (SpanFileError, SpanPositionError)
    return run(lambda: span_accounts(args.span_file, args.positions), errors, _table, args.json, indent=2)


if __name__ == "__main__":
    sys.exit(main())
