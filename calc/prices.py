"""`marginflow prices accept SYM [--price P]`: accept a price calc's acceptance band holds as suspect,
journaled as a `price_accept` param row so calc, a replay and a backtest all apply it at the same point."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys

from calc.history import InputError
from calc.params import accept_row, journal_one
from marginflow import config as configuration

PROG = "marginflow prices"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Market data held as suspect by calc's acceptance "
        "band (calc.price_band): accept a price, journaled as a price_accept param event.",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accept", help="accept SYM's held suspect price (or --price P) as its price")
    acc.add_argument("sym", help="the instrument")
    acc.add_argument("--price", type=float, help="accept this price instead of the held suspect one")
    acc.add_argument("--tp", help="tickerplant URL (default ws://<tickerplant.host>:<tickerplant.port>)")
    acc.add_argument("--config", help="config file (for the tickerplant address)")
    acc.add_argument("--who", help="who accepts it (default user@host)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """`marginflow prices accept SYM [--price P]`: one price_accept param row through the tickerplant, so it
    is journaled and calc (and any replay or backtest) applies it at the same point of the stream."""
    args = parser().parse_args(argv)
    cfg = configuration.load(args.config)
    who = args.who or f"{getpass.getuser()}@{socket.gethostname()}"
    done = journal_one(
        PROG,
        cfg,
        args.tp,
        lambda: accept_row(args.sym, args.price, who),
        (InputError,),
        lambda row, e: f"the acceptance was not journaled: {e}",
    )
    if isinstance(done, int):
        return done
    seq = done[1]
    what = "the held suspect price" if args.price is None else f"price {args.price:g}"
    print(f"{args.sym}: {what} accepted by {who}, journaled at seq {seq}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
