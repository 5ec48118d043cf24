"""kdb+ IPC as plain functions over bytes (sans-I/O): the handshake, the 8-byte message header, q
objects both ways, kdb+'s message compression, and Arrow <-> q tables.

The protocol is kx's (code.kx.com "Interprocess communication", "Serialization examples"):
- handshake: the client sends `user:password`, a capability byte and a NUL; the server answers one
  byte (the capability it agrees to) or closes the connection.
- header: byte 0 endianness (1 little, 0 big), byte 1 message type (0 async, 1 sync, 2 response),
  byte 2 compressed (1), byte 3 unused, bytes 4-7 the whole message's length.
- body: a type byte, then for a vector an attribute byte, a 4-byte count and the items; a dict is
  keys then values; a table is 98, an attribute byte, then the dict of its columns; an error is -128
  and a NUL-terminated text.

q objects here: `Atom` (t < 0), `Vector` (t 1..19: a numpy array of q's own units, e.g. a
timestamp is int64 nanoseconds since 2000.01.01; a symbol vector a list of str; a char vector
bytes), `QList` (general list), `Dict`, `Table` (a keyed table is a Dict of two Tables), `QError`,
`Function` (lambdas and other function types, kept as their bytes), `NULL` (q's `::`). Numeric
vectors go through numpy (frombuffer / tobytes), never a Python loop per item. Nulls and infinities
are q's own bit patterns (0N is int64 min, 0W int64 max, 0n NaN ...).

Compression (kx's algorithm, the one c.java and c.cs implement) is in numba: `decompress` of any
compressed message received, `compress` of a reply over 2,000 bytes as kdb+ does: only when the
peer is not on this machine (kdb+ never compresses to localhost) and only when it saves at least
half.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.qtypes import ARROW_RESULT, TEXT_COLUMNS

ASYNC, SYNC, RESPONSE = 0, 1, 2
HEADER = 8
COMPRESS_MIN = 2000  # kdb+ compresses a message longer than this (to a remote peer)
CAPABILITY = 3  # what this server agrees to at most: 3 = compression, timestamps, guids, 2 GB messages
EPOCH_2000_NS = 946_684_800_000_000_000  # 2000.01.01 in ns since 1970
EPOCH_2000_DAYS = 10_957

NULL_SHORT, NULL_INT, NULL_LONG = -(2**15), -(2**31), -(2**63)

# q type number -> (letter, numpy dtype of the items); 0: general list, 10 char, 11 symbol
_DTYPES: dict[int, str] = {
    1: "u1",  # boolean (0/1 bytes; exposed as numpy bool)
    4: "u1",  # byte
    5: "i2",  # short
    6: "i4",  # int
    7: "i8",  # long
    8: "f4",  # real
    9: "f8",  # float
    12: "i8",  # timestamp: ns since 2000.01.01
    13: "i4",  # month: months since 2000.01
    14: "i4",  # date: days since 2000.01.01
    15: "f8",  # datetime: days since 2000.01.01 (fraction: time of day)
    16: "i8",  # timespan: ns
    17: "i4",  # minute
    18: "i4",  # second
    19: "i4",  # time: ms since midnight
}
LETTERS = " bg xhijefcspmdznuvt"  # index = q type number
NAMES = {
    1: "boolean",
    2: "guid",
    4: "byte",
    5: "short",
    6: "int",
    7: "long",
    8: "real",
    9: "float",
    10: "char",
    11: "symbol",
    12: "timestamp",
    13: "month",
    14: "date",
    15: "datetime",
    16: "timespan",
    17: "minute",
    18: "second",
    19: "time",
}


class QIPCError(ValueError):
    """A message that does not decode (bad length, unknown type byte, truncated ...). `fatal`: the
    framing is lost (the connection must close)."""

    def __init__(self, reason: str, fatal: bool = False):
        super().__init__(reason)
        self.fatal = fatal


# ---- q objects ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Atom:
    t: int  # negative q type
    value: Any  # int / float / bool / str (symbol) / bytes (char: 1 byte, guid: 16 bytes)

    def __post_init__(self) -> None:
        if not -19 <= self.t <= -1 or self.t == -3:
            raise ValueError(f"atom type {self.t}")


@dataclass(eq=False)
class Vector:
    t: int  # 1..19
    data: Any  # numpy array (numeric and temporal types; guid: (n,16) uint8), list[str] (11), bytes (10)
    attr: int = 0

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vector) or other.t != self.t or other.attr != self.attr:
            return False
        if isinstance(self.data, np.ndarray):
            return np.array_equal(self.data, other.data, equal_nan=self.t in (8, 9, 15))
        return list(self.data) == list(other.data) if self.t == 11 else self.data == other.data

    def tolist(self) -> list:
        if self.t == 10:
            return list(self.data.decode())
        return list(self.data) if self.t == 11 else self.data.tolist()


@dataclass
class QList:
    items: list
    attr: int = 0

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class Dict:
    keys: Any
    values: Any
    sorted: bool = False


@dataclass
class Table:
    columns: list[str]
    data: list  # one Vector or QList per column
    attr: int = 0

    def __len__(self) -> int:
        return len(self.data[0]) if self.data else 0

    def column(self, name: str) -> Any:
        return self.data[self.columns.index(name)]


@dataclass(frozen=True)
class QError:
    text: str


@dataclass(frozen=True)
class Function:
    t: int  # 100 lambda ... 112
    body: bytes = b""  # the rest of its serialization (a lambda: context, NUL, its text as a char vector)
    text: str = ""  # a lambda's text


@dataclass(frozen=True)
class _Null:
    def __repr__(self) -> str:
        return "::"


NULL = _Null()


def symbols(names: list[str] | tuple[str, ...]) -> Vector:
    return Vector(11, list(names))


def sym(name: str) -> Atom:
    return Atom(-11, name)


def chars(text: str | bytes) -> Vector:
    return Vector(10, text.encode() if isinstance(text, str) else bytes(text))


def vector(t: int, values: Any) -> Vector:
    """A numeric or temporal vector of type t from anything numpy takes (q units)."""
    arr = np.asarray(values, dtype=_DTYPES[t] if t != 1 else bool)
    return Vector(t, arr)


def text_of(obj: Any) -> str | None:
    """The text of a char vector, a symbol atom or a char atom, else None."""
    if isinstance(obj, Vector) and obj.t == 10:
        return obj.data.decode(errors="replace")
    if isinstance(obj, Atom) and obj.t in (-11, -10):
        return obj.value if obj.t == -11 else obj.value.decode(errors="replace")
    return None


# ---- handshake ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    user: str
    password: str
    capability: int


def parse_hello(data: bytes | bytearray) -> tuple[Hello, int] | None:
    """The client's `user:password<capability>NUL` from the start of `data` and the bytes it took, or
    None until its NUL has arrived. A client that sends no capability byte (pre-2.6 kdb+) gets 0."""
    end = data.find(b"\0")
    if end < 0:
        return None
    raw = bytes(data[:end])
    capability = 0
    if raw and raw[-1] < 0x20:
        capability, raw = raw[-1], raw[:-1]
    user, _, password = raw.decode("utf-8", errors="replace").partition(":")
    return Hello(user, password, capability), end + 1


def hello(user: str, password: str, capability: int = CAPABILITY) -> bytes:
    """What a client sends (tests and the benchmark use it)."""
    return f"{user}:{password}".encode() + bytes([capability, 0])


def hello_reply(client_capability: int) -> bytes:
    return bytes([min(client_capability, CAPABILITY)])


# ---- header and messages ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    little: bool
    msgtype: int
    compressed: bool
    length: int


def parse_header(data: bytes | bytearray | memoryview, max_bytes: int = 1 << 31) -> Header:
    """The 8-byte header; QIPCError (fatal: the framing is lost) for a bad one."""
    if len(data) < HEADER:
        raise QIPCError("truncated header", fatal=True)
    endian, msgtype, compressed = data[0], data[1], data[2]
    if endian > 1 or msgtype > 2 or compressed > 1:
        raise QIPCError(f"bad header {bytes(data[:8]).hex()}", fatal=True)
    length = int.from_bytes(data[4:8], "little" if endian else "big")
    if length < HEADER + 1:
        raise QIPCError(f"bad length {length}", fatal=True)
    if length > max_bytes:
        raise QIPCError(f"limit: message of {length} bytes, over {max_bytes}", fatal=True)
    return Header(bool(endian), msgtype, bool(compressed), length)


def frame(obj: Any, msgtype: int = RESPONSE, compress: bool = False) -> bytes:
    """A whole message: header + body; compressed when `compress` and it is over 2,000 bytes and
    compression halves it (as kdb+ does)."""
    body = encode(obj)
    msg = b"".join((bytes([1, msgtype, 0, 0]), struct.pack("<I", len(body) + HEADER), body))
    if compress and len(msg) > COMPRESS_MIN:
        packed = compress_message(msg)
        if packed is not None:
            return packed
    return msg


def unframe(msg: bytes | bytearray | memoryview) -> tuple[Header, Any]:
    """Header and object of one whole message (decompressed first if it is compressed)."""
    h = parse_header(msg)
    if len(msg) < h.length:
        raise QIPCError(f"truncated: {len(msg)} of {h.length} bytes")
    if h.compressed:
        msg = decompress_message(bytes(msg[: h.length]))
    body = memoryview(msg)[HEADER : int.from_bytes(msg[4:8], "little" if h.little else "big")]
    return h, decode(body, h.little)


# ---- encode ---------------------------------------------------------------------------------------------
def _sym_bytes(names: Any) -> bytes:
    if isinstance(names, pa.Array | pa.ChunkedArray):
        return _arrow_sym_bytes(names)
    if not names:
        return b""
    return "\0".join(names).encode() + b"\0"


def _arrow_sym_bytes(arr: pa.Array | pa.ChunkedArray) -> bytes:
    """A string column as NUL-terminated symbols, built with numpy from Arrow's buffers (nulls: `)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    n = len(arr)
    if n == 0:
        return b""
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    total = int(lengths.sum())
    out = np.zeros(total + n, dtype=np.uint8)
    starts = np.repeat(offsets[:-1], lengths)
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    dst = np.arange(total) + np.repeat(np.arange(n), lengths)
    out[dst] = data[starts + within]
    return out.tobytes()


