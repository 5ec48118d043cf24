"""SPAN XML parser: the Takasbank file parses fast and completely; corrupted copies are refused by element."""

from __future__ import annotations

import hashlib
import re
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from calc.span import (
    SpanBook,
    SpanFileError,
    SpanPositionError,
    contract_key,
    format_key,
    load_span_file,
    parse_key,
    parse_span_bytes,
)
from tests.support import SPAN_FILE

SPN = SPAN_FILE


@pytest.fixture(scope="module")
def data() -> bytes:
    return SPN.read_bytes()


@pytest.mark.serial  # a bound on wall time: `make test` runs it alone, after the parallel part
def test_parses_under_a_second(data):
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        parse_span_bytes(data)
        times.append(time.perf_counter() - t0)
    assert min(times) < 1.0


def test_counts_identity_and_hash(params, data):
    root = ET.fromstring(data)
    n_opt = len(root.findall(".//oopPf/series/opt")) + len(root.findall(".//oofPf/series/opt"))
    n_fut = len(root.findall(".//futPf/fut"))
    n_phy = len(root.findall(".//phyPf/phy"))
    assert (n_opt, n_fut, n_phy) == (2628, 146, 37)
    assert params.n_contracts == n_opt + n_fut + n_phy
    assert len(params.cc_names) == 40 == len(root.findall(".//ccDef"))
    assert params.file_id == "TAKASBANK-20160517-final"
    assert params.business_date == "20160517" and params.clearing_org == "TAKASBANK"
    assert params.sha256 == hashlib.sha256(data).hexdigest()
    assert (
        params.sha256 == "41f46cbc07acf814f20b6045e5c25fed2c1e3a42257b5bbf4aa8b58761c90ef4"
    )  # data/README.md
    assert params.currencies == ("TRY",)
    assert params.warnings == ()
    # 40 intra spreads (one per ccDef) then the 56 interSpreads in priority order
    assert params.n_intra == 40 and len(params.s_rate) == 96
    assert [int(n.split(":")[1]) for n in params.s_name[40:]] == list(range(1, 57))


def test_scan_points_and_pairing(params, data):
    root = ET.fromstring(data)
    pts = root.findall("pointInTime/clearingOrg/pointDef/scanPointDef")
    assert params.n_points == 16
    assert [int(p.findtext("pairedPoint")) - 1 for p in pts] == params.point_paired.tolist()
    assert params.point_paired.tolist()[:4] == [1, 0, 3, 2] and params.point_paired.tolist()[14:] == [14, 15]
    assert params.time_points.tolist() == [0, 1]  # the two scenarios with no price move
    assert params.point_weight.tolist()[14:] == [0.32, 0.32]


def test_contract_arrays_match_the_xml(params, data):
    root = ET.fromstring(data)
    for opt in root.iter("opt"):
        if opt.findtext("cId") == "10813":  # AKBNKE 201605S0 C 7.00
            break
    k = params.lookup(contract_key("BIST", "AKBNKE", "OOP", "201605S0", "C", "7.00"))
    assert params.c_ra[k].tolist() == [float(a.text) for a in opt.find("ra").findall("a")]
    assert params.c_delta[k] == float(opt.findtext("ra/d")) == 0.895451
    assert params.c_value[k] == float(opt.findtext("val")) == 64.0
    assert params.c_som_rate[k] == 15.0
    assert params.cc_names[params.c_cc[k]] == "AKBNKE"
    assert params.p_pe[params.c_period[k]] == "201605S0"
    f = params.lookup(contract_key("BIST", "XU030", "FUT", "201606S0"))
    assert params.c_price[f] == 95.1 and params.c_cvf[f] == 100.0 and params.c_value[f] == 0.0


def test_contract_key_normalisation():
    assert contract_key("BIST", "AKBNKE", "oop", "201605S0", "c", "6.00") == contract_key(
        "BIST", "AKBNKE", "OOP", "201605S0", "C", 6
    )
    assert contract_key(" BIST", "XU030", "FUT", "201606S0", "C", 5) == (
        "BIST",
        "XU030",
        "FUT",
        "201606S0",
        "",
        None,
    )
    with pytest.raises(ValueError, match="pf_type"):
        contract_key("BIST", "XU030", "SWAP", "201606S0")
    with pytest.raises(ValueError, match="must be C or P"):
        contract_key("BIST", "XU030", "OOP", "201606S0", "X", 5)
    with pytest.raises(ValueError, match="strike"):
        contract_key("BIST", "XU030", "OOP", "201606S0", "C", "abc")


