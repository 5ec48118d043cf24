"""Validation of `upd_arrow` data and the wording of `upd` decode errors (used by tickerplant.core).

Both name table, row and field in the Error. An Arrow table is checked column at a time against the
same rules msgspec applies to `upd` (schemas.tables.column_rule): the accepted types (cast safely, no
parsing of strings into numbers), nulls, allowed values, lengths, name patterns (in RE2, after a
numpy fast path for plain ASCII) and ranges (NaN and infinity refused).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, get_args

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas import wire
from schemas.tables import (
    NAME_PATTERN,
    NAME_RULE,
    OPTIONAL_NAME_PATTERN,
    TABLES,
    column_rule,
    input_schema,
    name_problem,
    re2_pattern,
)

_PATH = re.compile(r"at `\$(?:\.(?P<field>\w+))?(?:\[(?P<row>\d+)\])?")
_FIELD = re.compile(r"field `(?P<field>\w+)`")


_ACCEPTS = {  # Arrow types a publisher may send for each column kind (then cast safely)
    "float": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
    "long": pa.types.is_integer,
    "symbol": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "text": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "timestamp": pa.types.is_timestamp,
}


def _length_ok(arr: pa.Array, lo: int, hi: int) -> np.ndarray:
    """lo <= characters <= hi for each string. Byte lengths from the offsets buffer decide it when
    lo <= 1 and every string has <= hi bytes (bytes >= chars, and bytes >= 1 iff chars >= 1);
    otherwise count characters (pc.utf8_length)."""
    if lo <= 1 and arr.type == pa.string() and arr.buffers()[1] is not None:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        n = np.diff(offsets)
        if n.max(initial=0) <= hi:
            return n >= lo
    n = pc.utf8_length(arr).to_numpy(zero_copy_only=False)
    return (n >= lo) & (n <= hi)


_re2 = cache(re2_pattern)


def _plain_ascii_names(arr: pa.Array) -> bool:
    """True when every value is printable ASCII (bytes 0x20-0x7e) with no space at either end: the name
    pattern passes them all (the common case, decided on the bytes with numpy, ~5x faster than RE2);
    False: let the pattern decide."""
    if arr.type != pa.string() or arr.buffers()[1] is None or arr.buffers()[2] is None:
        return False
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)
    b = data[offsets[0] : offsets[-1]]
    if not ((b >= 0x20) & (b < 0x7F)).all():
        return False
    if not (b == 0x20).any():
        return True
    held = np.diff(offsets) > 0
    return not ((data[offsets[:-1][held]] == 0x20).any() or (data[offsets[1:][held] - 1] == 0x20).any())


def _described(column: Any) -> str:
    """A pattern column's rule in words (its msgspec description), not the regex."""
    metas = get_args(column.check)[1:]
    return next((m.description for m in metas if getattr(m, "description", None)), "valid")


def check_arrow(table: str, data: pa.Table, msg_id: int = 0) -> pa.Table | wire.Error:
    """`data` as the table's input columns, or the Error naming the first bad column (and row)."""
    schema = input_schema(table)
    for name in data.schema.names:
        if name not in schema.names:
            return wire.Error(
                reason=f"table {table}, field {name}: unknown column", id=msg_id, table=table, field=name
            )
    arrays = []
    for column in TABLES[table].input_columns:

        def bad(row: int, why: str, name: str = column.name) -> wire.Error:
            where = f"table {table}" + (f", row {row}" if row >= 0 else "") + f", field {name}"
            return wire.Error(reason=f"{where}: {why}", id=msg_id, table=table, row=row, field=name)

        if column.name not in data.schema.names:
            return bad(-1, "missing column")
        col = data.column(column.name)
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if arr.null_count:
            return bad(int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), "null")
        if not _ACCEPTS[column.kind](arr.type):  # no silent parsing of strings into numbers
            return bad(-1, f"expected {column.kind} ({column.arrow_type}), got {arr.type}")
        try:
            arr = arr if arr.type == column.arrow_type else arr.cast(column.arrow_type, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            got = data.schema.field(column.name).type
            return bad(-1, f"expected {column.kind} ({column.arrow_type}), got {got}: {e}")
        rule = column_rule(column)
        if "allowed" in rule:
            ok = np.isin(
                arr.to_numpy(zero_copy_only=False), rule["allowed"]
            )  # (pc.is_in costs ~0.2 ms a call)
            why = f"must be one of {rule['allowed']}"
        elif "min_length" in rule or "max_length" in rule or "pattern" in rule:
            ok = _length_ok(arr, rule.get("min_length", 0), rule.get("max_length", 1 << 62))
            why = f"length must be {rule.get('min_length', 0)}..{rule.get('max_length')}"
            is_name = rule.get("pattern") in (NAME_PATTERN, OPTIONAL_NAME_PATTERN)
            if (
                "pattern" in rule and ok.all() and not (is_name and _plain_ascii_names(arr))
            ):  # msgspec's pattern, in RE2 syntax
                ok = pc.match_substring_regex(arr, _re2(rule["pattern"])).to_numpy(zero_copy_only=False)
                if not ok.all():
                    row = int(np.flatnonzero(~ok)[0])
                    value = arr[row].as_py()
                    why = name_problem(value) if is_name else f"{value!r} is not {_described(column)}"
                    return bad(row, why)
        else:
            x = arr.to_numpy(zero_copy_only=False)
            x = x.view(np.int64) if column.kind == "timestamp" else x
            ok = np.ones(len(x), dtype=bool)  # NaN fails every comparison below, so it is refused
            for k, op in (
                ("gt", np.greater),
                ("ge", np.greater_equal),
                ("lt", np.less),
                ("le", np.less_equal),
            ):
                if k in rule:
                    ok &= op(x, rule[k])
            why = (
                "out of range "
                + ", ".join(f"{k} {v}" for k, v in rule.items())
                + " (NaN and infinity refused)"
            )
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            return bad(row, f"{arr[row].as_py()!r} {why}")
        arrays.append(arr)
    return pa.table(arrays, schema=schema)


def error_from_validation(e: msgspec.ValidationError, table: str, msg_id: int) -> wire.Error:
    """The Error for an `upd` whose columns msgspec refused, naming the row and field it found."""
    text = str(e)
    if "matching regex" in text:  # say the rule, not the (long) name pattern
        for pattern in (NAME_PATTERN, OPTIONAL_NAME_PATTERN):
            text = text.replace(f"`str` matching regex {pattern!r}", f"a name: {NAME_RULE}")
    m = _PATH.search(text)
    row = int(m.group("row")) if m and m.group("row") else -1
    fld = m.group("field") if m and m.group("field") else ""
    if not fld:
        f2 = _FIELD.search(text)
        fld = f2.group("field") if f2 else ""
    where = f"table {table}" + (f", row {row}" if row >= 0 else "") + (f", field {fld}" if fld else "")
    return wire.Error(reason=f"{where}: {text}", id=msg_id, table=table, row=row, field=fld)
