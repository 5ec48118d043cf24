"""SQL quoting, the one definition: the rdb's store, HDB, qSQL translator and desk filter and calc's history
query all build DuckDB SQL with these (no import beyond the standard library, so calc takes it cheaply)."""

from __future__ import annotations


def sql_str(s: str) -> str:
    """A SQL string literal: 'it''s'."""
    return "'" + s.replace("'", "''") + "'"


def ident(s: str) -> str:
    """A quoted SQL identifier: "a""b"."""
    return '"' + s.replace('"', '""') + '"'