def _atom_bytes(a: Atom) -> bytes:
    t, v = a.t, a.value
    head = struct.pack("b", t)
    if t == -11:
        return head + str(v).encode() + b"\0"
    if t == -10:
        return head + (v.encode() if isinstance(v, str) else bytes(v))[:1]
    if t == -2:
        return head + bytes(v)
    if t == -1:
        return head + bytes([1 if v else 0])
    return head + np.array(v, dtype=_DTYPES[-t]).astype("<" + _DTYPES[-t]).tobytes()


def _vector_bytes(v: Vector) -> bytes:
    t = v.t
    if t == 11:
        payload = _sym_bytes(v.data)
    elif t == 10:
        payload = bytes(v.data)
    elif t == 2:
        payload = np.ascontiguousarray(v.data, dtype=np.uint8).tobytes()
    else:
        arr = np.asarray(v.data)
        payload = arr.astype("<" + _DTYPES[t], copy=False).tobytes()
    return struct.pack("<bBi", t, v.attr, len(v.data)) + payload


def _encode(obj: Any, out: list[bytes]) -> None:
    if isinstance(obj, Vector):
        out.append(_vector_bytes(obj))
    elif isinstance(obj, Atom):
        out.append(_atom_bytes(obj))
    elif isinstance(obj, Table):
        out.append(struct.pack("<bB", 98, obj.attr))
        _encode(Dict(symbols(obj.columns), QList(list(obj.data))), out)
    elif isinstance(obj, Dict):
        out.append(b"\x7f" if obj.sorted else b"\x63")
        _encode(obj.keys, out)
        _encode(obj.values, out)
    elif isinstance(obj, QList):
        out.append(struct.pack("<bBi", 0, obj.attr, len(obj.items)))
        for item in obj.items:
            _encode(item, out)
    elif isinstance(obj, QError):
        out.append(b"\x80" + obj.text.replace("\0", " ").encode() + b"\0")
    elif obj is NULL or obj is None:
        out.append(b"\x65\x00")
    elif isinstance(obj, Function):
        out.append(struct.pack("b", obj.t) + obj.body)
    elif isinstance(obj, bool | np.bool_):
        out.append(_atom_bytes(Atom(-1, bool(obj))))
    elif isinstance(obj, int | np.integer):
        out.append(_atom_bytes(Atom(-7, int(obj))))
    elif isinstance(obj, float | np.floating):
        out.append(_atom_bytes(Atom(-9, float(obj))))
    elif isinstance(obj, str):
        out.append(_vector_bytes(chars(obj)))
    elif isinstance(obj, list | tuple):
        _encode(QList(list(obj)), out)
    else:
        raise TypeError(f"no q type for a Python {type(obj).__name__}")


