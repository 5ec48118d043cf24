"""`marginflow` command line: one subcommand per process or tool, each implemented in its own room.

Subcommand modules are imported only when used, so `marginflow q` does not pay for numba.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module:function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("marginflow.up:main", "start tickerplant, rdb and calc (and the simulated feed with --demo)"),
    "tp": ("tickerplant.server:main", "run the tickerplant (journal + pub/sub), default 127.0.0.1:5010"),
    "rdb": ("rdb.server:main", "run the rdb (in-memory DuckDB, SQL service, end-of-day HDB), default :5011"),
    "calc": ("calc.server:main", "run the margin engine and its websocket API, default :5012"),
    "shards": (
        "calc.shard_plan:main",
        "shards plan --shards N --out FILE: an assignment that keeps each option's holders on one shard",
    ),
    "front": ("calc.front:main", "the one API of a sharded calc: every shard's rows, what-ifs to the owner"),
    "feed": ("tickerplant.feed:main", "publish simulated market data and fills, or the rows of a file"),
    "replay": (
        "replay.cli:main",
        "read journals back in seq order: print, or republish (paced or full speed)",
    ),
    "journal": ("replay.check:main", "journal check DIR [--repair]: valid messages and bytes per file"),
    "q": ("rdb.console:main", "q-like console onto the rdb: qSQL subset and plain SQL"),
    "margin": (
        "calc.oneshot:main",
        "one-shot margin for a positions file (var, hvar, stress, span, CCP models; --compare)",
    ),
    "params": ("calc.params:main", "params load FILE: store a risk parameter file and journal a param event"),
    "prices": ("calc.prices:main", "prices accept SYM [--price P]: accept a price calc holds as suspect"),
    "tokens": (
        "marginflow.tokens:main",
        "tokens list|create NAME --roles R|revoke NAME|rotate NAME|url [DESK]",
    ),
    "backtest": (
        "replay.backtest:main",
        "replay journals through calc; compare with actual calls; coverage tests",
    ),
    "demo-history": ("replay.demo_history:main", "write N days of demo journals and matching actual calls"),
    "forecast": (
        "replay.forecast_train:main",
        "forecast train --journal DIR --out FILE: fit the forecast of the call, compare with baselines",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: marginflow COMMAND [options]   (marginflow COMMAND --help for its options)", ""]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"marginflow: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except ValueError as e:
        from tickerplant.journal_reader import LayoutError

        if not isinstance(e, LayoutError):
            raise
        print(f"marginflow {name}: {e}", file=sys.stderr)  # a journal day no reader of this version takes
        return 2


if __name__ == "__main__":
    sys.exit(main())
