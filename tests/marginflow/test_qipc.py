"""marginflow.qipc byte for byte: kx's "Serialization examples" (code.kx.com, written out below), every
atom and vector type both ways, q's nulls, kx's compression, malformed messages, Arrow <-> q."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from marginflow import qipc as q
from schemas import qtypes
from schemas.tables import TABLES

# code.kx.com/q/kb/serialization: `-8!x` of each example, as printed there
KX_EXAMPLES = [
    ("-8!1i", "010000000d000000fa01000000", q.Atom(-6, 1)),
    ("-8!enlist 1i", "010000001200000006000100000001000000", q.vector(6, [1])),
    ("-8!`byte$til 5", "01000000130000000400050000000001020304", q.vector(4, range(5))),
    ("-8!`byte$enlist til 5", "01000000190000000000010000000400050000000001020304",
     q.QList([q.vector(4, range(5))])),
    ("-8!`a`b!2 3i", "0100000021000000630b0002000000610062000600020000000200000003000000",
     q.Dict(q.symbols(["a", "b"]), q.vector(6, [2, 3]))),
    ("-8!`s#`a`b!2 3i", "01000000210000007f0b0102000000610062000600020000000200000003000000",
     q.Dict(q.Vector(11, ["a", "b"], attr=1), q.vector(6, [2, 3]), sorted=True)),
    ("-8!`a`b!enlist each 2 3i",
     "010000002d000000630b0002000000610062000000020000000600010000000200000006000100000003000000",
     q.Dict(q.symbols(["a", "b"]), q.QList([q.vector(6, [2]), q.vector(6, [3])]))),
    ("-8!([]a:enlist 2i;b:enlist 3i)",
     "010000002f0000006200630b0002000000610062000000020000000600010000000200000006000100000003000000",
     q.Table(["a", "b"], [q.vector(6, [2]), q.vector(6, [3])])),
    ("-8!`s#([]a:enlist 2i;b:enlist 3i)",
     "010000002f0000006201630b0002000000610062000000020000000603010000000200000006000100000003000000",
     q.Table(["a", "b"], [q.Vector(6, np.array([2], "i4"), attr=3), q.vector(6, [3])], attr=1)),
    ("-8!([a:enlist 2i]b:enlist 3i)",
     "010000003f000000636200630b00010000006100000001000000060001000000"
     "020000006200630b0001000000620000000100000006000100000003000000",
     q.Dict(q.Table(["a"], [q.vector(6, [2])]), q.Table(["b"], [q.vector(6, [3])]))),
    ("-8!`s#([a:enlist 2i]b:enlist 3i)",
     "010000003f0000007f6201630b00010000006100000001000000060001000000"
     "020000006200630b0001000000620000000100000006000100000003000000",
     q.Dict(q.Table(["a"], [q.vector(6, [2])], attr=1), q.Table(["b"], [q.vector(6, [3])]), sorted=True)),
    ("-8!{x+y}", "010000001500000064000a00050000007b782b797d",
     q.Function(100, bytes.fromhex("000a00050000007b782b797d"), "{x+y}")),
]  # fmt: skip


@pytest.mark.parametrize("expr, hexbytes, obj", KX_EXAMPLES, ids=[e[0] for e in KX_EXAMPLES])
def test_kx_serialization_examples(expr: str, hexbytes: str, obj: object) -> None:
    assert q.frame(obj, q.ASYNC).hex() == hexbytes
    header, back = q.unframe(bytes.fromhex(hexbytes))
    assert (header.little, header.msgtype, header.compressed, header.length) == (
        True,
        0,
        False,
        len(hexbytes) // 2,
    )
    assert q.frame(back, q.ASYNC).hex() == hexbytes  # decoded and encoded again: the same bytes


ATOMS = [
    (q.Atom(-1, True), "ff01"),
    (q.Atom(-2, bytes(range(16))), "fe" + bytes(range(16)).hex()),
    (q.Atom(-4, 255), "fcff"),
    (q.Atom(-5, -2), "fbfeff"),
    (q.Atom(-6, q.NULL_INT), "fa00000080"),  # 0Ni
    (q.Atom(-7, q.NULL_LONG), "f90000000000000080"),  # 0Nj
    (q.Atom(-7, 2**63 - 1), "f9ffffffffffffff7f"),  # 0Wj
    (q.Atom(-8, 1.5), "f80000c03f"),
    (q.Atom(-9, float("inf")), "f7000000000000f07f"),  # 0w
    (q.Atom(-10, b"a"), "f661"),
    (q.Atom(-11, "ab"), "f5616200"),
    (q.Atom(-12, 1), "f40100000000000000"),  # 2000.01.01D00:00:00.000000001
    (q.Atom(-13, 12), "f30c000000"),  # 2001.01m
    (q.Atom(-14, -1), "f2ffffffff"),  # 1999.12.31
    (q.Atom(-15, 0.5), "f1000000000000e03f"),  # 2000.01.01T12:00:00.000
    (q.Atom(-16, 10**9), "f000ca9a3b00000000"),  # 0D00:00:01
    (q.Atom(-17, 61), "ef3d000000"),  # 01:01
    (q.Atom(-18, 3661), "ee4d0e0000"),  # 01:01:01
    (q.Atom(-19, 1), "ed01000000"),  # 00:00:00.001
]


@pytest.mark.parametrize("atom, hexbytes", ATOMS, ids=[q.NAMES[-a.t] for a, _ in ATOMS])
def test_atoms_both_ways(atom: q.Atom, hexbytes: str) -> None:
    assert q.encode(atom).hex() == hexbytes
    back = q.decode(bytes.fromhex(hexbytes))
    assert back.t == atom.t
    assert back.value == atom.value


@pytest.mark.parametrize("t", [1, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19])
def test_vectors_both_ways_through_numpy(t: int) -> None:
    values = [0, 1, 1, 0] if t == 1 else [1, 2, 3, 0]
    v = q.vector(t, values)
    data = q.encode(v)
    assert data[:6] == bytes([t, 0]) + (4).to_bytes(4, "little")
    assert q.decode(data) == v
    big = q.decode(
        data[:0] + bytes([t, 0]) + (10**6).to_bytes(4, "little") + np.zeros(10**6, q._DTYPES[t]).tobytes()
    )
    assert len(big) == 10**6 and isinstance(big.data, np.ndarray)


def test_symbols_chars_lists_errors_and_null() -> None:
    for obj in (
        q.symbols(["IBM", "", "MSFT"]),
        q.chars("hello"),
        q.QList([q.sym("a"), q.chars("b"), q.Atom(-9, 1.0)]),
    ):
        back = q.decode(q.encode(obj))
        assert q.encode(back) == q.encode(obj)
    assert q.encode(q.QError("type")) == b"\x80type\x00"
    assert q.decode(b"\x80type\x00") == q.QError("type")
    assert q.decode(q.encode(q.NULL)) is q.NULL
    assert q.decode(b"\x02\x00\x01\x00\x00\x00" + bytes(range(16))).data.tobytes() == bytes(range(16))  # guid


def test_big_endian_messages_decode() -> None:
    msg = bytes.fromhex("00000000") + (18).to_bytes(4, "big") + bytes.fromhex("06000000000100000001")
    h, obj = q.unframe(msg)
    assert not h.little and obj == q.vector(6, [1])


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"\x03\x00\x01\x00\x00\x00\x00", "unknown type byte 3"),
        (b"\x4d", "unknown type byte 77"),
        (b"\x07\x00\x02\x00\x00\x00" + bytes(8), "truncated message"),
        (b"\x0b\x00\x02\x00\x00\x00a\x00b", "truncated message: 2 symbols"),
        (b"\xfa\x01\x00\x00\x00\x00", "bad length: 1 bytes left"),
        (b"\x62\x00\x06\x00\x00\x00\x00\x00", "a table (98) must hold a dict"),
    ],
)
def test_malformed_bodies_are_errors_not_crashes(body: bytes, reason: str) -> None:
    with pytest.raises(q.QIPCError, match=reason.replace("(", r"\(").replace(")", r"\)")) as e:
        q.decode(body)
    assert not e.value.fatal


def test_receiver_frames_handshake_and_messages_and_loses_framing_on_a_bad_header() -> None:
    rx = q.Receiver(max_bytes=10_000)
    msg = q.frame(q.chars("count trade"), q.SYNC)
    evs = rx.feed(q.hello("u", "tok", 6) + msg[:5])
    assert evs == [q.Hello("u", "tok", 6)] and q.hello_reply(6) == b"\x03"
    evs = rx.feed(msg[5:] + msg)
    assert [(e.msgtype, q.text_of(e.obj)) for e in evs] == [(1, "count trade")] * 2
    evs = rx.feed(bytes.fromhex("01010000") + (12).to_bytes(4, "little") + b"\x4d\x00\x00\x00")
    assert isinstance(evs[0], q.BadMessage) and not evs[0].fatal and "unknown type byte 77" in evs[0].reason
    evs = rx.feed(bytes.fromhex("01010000") + (4).to_bytes(4, "little"))  # a length shorter than the header
    assert evs[0].fatal and "bad length 4" in evs[0].reason and rx.dead
    rx = q.Receiver(max_bytes=100)
    rx.feed(q.hello("u", "t"))
    assert rx.feed(q.frame(q.vector(7, range(100))))[0].fatal  # over max_bytes


def test_compression_round_trip_and_the_2000_byte_rule() -> None:
    v = q.vector(7, np.arange(50_000) % 10)
    plain, packed = q.frame(v), q.frame(v, compress=True)
    assert packed[2] == 1 and len(packed) < len(plain) // 10
    assert int.from_bytes(packed[4:8], "little") == len(packed)
    assert int.from_bytes(packed[8:12], "little") == len(plain)
    assert q.unframe(packed)[1] == v
    assert q.decompress_message(packed) == plain
    small = q.vector(7, [1] * 100)  # 814 bytes: never compressed
    assert q.frame(small, compress=True)[2] == 0
    noise = q.vector(9, np.random.default_rng(1).random(1000))  # does not halve: sent plain
    assert q.frame(noise, compress=True)[2] == 0
    with pytest.raises(q.QIPCError, match="bad compressed data"):
        q.decompress_message(packed[:12] + b"\xff" * (len(packed) - 12))


def test_arrow_to_q_and_back_with_nulls() -> None:
    t = pa.table({
        "sym": pa.array(["a", None, "ccc"]),
        "price": pa.array([1.0, None, float("inf")]),
        "size": pa.array([1, None, 3], pa.int64()),
        "n": pa.array([1, None, 3], pa.int32()),
        "time": pa.array([0, None, 1], pa.timestamp("ns")),
        "d": pa.array([0, None, 10957], pa.date32()),
        "ok": pa.array([True, False, None]),
        "drivers": pa.array(["{}", "[1]", None]),
    })  # fmt: skip
    qt = q.from_arrow(t)
    types = [c.t if isinstance(c, q.Vector) else 0 for c in qt.data]
    assert types == [11, 9, 7, 6, 12, 14, 1, 0]
    assert qt.data[0].data.to_pylist() == ["a", None, "ccc"]  # Arrow until encoded; ` on the wire
    back = q.unframe(q.frame(qt))[1]
    assert back.column("sym").data == ["a", "", "ccc"]
    assert np.isnan(back.column("price").data[1]) and back.column("price").data[2] == np.inf
    assert back.column("size").data[1] == q.NULL_LONG and back.column("n").data[1] == q.NULL_INT
    assert back.column("time").data.tolist() == [-q.EPOCH_2000_NS, q.NULL_LONG, 1 - q.EPOCH_2000_NS]
    assert back.column("d").data.tolist() == [-10957, q.NULL_INT, 0]
    arrow = q.to_arrow(back)
    assert arrow.column("size").to_pylist() == [1, None, 3]
    assert (
        arrow.column("time").to_pylist()[1] is None and arrow.column("time").cast(pa.int64())[2].as_py() == 1
    )
    assert arrow.column("drivers").to_pylist() == ["{}", "[1]", ""]
    keyed = q.from_arrow(t.select(["sym", "price"]), keys=1)
    assert isinstance(keyed, q.Dict) and keyed.keys.columns == ["sym"] and keyed.values.columns == ["price"]


def test_unmapped_types_are_refused_naming_the_column() -> None:
    t = pa.table({"s": pa.array([{"a": 1}])})
    with pytest.raises(q.QIPCError, match="column s: Arrow type struct"):
        q.from_arrow(t)
    with pytest.raises(q.QIPCError, match="column g: a general list that is not all strings"):
        q.q_column_to_arrow("g", q.QList([q.Atom(-7, 1)]))


def test_every_column_kind_has_one_q_type() -> None:
    for table in TABLES.values():
        for name, qt in qtypes.table_qtypes(table).items():
            assert qt.char in "sCfjp", name
    assert qtypes.qtype(TABLES["trade"].columns[0]).char == "p"
    from schemas.tables import Column

    with pytest.raises(qtypes.QTypeError, match="table x, column c: kind 'blob' has no q type"):
        qtypes.qtype(Column("c", "blob"), "x")


# A q log file as q writes it: `:out set () then h:hopen`:out; h (1 2;3) (join-append of two items),
# read1`:out as printed in stackoverflow.com/questions/72488931 (answer by rianoc of KX).
Q_LOG_EXAMPLE = "ff0100000000000000000200000007000200000001000000000000000200000000000000f90300000000000000"


def test_q_log_file_layout_matches_what_q_writes() -> None:
    items = [q.vector(7, [1, 2]), q.Atom(-7, 3)]
    written = q.log_header(len(items)) + b"".join(q.encode(x) for x in items)
    assert written.hex() == Q_LOG_EXAMPLE
    assert q.log_header(0) == bytes.fromhex("ff01000000000000000000000000")  # what `set ()` writes
    assert q.read_log(bytes.fromhex(Q_LOG_EXAMPLE)) == items
    assert q.read_log(bytes.fromhex(Q_LOG_EXAMPLE), 1) == items[:1]  # -11!(1; file)
    upd = q.QList([q.sym("upd"), q.sym("trade"), q.Table(["sym"], [q.symbols(["A"])])])
    log = q.log_header(1) + q.encode(upd)
    assert q.read_log(log) == [upd]
    with pytest.raises(q.QIPCError, match="badtail: item 0 of the log is torn"):
        q.read_log(log[:-1])
    with pytest.raises(q.QIPCError, match="badtail: 2 items asked for, the log holds 1"):
        q.read_log(log, 2)
    with pytest.raises(q.QIPCError, match="not a q log file"):
        q.read_log(q.frame(upd))
