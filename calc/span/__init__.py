"""SPAN margin from a CCP's SPAN XML risk parameter file: parser, numba kernels, multi-account book, one-shot.

What is implemented and where the number may differ from the CCP's: calc/span/FEATURES.md.

    params = load_span_file("takasbank_2016-05-17.spn")        # SpanParams (arrays), file_id, sha256
    book = SpanBook(params); book.set_positions({"acct": {("BIST", "AKBNKE", "FUT", "201606S0"): 3}})
    book.fill("acct", ("BIST", "XU030", "FUT", "201606S0"), -1)   # incremental: one CC in O(16)
    book.margin("acct")                                          # [AccountMargin] with per-CC breakdown

Importing this package registers the engine's `span` model (engine_model.SpanModel): accounts with model
`span` in the accounts file are margined by the streaming engine under calc.span_file.
"""

from calc.span.engine_model import SpanModel, param_id  # registers the engine's "span" model
from calc.span.model import (
    AccountMargin,
    CCMargin,
    ContractKey,
    SpanFileError,
    SpanParams,
    SpanPositionError,
    contract_key,
    format_key,
    parse_key,
)
from calc.span.parser import load_span_file, parse_span_bytes
from calc.span.portfolio import SpanBook, span_margin

__all__ = [
    "AccountMargin",
    "CCMargin",
    "ContractKey",
    "SpanBook",
    "SpanModel",
    "SpanFileError",
    "SpanParams",
    "SpanPositionError",
    "contract_key",
    "format_key",
    "load_span_file",
    "param_id",
    "parse_key",
    "parse_span_bytes",
    "span_margin",
]