def encode(obj: Any) -> bytes:
    """The body of a message holding `obj` (what -8! gives after its 8-byte header). Python values
    are taken as q would read them: int -> long, float -> float, str -> char vector, list -> list."""
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


# ---- decode ---------------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, buf: memoryview, little: bool):
        self.buf = buf
        self.pos = 0
        self.e = "<" if little else ">"

    def need(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > len(self.buf):
            raise QIPCError(f"truncated message: {n} bytes needed at byte {p + HEADER}")
        self.pos = p + n
        return p

    def byte(self) -> int:
        return self.buf[self.need(1)]

    def int32(self) -> int:
        p = self.need(4)
        return struct.unpack_from(self.e + "i", self.buf, p)[0]

    def cstring(self) -> str:
        p = self.pos
        end = bytes(self.buf[p : p + 4096]).find(b"\0")
        if end < 0:
            end = bytes(self.buf[p:]).find(b"\0")
            if end < 0:
                raise QIPCError(f"truncated message: unterminated symbol at byte {p + HEADER}")
        self.pos = p + end + 1
        return bytes(self.buf[p : p + end]).decode("utf-8", errors="replace")

    def symbols(self, n: int) -> list[str]:
        if n == 0:
            return []
        p = self.pos
        window = max(64, n * 16)
        while True:
            chunk = np.frombuffer(self.buf, dtype=np.uint8, count=min(window, len(self.buf) - p), offset=p)
            zeros = np.flatnonzero(chunk == 0)
            if len(zeros) >= n or p + window >= len(self.buf):
                break
            window *= 4
        if len(zeros) < n:
            raise QIPCError(f"truncated message: {n} symbols expected at byte {p + HEADER}")
        end = p + int(zeros[n - 1])
        self.pos = end + 1
        return bytes(self.buf[p:end]).decode("utf-8", errors="replace").split("\0")

    def array(self, t: int, n: int) -> np.ndarray:
        dtype = np.dtype(self.e + _DTYPES[t])
        p = self.need(n * dtype.itemsize)
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=p)
        if self.e == ">":
            arr = arr.astype(dtype.newbyteorder("="))
        return arr.view(bool) if t == 1 else arr

    def obj(self) -> Any:
        t = struct.unpack("b", bytes([self.byte()]))[0]
        if t < 0:
            return self.atom(t)
        if t <= 19:
            if t == 3:
                raise QIPCError("unknown type byte 3")
            attr = self.byte()
            n = self.int32()
            if n < 0:
                raise QIPCError(f"bad length {n} of a type {t} vector")
            if t == 0:
                return QList([self.obj() for _ in range(n)], attr)
            if t == 11:
                return Vector(11, self.symbols(n), attr)
            if t == 10:
                p = self.need(n)
                return Vector(10, bytes(self.buf[p : p + n]), attr)
            if t == 2:
                p = self.need(16 * n)
                return Vector(2, np.frombuffer(self.buf, np.uint8, 16 * n, p).reshape(n, 16), attr)
            return Vector(t, self.array(t, n), attr)
        if t == 98:
            attr = self.byte()
            d = self.obj()
            if not isinstance(d, Dict) or not isinstance(d.keys, Vector) or d.keys.t != 11:
                raise QIPCError("a table (98) must hold a dict of symbols to columns")
            cols = d.values.items if isinstance(d.values, QList) else None
            if cols is None or len(cols) != len(d.keys):
                raise QIPCError("a table's columns must be a general list, one per name")
            return Table(list(d.keys.data), list(cols), attr)
        if t in (99, 127):
            return Dict(self.obj(), self.obj(), sorted=t == 127)
        if t == 100:
            start = self.pos
            self.cstring()
            body = self.obj()
            return Function(100, bytes(self.buf[start : self.pos]), text_of(body) or "")
        if 101 <= t <= 103:
            p = self.need(1)
            if t == 101 and self.buf[p] == 0:
                return NULL
            return Function(t, bytes(self.buf[p : p + 1]))
        if t in (104, 105):
            start = self.pos
            for _ in range(self.int32()):
                self.obj()
            return Function(t, bytes(self.buf[start : self.pos]))
        if 106 <= t <= 111:
            start = self.pos
            self.obj()
            return Function(t, bytes(self.buf[start : self.pos]))
        raise QIPCError(f"unknown type byte {t} at byte {self.pos - 1 + HEADER}")

    def atom(self, t: int) -> Any:
        if t == -128:
            return QError(self.cstring())
        if t == -11:
            return Atom(-11, self.cstring())
        if t == -10:
            p = self.need(1)
            return Atom(-10, bytes(self.buf[p : p + 1]))
        if t == -2:
            p = self.need(16)
            return Atom(-2, bytes(self.buf[p : p + 16]))
        if t == -1:
            return Atom(-1, bool(self.byte()))
        if t < -19 or t == -3:
            raise QIPCError(f"unknown type byte {t} at byte {self.pos - 1 + HEADER}")
        value = self.array(-t, 1)[0]
        return Atom(t, value.item())


