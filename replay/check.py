"""`marginflow journal check DIR [--repair]`: valid messages and bytes per journal file.

Like kdb+'s `-11!(-2;log)`; `--repair` cuts a torn tail (kept in a side file), like `-11!(-4;log)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tickerplant import journal


def check_paths(target: Path) -> list[Path]:
    if target.is_file():
        return [target]
    return sorted(target.rglob(f"*{journal.SUFFIX}"))


def report(s: journal.Scan) -> dict:
    return {
        "file": str(s.path),
        "batches": s.batches,
        "rows": s.rows,
        "valid_bytes": s.valid_bytes,
        "total_bytes": s.total_bytes,
        "first_seq": s.first_seq,
        "last_seq": s.last_seq,
        "closed": s.closed,
        "torn": s.torn,
        "error": s.error,
        "repaired": s.repaired,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="marginflow journal", description=__doc__)
    ap.add_argument("action", choices=["check"])
    ap.add_argument("path", help="a journal file, a day folder or the journal root")
    ap.add_argument(
        "--repair", action="store_true", help="truncate torn tails (the cut bytes are kept beside)"
    )
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    target = Path(args.path)
    if not target.exists():
        print(f"journal: {target}: no such file or folder")
        return 2
    scans = [journal.repair(p) if args.repair else journal.scan(p) for p in check_paths(target)]
    if args.json:
        print(json.dumps([report(s) for s in scans], indent=1))
    else:
        print(
            f"{'file':<50} {'batches':>8} {'rows':>10} {'valid bytes':>12} {'bytes':>12} "
            f"{'last seq':>10}  state"
        )
        for s in scans:
            state = "torn: " + s.error if s.torn else ("closed" if s.closed else "open")
            if s.repaired:
                state += f" (repaired: {s.repaired})"
            print(
                f"{str(s.path)[-50:]:<50} {s.batches:>8} {s.rows:>10} {s.valid_bytes:>12} "
                f"{s.total_bytes:>12} {s.last_seq:>10}  {state}"
            )
    return 1 if any(s.torn for s in scans) else 0
