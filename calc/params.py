"""Risk parameter files as events: `marginflow params load FILE` validates a file, stores it by content hash
under calc.params_dir and journals one `param` row; calc (and any replay) applies that row with `apply_param`.

    marginflow params load data/span/takasbank_2016-05-17.spn            # kind span (default)
    marginflow params load closes.csv.gz --kind history --tp ws://127.0.0.1:5010
    marginflow params load data/demo/instruments.csv --kind instruments    # or --kind vol_surface
    marginflow prices accept AAPL [--price 182.5]   # accept a held suspect price (a price_accept param row)
    row = store(path, "span", params_dir)     # validated + stored; {kind, file_id, content_hash, source}
    for row in param_rows(batch):             # a journaled / published param batch (calc.events.apply_params)
        apply_param(engine, row, calc_config) # the engine under the stored file
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from calc.history import InputError, load_covariance, load_prices
from marginflow import auth
from marginflow import config as configuration
from schemas.tables import MAX_PRICE, PARAM_FILES, TABLES

log = logging.getLogger("marginflow.calc.params")
PROG = "marginflow params"
KINDS = PARAM_FILES  # the param files `params load` stores (the table's kind also has events)
PRICE_ACCEPT = (
    "price_accept"  # an operator accepts a held suspect price: file_id = sym, content_hash = price or "-"
)
HELD = "-"  # content_hash of a price_accept row that takes the held suspect price
PARAM_COLUMNS = [c.name for c in TABLES["param"].input_columns]


def stored_path(params_dir: str | Path, content_hash: str, suffix: str = "") -> Path:
    """Where a file with this sha256 is stored: <params_dir>/<sha256><suffix> (suffix = the original
    file's suffixes, e.g. .spn or .csv.gz, which the readers use to pick a format)."""
    if len(content_hash) != 64 or any(c not in "0123456789abcdef" for c in content_hash):
        raise InputError(f"content_hash {content_hash!r} is not a sha256 in hex")
    return Path(params_dir) / f"{content_hash}{suffix}"


def find_stored(params_dir: str | Path, content_hash: str) -> Path:
    """The stored file with this sha256; InputError when params_dir does not hold it."""
    base = stored_path(params_dir, content_hash)
    found = sorted(base.parent.glob(base.name + "*")) if base.parent.is_dir() else []
    if not found:
        raise InputError(
            f"param file {content_hash[:12]}...: not stored in {params_dir} "
            f"(load it with `marginflow params load FILE`)"
        )
    return found[0]


def validate(path: Path, kind: str, data: bytes) -> str:
    """Parse the file as `kind` (the same readers calc uses); returns its file id. Raises SpanFileError
    (element and reason) or InputError (field and reason) for a file calc could not use."""
    if kind == "span":
        from calc.span import parse_span_bytes

        return parse_span_bytes(data, source=str(path)).file_id
    if kind == "history":
        h = load_prices(path)
        h.validate(str(path))
        return f"{path.name}:{h.dates[-1]}"
    if kind == "covariance":
        syms, _ = load_covariance(path)
        return f"{path.name}:{len(syms)} syms"
    if kind == "instruments":
        from calc.instruments import load_instruments

        inst = load_instruments(path)
        return f"{path.name}:{len(inst)} instruments, {len(inst.options)} options"
    if kind == "vol_surface":
        from calc.volsurface import load_vol_surface

        surface = load_vol_surface(path)
        return f"{path.name}:{len(surface.underlyings)} underlyings"
    if kind == "forecast":
        from calc.forecast import file_id

        return file_id(path)
    raise InputError(f"kind {kind!r}: `params load` takes only {', '.join(KINDS)}")


def store(path: str | Path, kind: str, params_dir: str | Path) -> dict[str, str]:
    """Validate a parameter file and store it by content hash (atomically; an identical stored copy is
    kept). Returns the `param` row to journal. Nothing is stored when validation fails."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    file_id = validate(path, kind, data)
    digest = hashlib.sha256(data).hexdigest()
    dest = stored_path(params_dir, digest, "".join(path.suffixes))
    if not (dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == digest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return {"kind": kind, "file_id": file_id, "content_hash": digest, "source": str(path.resolve())}


def param_rows(batch: Any) -> list[dict[str, Any]]:
    """The rows of a `param` record batch (from the tickerplant or a journal) as dicts for apply_param,
    without `time` (its nanoseconds do not convert to datetime)."""
    return batch.drop_columns([c for c in ("time",) if c in batch.schema.names]).to_pylist()


def apply_param(engine: Any, row: Mapping[str, Any], calc: Any) -> str:
    """Apply one `param` row to a MarginEngine: the stored file is read back by its hash and checked
    against it. span: every SPAN account is reloaded under the file (SpanPositionError if it lacks a
    held contract: the old file stays in force); history / covariance: new risk parameters for the
    built-in models; instruments / vol_surface: the options rebuilt (MarginEngine.set_options; refused if
    a held option is missing). Returns what happened; raises InputError / SpanFileError / SpanPositionError
    when the event cannot be applied (the engine is then unchanged)."""
    kind, digest = row["kind"], row["content_hash"]
    if row.get("seq") is not None:  # the margin rows this event moves carry its seq
        engine.last_seq = max(engine.last_seq, int(row["seq"]))
    if kind == PRICE_ACCEPT:
        return f"price accept by {row['source']}: " + engine.accept_price(
            row["file_id"], accept_price_of(row)
        )
    if kind not in KINDS:
        return f"param {kind} {row['file_id']}: not applied by calc"
    path = find_stored(calc.params_dir, digest)
    if kind == "span":
        from calc.span.engine_model import load_cached, param_id

        params = load_cached(path)
        if params.sha256 != digest:
            raise InputError(
                f"{path}: content does not match its hash {digest[:12]}... (stored file altered)"
            )
        if "span" not in engine.external:
            return f"span file {param_id(params)}: no account uses model span"
        n = len(engine.update_external("span", lambda model: model.reload(params)))
        return f"span file {param_id(params)} in force for {n} account(s)"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise InputError(f"{path}: content does not match its hash {digest[:12]}... (stored file altered)")
    if kind == "forecast":  # the forecast of the call (calc/projection.py): used only if it beat the replica
        from calc.forecast import load

        model = load(path)
        what = engine.set_forecast_model(model)
        why = (
            "" if model is not None else " (it did not beat the replica on held-out days: the replica stays)"
        )
        return f"forecast file {row['file_id']} ({digest[:12]}...): {what}{why}"
    if kind == "instruments":
        from calc.instruments import load_instruments

        n = engine.set_options(master=load_instruments(path))
        return f"instruments file {row['file_id']} ({digest[:12]}...) in force: {n} option contracts"
    if kind == "vol_surface":
        from calc.volsurface import load_vol_surface

        n = engine.set_options(vol_surface=load_vol_surface(path))
        return f"vol surface {row['file_id']} ({digest[:12]}...) in force for {n} option contracts"
    from calc.fullreval import resolve_as_of
    from calc.inputs import params_from_config

    pid = f"{kind}:{row['file_id']}:{digest[:12]}"
    if kind == "history":
        engine.set_params(params_from_config(calc, path, param_id=pid))
        engine.set_history_file(str(path), resolve_as_of(calc.as_of, load_prices(path).dates[-1]))
    else:
        engine.set_params(params_from_config(calc, covariance_file=path, param_id=pid))
    return f"{kind} file {pid} in force"


def accept_row(sym: str, price: float | None, who: str) -> dict[str, str]:
    """The `param` row of `marginflow prices accept`: file_id = sym, content_hash = the price (repr, so it
    reads back exactly) or "-" for the held suspect price, source = who accepted it."""
    if price is not None and not (math.isfinite(price) and 0 < price <= MAX_PRICE):
        raise InputError(f"--price must be a finite number > 0 and <= {MAX_PRICE:g}, got {price!r}")
    return {
        "kind": PRICE_ACCEPT,
        "file_id": sym,
        "content_hash": HELD if price is None else repr(float(price)),
        "source": who,
    }


def accept_price_of(row: Mapping[str, Any]) -> float | None:
    """The price a price_accept row gives (None: the held suspect price)."""
    text = row["content_hash"]
    if text == HELD:
        return None
    try:
        return float(text)
    except ValueError:
        raise InputError(
            f"price_accept {row['file_id']}: content_hash {text!r} is not a price or '-'"
        ) from None


class JournalRefused(InputError):
    """The tickerplant answered and refused the param row (resending it would not help)."""


async def publish(url: str, row: Mapping[str, str], timeout: float = 10.0) -> int:
    """Journal one `param` row through the tickerplant; returns its seq (refusal -> JournalRefused)."""
    from tickerplant.client import Publisher

    async with Publisher(url, token=auth.local_token("admin")) as pub:  # a param event: admin only
        await pub.upd("param", {c: [row[c]] for c in PARAM_COLUMNS})
        seq = await pub.wait_acked(timeout=timeout)
        if pub.errors:
            raise JournalRefused(f"tickerplant refused the param row: {pub.errors[0].reason}")
    return seq


async def journal(url: str, row: Mapping[str, str]) -> int:
    """Journal one param row through the tickerplant at `url` (`params load`, and calc/watch.py from
    calc's loop); its seq. InputError saying where and why when it could not be journaled (JournalRefused
    when the tickerplant refused it)."""
    try:
        return await publish(url, row)
    except JournalRefused as e:
        raise JournalRefused(f"could not journal it at {url}: {e}") from None
    except (OSError, TimeoutError, ConnectionError, InputError) as e:
        raise InputError(f"could not journal it at {url}: {e}") from None


def journal_row(cfg: configuration.Config, row: Mapping[str, str], given_url: str | None = None) -> int:
    """Journal one param row through the tickerplant at `given_url`, else the config's (wss:// with TLS);
    its seq. InputError saying where and why when it could not be journaled."""
    url = given_url or f"{auth.scheme(cfg.access)}://{cfg.tickerplant.host}:{cfg.tickerplant.port}"
    return asyncio.run(journal(url, row))


def journal_one(
    prog: str,
    cfg: configuration.Config,
    tp: str | None,
    make_row: Callable[[], dict[str, str]],
    refused: tuple[type[Exception], ...],
    unjournaled: Callable[[dict[str, str], Exception], str],
) -> tuple[dict[str, str], int] | int:
    """What the commands that journal one param row share (`params load`, `prices accept`): make the
    row (refused -> exit 2), journal it (not journaled -> exit 1), each failure said on stderr.
    Returns (row, seq), or the exit code."""
    try:
        row = make_row()
    except refused as e:
        print(f"{prog}: refused: {e}", file=sys.stderr)
        return 2
    try:
        return row, journal_row(cfg, row, tp)
    except InputError as e:
        print(f"{prog}: {unjournaled(row, e)}", file=sys.stderr)
        return 1


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="validate FILE, store it by content hash, journal a param event")
    load.add_argument(
        "file",
        help="the parameter file (SPAN XML; price history, covariance, instruments or vol surface CSV)",
    )
    load.add_argument("--kind", default="span", choices=KINDS, help="what the file is (default span)")
    load.add_argument("--tp", help="tickerplant URL (default ws://<tickerplant.host>:<tickerplant.port>)")
    load.add_argument("--config", help="config file (for calc.params_dir and the tickerplant address)")
    load.add_argument("--params-dir", help="store here instead of calc.params_dir")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = configuration.load(args.config)
    from calc.span import SpanFileError

    done = journal_one(
        PROG,
        cfg,
        args.tp,
        lambda: store(args.file, args.kind, args.params_dir or cfg.calc.params_dir),
        (InputError, SpanFileError),
        lambda row, e: f"stored {row['content_hash'][:12]}... but {e}",
    )
    if isinstance(done, int):
        return done
    row, seq = done
    print(
        f"{row['kind']} {row['file_id']} sha256 {row['content_hash']} stored in "
        f"{args.params_dir or cfg.calc.params_dir}, journaled at seq {seq}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