def decode(body: bytes | memoryview, little: bool = True) -> Any:
    """The q object of a message body (after the header); QIPCError if it does not decode or leaves
    bytes over."""
    r = _Reader(memoryview(body).cast("B") if isinstance(body, memoryview) else memoryview(body), little)
    obj = r.obj()
    if r.pos != len(r.buf):
        raise QIPCError(f"bad length: {len(r.buf) - r.pos} bytes left after the object")
    return obj


# ---- the q log file (a tickerplant's log: what -11! streams) -------------------------------------------
# A q log is a file a q `set ()` created and `h enlist x` then appended to: an 8-byte file header
# (0xff 0x01 and six zero bytes), the general list's type (0) and attribute bytes, its item count as an
# int32 (kept up to date by each append), then each item as -8! would serialize it without the 8-byte
# message header. tick.q appends one `(`upd; `table; data)` per message; -11!(n; file) executes the first n.
LOG_MAGIC = b"\xff\x01" + bytes(6)
LOG_HEADER = len(LOG_MAGIC) + 6  # ... + type, attribute, int32 count
LOG_COUNT_AT = len(LOG_MAGIC) + 2  # where the item count is


def log_header(count: int = 0) -> bytes:
    """The first bytes of a q log file holding `count` items (an empty one: what `set ()` writes)."""
    return LOG_MAGIC + struct.pack("<bBi", 0, 0, count)


