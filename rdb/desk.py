"""Desk restriction: a caller allowed only some accounts reads only those accounts' rows of the account-keyed
tables (schemas.tables TABLES[t].key == "account": fill, margin, alert), today's tables, `days.*` (the HDB
views) and `latest.*` alike, whatever SQL (or qSQL, translated to SQL first) the sandbox admits.

How: the query's syntax tree (DuckDB's own parser, `json_serialize_sql`) is rewritten, not its text matched.
Every table reference is resolved the way DuckDB's binder would and then
- a reference to an account-keyed table or view, by any spelling (margin, main.margin, memory.margin,
  memory.main.margin, days.margin, latest.margin, any case), becomes a subquery over the real table
  filtered to the caller's accounts, aliased as the original (so `margin.account` still binds);
- a reference to another of the rdb's tables, to information_schema, or to a CTE of the query is kept;
- anything else is refused: table functions other than a few generators (read_parquet, parquet_scan, glob,
  query_table, duckdb_*, pragma_storage_info ... would reach the HDB files or statistics directly), file
  paths used as tables (replacement scans), other schemas and catalogs, CTEs named like an account-keyed
  table or not a plain identifier (so a CTE reference the binder resolves elsewhere can only meet a plain
  catalog name), EXPLAIN (its estimates count other desks' rows), and any table reference kind not known.
The tree is turned back into SQL by DuckDB (`json_deserialize_sql`), that text is parsed again and checked
the other way round (every account-keyed reference must be the filtered subquery, `_verify`), and it runs in
the same sandbox. Callers that
are not restricted (accounts None, or containing "*") never pass through here: their queries are unchanged.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import duckdb

from marginflow.sql import sql_str
from rdb.sandbox import QueryError
from schemas.tables import TABLES

ALL = "*"
RESTRICTED = frozenset(name for name, t in TABLES.items() if t.key == "account")  # fill, margin, alert
KNOWN = frozenset(TABLES)
# how a reference may spell the schema -> the schema it names
SCHEMAS = {"": "main", "main": "main", "memory": "main", "days": "days", "latest": "latest"}
TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "repeat", "generate_subscripts"})
REF_TYPES = frozenset(
    {"BASE_TABLE", "JOIN", "SUBQUERY", "TABLE_FUNCTION", "EXPRESSION_LIST", "EMPTY", "PIVOT", "SHOW_REF"}
)
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_restricted(accounts: frozenset[str] | None) -> bool:
    """Whether a caller allowed `accounts` must be filtered (None or "*" = every account)."""
    return accounts is not None and ALL not in accounts


# every TableReferenceType DuckDB names (a node of one of these types is a table reference wherever it is)
_REF_NAMES = REF_TYPES | {"CTE", "EMPTY_FROM", "COLUMN_DATA", "DELIM_GET", "BOUND_TABLE_REF", "INVALID"}


def _is_ref(d: dict) -> bool:
    """A table reference node of json_serialize_sql (query nodes have modifiers, expressions a class)."""
    if "class" in d or "modifiers" in d or "type" not in d:
        return False
    return d["type"] in _REF_NAMES or ("alias" in d and "sample" in d)


def _cte_names(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        cte = tree.get("cte_map")
        if isinstance(cte, dict):
            for entry in cte.get("map", []):
                yield str(entry.get("key", ""))
        for v in tree.values():
            yield from _cte_names(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _cte_names(v)


def _refuse(what: str) -> QueryError:
    return QueryError("refused", f"{what} is not available to a desk-restricted query")


class _Rewriter:
    def __init__(
        self, con: duckdb.DuckDBPyConnection, accounts: frozenset[str], ctes: frozenset[str]
    ) -> None:
        self.con = con
        self.ctes = ctes
        # rows of account "*" are meant for every desk (calc's data alerts: a suspect price of an instrument)
        inlist = ", ".join(sql_str(a) for a in sorted(accounts | {ALL}))
        self.where = f"account IN ({inlist})"
        self._templates: dict[tuple[str, str], dict] = {}

    def where_tree(self) -> Any:
        """The desk filter's WHERE as a syntax tree (positions stripped), as it appears in every template."""
        node = self.template("main", "margin")["subquery"]["node"]
        return _strip(node["where_clause"])

    def template(self, schema: str, table: str) -> dict:
        """The SUBQUERY node `(SELECT * FROM memory.<schema>.<table> WHERE account IN (...))`."""
        key = (schema, table)
        if key not in self._templates:
            sql = f'SELECT * FROM (SELECT * FROM memory."{schema}"."{table}" WHERE {self.where}) AS x'
            tree = _serialize(self.con, sql)
            self._templates[key] = tree["statements"][0]["node"]["from_table"]
        return copy.deepcopy(self._templates[key])

    def base_table(self, ref: dict) -> dict | None:
        """The replacement for a BASE_TABLE node (None: keep it), or QueryError."""
        cat = str(ref.get("catalog_name") or "").lower()
        sch = str(ref.get("schema_name") or "").lower()
        name = str(ref.get("table_name") or "")
        low = name.lower()
        path = (ref.get("qualified_name") or {}).get("path")
        if path is not None and [p.lower() for p in path] != [p for p in (cat, sch, low) if p]:
            raise QueryError("refused", f"table reference {name!r} could not be inspected")
        shown = ".".join(p for p in (cat, sch, name) if p)
        if not cat and not sch and low in self.ctes:
            return None
        if cat in ("", "memory") and sch in SCHEMAS and low in KNOWN:
            if cat == "memory" and sch == "memory":
                raise _refuse(f"table {shown}")
            schema = SCHEMAS[sch]
            if low not in RESTRICTED:
                return None
            node = self.template(schema, low)
            node["alias"] = ref.get("alias") or name
            if ref.get("column_name_alias"):
                node["column_name_alias"] = ref["column_name_alias"]
            node["sample"] = ref.get("sample")
            return node
        if cat in ("", "system") and sch == "information_schema":
            return None
        raise _refuse(f"table {shown}")

    def walk(self, node: Any) -> None:
        """Check every table reference under `node`, replacing account-keyed ones in place."""
        if isinstance(node, dict):
            if _is_ref(node):
                self.check_ref(node)
            for k, v in list(node.items()):
                if isinstance(v, dict) and _is_ref(v) and v["type"] == "BASE_TABLE":
                    new = self.base_table(v)
                    if new is not None:
                        node[k] = new  # not walked again: its own reference is the real table
                        continue
                self.walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, dict) and _is_ref(v) and v["type"] == "BASE_TABLE":
                    new = self.base_table(v)
                    if new is not None:
                        node[i] = new
                        continue
                self.walk(v)

    def check_ref(self, ref: dict) -> None:
        kind = ref.get("type")
        if kind not in REF_TYPES:
            raise _refuse(f"a {kind} table reference")
        if kind == "TABLE_FUNCTION":
            fn = ref.get("function") or {}
            name = str(fn.get("function_name", "")).lower()
            if name not in TABLE_FUNCTIONS or fn.get("schema") or fn.get("catalog"):
                raise _refuse(f"table function {name}()")
        elif kind == "SHOW_REF" and ref.get("query") is None and ref.get("show_type") != "SHOW_SPECIAL":
            if str(ref.get("table_name") or "").strip('"').lower() not in KNOWN:
                raise _refuse(f"{ref.get('show_type')} of {ref.get('table_name')!r}")