def refused(blob: bytes) -> SpanFileError:
    with pytest.raises(SpanFileError) as ei:
        parse_span_bytes(blob, "copy.spn")
    return ei.value


def test_truncated_file_names_the_open_element(data):
    cut = data.index(b"<opt>", len(data) // 2) + 40  # inside an option, before its risk array closes
    err = refused(data[:cut])
    assert err.element.startswith("spanFile/pointInTime/clearingOrg/exchange/oopPf/series/opt")
    assert "truncated" in err.reason
    assert "copy.spn" in str(err)


def test_bad_number_in_risk_array_names_the_contract(data):
    bad = data.replace(b"<a>-29.760841</a>", b"<a>1e</a>", 1)
    err = refused(bad)
    assert err.element.endswith("oopPf[pfCode=AKBNKE]/series[pe=201605S0]/opt[cId=10809]/ra/a[3]")
    assert "'1e' is not a number" in err.reason


@pytest.mark.parametrize(
    ("pattern", "replacement", "element", "reason"),
    [
        (rb"<pairedPoint>2</pairedPoint>", b"", "scanPointDef[point=1]/pairedPoint", "missing"),
        (rb"<currency>TRY</currency>(\s*<riskExponent>)", rb"\1", "ccDef[cc=AKBNKE]/currency", "missing"),
        (
            rb"<rs>A</rs>",
            b"<rs>Q</rs>",
            "ccDef[cc=AKBNKE]/dSpread[spread=1]/tLeg[cc=AKBNKE]/rs",
            "must be A or B",
        ),
        (rb"<a>0.239129</a>", b"", "opt[cId=10809]/ra", "15 <a> values"),
        (rb"<k>6.00</k>", b"<k>inf</k>", "opt[cId=10809]/k", "not a finite number"),
        (
            rb"<chargeMeth>W</chargeMeth>",
            b"<chargeMeth>Z</chargeMeth>",
            "interSpreads/dSpread/chargeMeth",
            "F, P or W",
        ),
        (rb"</futPf>", b"</fut>", "spanFile/pointInTime/clearingOrg/exchange/futPf", "mismatched tag"),
        (rb"<date>20160517</date>", b"<date>2016-05-17</date>", "pointInTime/date", "YYYYMMDD"),
    ],
)
def test_corrupted_copies_are_refused_by_element(data, pattern, replacement, element, reason):
    bad, n = re.subn(pattern, replacement, data, count=1)
    assert n == 1
    err = refused(bad)
    assert err.element.endswith(element), err.element
    assert reason in err.reason


def test_not_a_span_file():
    assert refused(b"<portfolio/>").reason == "root element must be spanFile"
    assert refused(b"").element == "spanFile"
    with pytest.raises(SpanFileError, match="cannot read file"):
        load_span_file("/nonexistent/file.spn")


def test_previous_file_stays_in_force_when_a_new_one_is_bad(params, data):
    book = SpanBook(params)
    book.set_positions({"A": {("BIST", "AKBNKE", "FUT", "201612S0"): 2}})
    before = book.totals().copy()
    with pytest.raises(SpanFileError):
        book = book.reload(parse_span_bytes(data[:1000]))
    assert book.params is params and np.array_equal(book.totals(), before)
    # a new file that lacks a held contract: refused by name, the old book unchanged
    renamed = data.replace(
        b"<cId>9179</cId>\r\n<pe>201612S0</pe>", b"<cId>9179</cId>\r\n<pe>201612S9</pe>", 1
    )
    assert renamed != data
    with pytest.raises(SpanPositionError, match="BIST/AKBNKE/FUT/201612S0"):
        book.reload(parse_span_bytes(renamed))
    assert np.array_equal(book.totals(), before)
    # the same file reloaded reproduces the same numbers
    assert np.array_equal(book.reload(parse_span_bytes(data)).totals(), before)


def test_symbol_strings_round_trip(params):
    for key in params.keys[::97]:
        assert parse_key(format_key(key)) == key
    assert (
        format_key(contract_key("BIST", "AKBNKE", "OOP", "201605S0", "C", "6.00"))
        == "BIST/AKBNKE/OOP/201605S0/C/6.0"
    )
    with pytest.raises(ValueError, match="BIST/AKBNKE"):
        parse_key("BIST/AKBNKE")