def read_log(data: bytes | memoryview, n: int | None = None) -> list:
    """The first `n` items (all when None) of a q log file's bytes, read as -11!(n; file) reads them;
    QIPCError when the header is not a q log's or an item is torn (q's 'badtail)."""
    buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(buf) < LOG_HEADER or bytes(buf[: len(LOG_MAGIC)]) != LOG_MAGIC or buf[LOG_COUNT_AT - 2] != 0:
        raise QIPCError("not a q log file (no 0xff01 header of a general list)")
    r = _Reader(buf[LOG_HEADER:], True)
    items: list = []
    while r.pos < len(r.buf) and (n is None or len(items) < n):
        try:
            items.append(r.obj())
        except QIPCError as e:
            raise QIPCError(f"badtail: item {len(items)} of the log is torn ({e})") from e
    if n is not None and len(items) < n:
        raise QIPCError(f"badtail: {n} items asked for, the log holds {len(items)}")
    return items


# ---- compression (kx's algorithm) -------------------------------------------------------------------------
@numba.njit(cache=True)
def _compress(y: np.ndarray, out: np.ndarray) -> int:  # pragma: no cover - compiled
    t = len(y)
    e = len(out)
    table = np.zeros(256, np.int64)
    out[:4] = y[:4]
    out[2] = 1
    for k in range(4):
        out[8 + k] = (t >> (8 * k)) & 0xFF
    c = 12
    d = c
    i = 0
    f = 0
    h0 = np.int64(0)
    h = np.int64(0)
    p = 0
    s0 = 0
    s = 8
    while s < t:
        if i == 0:
            if d > e - 17:
                return -1
            i = 1
            out[c] = f
            c = d
            d += 1
            f = 0
        literal = s > t - 3
        if not literal:
            h = np.int64(y[s]) ^ np.int64(y[s + 1])
            p = table[h]
            literal = p == 0 or y[s] != y[p]
        if s0 > 0:
            table[h0] = s0
            s0 = 0
        if literal:
            h0 = h
            s0 = s
            out[d] = y[s]
            d += 1
            s += 1
        else:
            table[h] = s
            f |= i
            p += 2
            s += 2
            r = s
            q = min(s + 255, t)
            while y[p] == y[s]:
                s += 1
                if s >= q:
                    break
                p += 1
            out[d] = h
            out[d + 1] = s - r
            d += 2
        i = (i * 2) & 0xFF
    out[c] = f
    for k in range(4):
        out[4 + k] = (d >> (8 * k)) & 0xFF
    return d