def _serialize(con: duckdb.DuckDBPyConnection, sql: str) -> dict:
    tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
    if tree.get("error"):
        raise QueryError(
            "refused",
            f"{tree.get('error_message', 'statement could not be inspected')} "
            "(a desk-restricted query must be a SELECT)",
        )
    return tree


def restrict(con: duckdb.DuckDBPyConnection, sql: str, accounts: frozenset[str]) -> str:
    """`sql` (one statement the sandbox accepted) rewritten so it reads only `accounts`' rows of the
    account-keyed tables, or QueryError("refused", ...) naming what a restricted caller may not use."""
    tree = _serialize(con, sql)
    ctes = frozenset(n.lower() for n in _cte_names(tree))
    for n in ctes:
        if n in RESTRICTED or not _PLAIN.match(n):
            raise _refuse(f"a CTE named {n!r}")
    rw = _Rewriter(con, accounts, ctes)
    rw.walk(tree["statements"])
    text = con.execute("SELECT json_deserialize_sql(?)", [json.dumps(tree)]).fetchall()[0][0]
    if not isinstance(text, str) or not text:
        raise QueryError("refused", "the restricted query could not be rebuilt")
    _verify(_serialize(con, text), rw.where_tree())
    return text


def _strip(tree: Any) -> Any:
    """A syntax tree without its source positions (which differ between two texts of the same query)."""
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if not k.startswith("query_location")}
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


def _verify(tree: Any, where: Any, select: dict | None = None) -> None:
    """Parse the rebuilt text again and check it the other way round: every reference to an account-keyed
    table is memory.<schema>.<table> as the whole FROM of a SELECT whose WHERE is exactly the desk filter.
    A rebuilt text that parses differently from the tree it came from is refused, never run."""
    if isinstance(tree, dict):
        if tree.get("type") == "BASE_TABLE" and "class" not in tree:
            if str(tree.get("table_name", "")).lower() in RESTRICTED and not (
                select is not None
                and select.get("from_table") is tree
                and str(tree.get("catalog_name", "")).lower() == "memory"
                and _strip(select.get("where_clause")) == where
            ):
                raise QueryError("refused", "the restricted query did not rebuild to a filtered one")
        inner = tree if tree.get("type") == "SELECT_NODE" else select
        for v in tree.values():
            _verify(v, where, inner)
    elif isinstance(tree, list):
        for v in tree:
            _verify(v, where, select)