@numba.njit(cache=True)
def _decompress(src: np.ndarray, dst: np.ndarray) -> int:  # pragma: no cover - compiled
    """0, or -1 if `src` is not a valid compressed message (every index is checked)."""
    table = np.zeros(256, np.int64)
    n = 0
    f = 0
    s = 8
    p = s
    i = 0
    d = 12
    end = len(dst)
    size = len(src)
    dst[:8] = src[:8]
    while s < end:
        if i == 0:
            if d >= size:
                return -1
            f = np.int64(src[d])
            d += 1
            i = 1
        if f & i:
            if d + 1 >= size:
                return -1
            r = table[np.int64(src[d])]
            d += 1
            if r < 8 or r + 1 >= s or s + 2 > end:
                return -1
            dst[s] = dst[r]
            dst[s + 1] = dst[r + 1]
            s += 2
            r += 2
            n = np.int64(src[d])
            d += 1
            if s + n > end:
                return -1
            for m in range(n):
                dst[s + m] = dst[r + m]
        else:
            if d >= size:
                return -1
            dst[s] = src[d]
            s += 1
            d += 1
        while p < s - 1:
            table[np.int64(dst[p]) ^ np.int64(dst[p + 1])] = p
            p += 1
        if f & i:
            s += n
            p = s
        i *= 2
        if i == 256:
            i = 0
    return 0


def compress_message(msg: bytes) -> bytes | None:
    """A whole uncompressed message compressed as kdb+ does, or None when that would not halve it."""
    y = np.frombuffer(msg, dtype=np.uint8)
    out = np.zeros(len(y) // 2, dtype=np.uint8)
    if len(out) < 32:
        return None
    d = _compress(y, out)
    return None if d < 0 else out[:d].tobytes()


def decompress_message(msg: bytes) -> bytes:
    """A compressed message (header included) -> the whole uncompressed message (its header says
    uncompressed); QIPCError if it is not valid."""
    if len(msg) < 12:
        raise QIPCError("truncated compressed message")
    little = msg[0] == 1
    size = int.from_bytes(msg[8:12], "little" if little else "big")
    if size < HEADER + 1 or size > 1 << 34:
        raise QIPCError(f"bad uncompressed length {size}")
    dst = np.zeros(size, dtype=np.uint8)
    if _decompress(np.frombuffer(msg, dtype=np.uint8), dst) < 0:
        raise QIPCError("bad compressed data")
    dst[2] = 0
    dst[4:8] = np.frombuffer(size.to_bytes(4, "little" if little else "big"), np.uint8)
    return dst.tobytes()


# ---- receiving: bytes in, events out ----------------------------------------------------------------------
@dataclass
class Message:
    msgtype: int
    obj: Any


@dataclass
class BadMessage:
    msgtype: int  # -1 when the header itself was bad
    reason: str
    fatal: bool  # the framing is lost: answer, then close


@dataclass
class Receiver:
    """A connection's incoming bytes -> its handshake, then its messages (sans-I/O: the server feeds
    what it reads and acts on the events). `max_bytes`: a message longer than this is refused (fatal)."""

    max_bytes: int = 1 << 30
    hello: Hello | None = None
    buf: bytearray = field(default_factory=bytearray)
    dead: bool = False

    def feed(self, data: bytes) -> list[Hello | Message | BadMessage]:
        if self.dead:
            return []
        self.buf += data
        events: list[Hello | Message | BadMessage] = []
        if self.hello is None:
            got = parse_hello(self.buf)
            if got is None:
                if len(self.buf) > 4096:
                    self.dead = True
                    events.append(BadMessage(-1, "handshake: no NUL in 4096 bytes", True))
                return events
            self.hello, used = got
            del self.buf[:used]
            events.append(self.hello)
        while len(self.buf) >= HEADER:
            try:
                h = parse_header(self.buf, self.max_bytes)
            except QIPCError as e:
                self.dead = True
                events.append(BadMessage(self.buf[1] if self.buf[1] <= 2 else -1, str(e), True))
                self.buf.clear()
                break
            if len(self.buf) < h.length:
                break
            msg = bytes(self.buf[: h.length])
            del self.buf[: h.length]
            try:
                events.append(Message(h.msgtype, unframe(msg)[1]))
            except QIPCError as e:
                events.append(BadMessage(h.msgtype, str(e), False))
        return events


# ---- Arrow <-> q ------------------------------------------------------------------------------------------
def _null_fill(arr: pa.Array, np_values: np.ndarray, null: Any) -> np.ndarray:
    if arr.null_count:
        np_values = np_values.copy()
        np_values[arr.is_null().to_numpy(zero_copy_only=False)] = null
    return np_values


def _ints(arr: pa.Array, dtype: str, null: int) -> np.ndarray:
    filled = pc.fill_null(arr, 0) if arr.null_count else arr
    return _null_fill(arr, filled.to_numpy(zero_copy_only=False).astype(dtype, copy=False), null)


def arrow_column_to_q(name: str, col: pa.Array | pa.ChunkedArray, kind: str | None = None) -> Vector | QList:
    """One Arrow column as a q vector (a list of strings for a `text` column); QIPCError naming the
    column when its type has no q type."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    typ = col.type
    if pa.types.is_dictionary(typ):
        col = col.dictionary_decode()
        typ = col.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        if kind == "text" or (kind is None and name in TEXT_COLUMNS):
            return QList([chars(s or "") for s in col.to_pylist()])
        return Vector(11, col)  # symbols, built from Arrow's buffers when encoded
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        flat = arrow_column_to_q(name, col.flatten())
        offs = col.offsets.to_numpy()
        if isinstance(flat, QList):
            return QList([QList(flat.items[a:b]) for a, b in zip(offs[:-1], offs[1:], strict=True)])
        return QList([Vector(flat.t, flat.data[a:b]) for a, b in zip(offs[:-1], offs[1:], strict=True)])
    tname = str(typ).split("[")[0].split("(")[0]
    t = ARROW_RESULT.get(tname)
    if t is None:
        raise QIPCError(f"column {name}: Arrow type {typ} has no q type")
    n = len(col)
    if t == 1:
        return Vector(1, pc.fill_null(col, False).to_numpy(zero_copy_only=False).astype(bool))
    if t == 9 and pa.types.is_null(typ):
        return Vector(9, np.full(n, np.nan))
    if t in (8, 9):
        vals = pc.cast(col, pa.float64() if t == 9 else pa.float32()).to_numpy(zero_copy_only=False)
        return Vector(t, vals.astype("f8" if t == 9 else "f4", copy=False))
    if t == 4:
        return Vector(4, _ints(col, "u1", 0))
    if t in (5, 6, 7):
        return Vector(t, _ints(col, _DTYPES[t], {5: NULL_SHORT, 6: NULL_INT, 7: NULL_LONG}[t]))
    if t == 12:
        ns = pc.cast(col, pa.timestamp("ns", typ.tz)).cast(pa.int64())
        return Vector(12, _null_fill(ns, _ints(ns, "i8", 0) - EPOCH_2000_NS, NULL_LONG))
    if t == 14:
        days = pc.cast(col, pa.date32()).cast(pa.int32())
        return Vector(14, _null_fill(days, _ints(days, "i4", 0) - EPOCH_2000_DAYS, NULL_INT))
    if t == 16:
        ns = pc.cast(col, pa.duration("ns")).cast(pa.int64())
        return Vector(16, _ints(ns, "i8", NULL_LONG))
    assert t == 19
    us = pc.cast(col, pa.time64("us")).cast(pa.int64())
    return Vector(19, _null_fill(us, (_ints(us, "i8", 0) // 1000).astype("i4"), NULL_INT))


def from_arrow(table: pa.Table | pa.RecordBatch, keys: int = 0, kinds: dict[str, str] | None = None) -> Any:
    """An Arrow table as a q table; with `keys` > 0 a keyed table (its first `keys` columns the key).
    `kinds`: column -> schemas.tables kind (a `text` column goes out as strings)."""
    kinds = kinds or {}
    names = list(table.schema.names)
    cols = [arrow_column_to_q(n, table.column(i), kinds.get(n)) for i, n in enumerate(names)]
    if 0 < keys < len(names):
        return Dict(Table(names[:keys], cols[:keys]), Table(names[keys:], cols[keys:]))
    return Table(names, cols)


def q_column_to_arrow(name: str, col: Any) -> pa.Array:
    """One q column as Arrow: symbols and strings -> string, numbers as themselves, temporal types
    -> Arrow's (timestamp ns, date32, duration ns, time32 ms); q nulls -> Arrow nulls (except
    floats: NaN stays NaN). QIPCError naming the column for anything else."""
    if isinstance(col, QList):
        texts = [text_of(x) for x in col.items]
        if any(x is None for x in texts):
            raise QIPCError(f"column {name}: a general list that is not all strings")
        return pa.array(texts, pa.string())
    if not isinstance(col, Vector):
        raise QIPCError(f"column {name}: not a vector ({type(col).__name__})")
    t, d = col.t, col.data
    if t == 11:
        return d if isinstance(d, pa.Array) else pa.array(list(d), pa.string())
    if t == 10:
        return pa.array(list(d.decode(errors="replace")), pa.string())
    if t in (1, 4, 8, 9):
        return pa.array(np.asarray(d))
    if t in (5, 6, 7):
        arr = np.asarray(d)
        return pa.array(arr, mask=arr == {5: NULL_SHORT, 6: NULL_INT, 7: NULL_LONG}[t])
    if t in (12, 14, 16, 19, 17, 18, 13):
        arr = np.asarray(d).astype(np.int64)
        mask = arr == (NULL_LONG if t in (12, 16) else NULL_INT)
        if t == 12:
            return pa.array(arr + EPOCH_2000_NS, pa.int64(), mask=mask).cast(pa.timestamp("ns"))
        if t == 14:
            return pa.array((arr + EPOCH_2000_DAYS).astype(np.int32), pa.int32(), mask=mask).cast(pa.date32())
        if t == 16:
            return pa.array(arr, pa.int64(), mask=mask).cast(pa.duration("ns"))
        if t == 19:
            return pa.array(arr.astype(np.int32), pa.int32(), mask=mask).cast(pa.time32("ms"))
        if t == 17:
            return pa.array(arr * 60, pa.int32(), mask=mask).cast(pa.time32("s"))
        if t == 18:
            return pa.array(arr.astype(np.int32), pa.int32(), mask=mask).cast(pa.time32("s"))
    raise QIPCError(f"column {name}: q type {NAMES.get(t, t)} has no Arrow type here")


def to_arrow(table: Table) -> pa.Table:
    """A q table as Arrow (q_column_to_arrow per column)."""
    return pa.table([q_column_to_arrow(n, c) for n, c in zip(table.columns, table.data, strict=True)],
                    names=table.columns)  # fmt: skip


def empty_table(columns: dict[str, int]) -> Table:
    """An empty q table of column -> q type number (0: a general list, e.g. of strings)."""
    data: list = []
    for t in columns.values():
        if t == 0:
            data.append(QList([]))
        elif t == 11:
            data.append(Vector(11, []))
        else:
            data.append(Vector(t, np.zeros(0, _DTYPES[t])))
    return Table(list(columns), data)


def error_text(reason: str) -> str:
    """A q error's text: one line (q shows it after a quote)."""
    return " ".join(reason.split())[:4000]
