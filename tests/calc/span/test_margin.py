"""SPAN on the real Takasbank file, each case against a hand calculation from the file's own numbers.

The numbers are read straight from the XML with ElementTree here (not through calc.span's parser), and the
values the hand calculation relies on are also asserted literally, so a parser slip cannot hide.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from calc.span import parse_span_bytes, span_margin
from tests.support import SPAN_FILE

SPN = SPAN_FILE


@pytest.fixture(scope="module")
def xml() -> ET.Element:
    return ET.parse(SPN).getroot()


def raw_contract(root: ET.Element, pf_tag: str, pf_code: str, pe: str, o: str = "", k: float | None = None):
    """(ra values, composite delta, value) of one contract, found by walking the XML by hand."""
    co = root.find("pointInTime/clearingOrg")
    for pf in co.iter(pf_tag):
        if pf.findtext("pfCode") != pf_code:
            continue
        if pf_tag == "futPf":
            for f in pf.findall("fut"):
                if f.findtext("pe") == pe:
                    ra = f.find("ra")
                    return [float(a.text) for a in ra.findall("a")], float(ra.findtext("d")), 0.0
        for s in pf.findall("series"):
            if s.findtext("pe") != pe:
                continue
            for opt in s.findall("opt"):
                if opt.findtext("o") == o and float(opt.findtext("k")) == k:
                    ra = opt.find("ra")
                    return (
                        [float(a.text) for a in ra.findall("a")],
                        float(ra.findtext("d")),
                        float(opt.findtext("val")),
                    )
    raise LookupError((pf_tag, pf_code, pe, o, k))


def raw_cc(root: ET.Element, cc: str) -> ET.Element:
    return next(c for c in root.find("pointInTime/clearingOrg").findall("ccDef") if c.findtext("cc") == cc)


def one(result, account):
    (m,) = result[account]
    return m, {c.cc: c for c in m.ccs}


def fut(code: str, pe: str) -> tuple:
    return ("BIST", code, "FUT", pe)


def test_outright_futures_long_and_short(xml, params):
    ra, d, _ = raw_contract(xml, "futPf", "AKBNKE", "201606S0")
    assert ra[12] == 90.0 and ra[13] == 90.0 and ra[10] == -90.0 and ra[15] == 86.400002 and d == 1.0
    long_loss = [3 * a for a in ra]  # long 3 contracts: loss is qty x risk array
    short_loss = [-2 * a for a in ra]  # short 2
    res = span_margin(params, {"L": {fut("AKBNKE", "201606S0"): 3}, "S": {fut("AKBNKE", "201606S0"): -2}})

    m, ccs = one(res, "L")
    ak = ccs["AKBNKE"]
    assert ak.scan == pytest.approx(max(long_loss)) == pytest.approx(270.0)
    assert ak.active_scenario == long_loss.index(max(long_loss)) + 1 == 13  # price up 3/3, vol up
    assert ak.time_risk == pytest.approx((long_loss[0] + long_loss[1]) / 2)
    assert ak.vol_risk == pytest.approx(abs(long_loss[12] - long_loss[13]) / 2)
    assert ak.price_risk == pytest.approx(270.0)
    assert ak.net_delta == pytest.approx(3 * d)
    assert (ak.intra, ak.spot, ak.inter, ak.som, ak.nov) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert m.total == pytest.approx(270.0) and m.currency == "TRY"

    m, ccs = one(res, "S")
    assert ccs["AKBNKE"].scan == pytest.approx(max(short_loss)) == pytest.approx(180.0)
    assert ccs["AKBNKE"].active_scenario == 11  # price down 3/3
    assert m.total == pytest.approx(180.0)


def test_calendar_spread_intra_charge(xml, params):
    may, _, _ = raw_contract(xml, "futPf", "AKBNKE", "201605S0")
    jun, _, _ = raw_contract(xml, "futPf", "AKBNKE", "201606S0")
    dec, _, _ = raw_contract(xml, "futPf", "AKBNKE", "201612S0")
    sp = raw_cc(xml, "AKBNKE").find("dSpread")
    rate = float(sp.findtext("rate/val"))
    legs = [(t.findtext("tn"), t.findtext("rs")) for t in sp.findall("tLeg")]
    assert (sp.findtext("chargeMeth"), rate, legs) == ("F", 90.0, [("0", "B"), ("0", "A")])

    # 2 long May against 2 short June: the scan nets to nothing, 2 spreads are charged the flat rate
    loss = [2 * a - 2 * b for a, b in zip(may, jun, strict=True)]
    res = span_margin(
        params,
        {
            "X": {fut("AKBNKE", "201605S0"): 2, fut("AKBNKE", "201606S0"): -2},
            "Y": {fut("AKBNKE", "201605S0"): 3, fut("AKBNKE", "201606S0"): -1, fut("AKBNKE", "201612S0"): -1},
        },
    )
    m, ccs = one(res, "X")
    assert ccs["AKBNKE"].scan == pytest.approx(max(max(loss), 0.0), abs=1e-9)
    assert ccs["AKBNKE"].intra == pytest.approx(min(2, 2) * rate) == pytest.approx(180.0)
    assert m.total == pytest.approx(max(max(loss), 0.0) + 180.0)

    # 3 long May, 1 short June, 1 short December: net +1 outright, min(3 long, 2 short) = 2 spreads
    loss = [3 * a - b - c for a, b, c in zip(may, jun, dec, strict=True)]
    m, ccs = one(res, "Y")
    assert ccs["AKBNKE"].scan == pytest.approx(max(loss)) == pytest.approx(90.0)
    assert ccs["AKBNKE"].intra == pytest.approx(2 * rate)
    assert m.total == pytest.approx(max(loss) + 2 * rate) == pytest.approx(270.0)


def test_short_option_minimum_binds(xml, params):
    ra, d, val = raw_contract(xml, "oopPf", "EREGLE", "201605S0", "C", 5.50)
    som_rate = float(raw_cc(xml, "EREGLE").findtext("somTiers/tier/rate/val"))
    assert (som_rate, val, raw_cc(xml, "EREGLE").findtext("somMeth")) == (10.0, 1.0, "GROSS")
    loss = [-4 * a for a in ra]  # short 4 far out-of-the-money calls
    scan = max(loss)
    assert scan == pytest.approx(4 * 5.064043, abs=1e-6)  # the call's worst case, scenario 15 (price up 3x)
    som = 4 * som_rate
    assert som > scan  # the minimum binds
    nov = -4 * val  # short options: the premium value is owed
    res = span_margin(params, {"W": {("BIST", "EREGLE", "OOP", "201605S0", "C", 5.5): -4}})
    m, ccs = one(res, "W")
    er = ccs["EREGLE"]
    assert er.scan == pytest.approx(scan)
    assert er.active_scenario == loss.index(scan) + 1 == 15
    assert er.som == pytest.approx(som) and er.requirement == pytest.approx(som)
    assert er.nov == pytest.approx(nov)
    assert er.net_delta == pytest.approx(-4 * d)
    assert m.total == pytest.approx(som - nov) == pytest.approx(44.0)


def test_long_options_net_option_value(xml, params):
    ra, d, val = raw_contract(xml, "oopPf", "AKBNKE", "201605S0", "C", 6.00)
    assert val == 163.0 and ra[13] == 90.239021 and ra[12] == 90.186111
    loss = [2 * a for a in ra]
    scan = max(loss)
    active = loss.index(scan)  # scenario 14 (price up 3/3, vol down); its pair is 13
    time_risk = (loss[0] + loss[1]) / 2
    vol_risk = abs(loss[active] - loss[12]) / 2
    lov = 2 * val
    arclk, _, _ = raw_contract(xml, "futPf", "ARCLKE", "201605S0")
    arclk_scan = 3 * max(arclk)
    res = span_margin(
        params,
        {
            "only_long": {("BIST", "AKBNKE", "OOP", "201605S0", "C", "6.00"): 2},
            "with_fut": {("BIST", "AKBNKE", "OOP", "201605S0", "C", 6): 2, fut("ARCLKE", "201605S0"): 3},
        },
    )
    m, ccs = one(res, "only_long")
    ak = ccs["AKBNKE"]
    assert (ak.scan, ak.active_scenario) == (pytest.approx(scan), active + 1) and active + 1 == 14
    assert ak.time_risk == pytest.approx(time_risk) and ak.vol_risk == pytest.approx(vol_risk)
    assert ak.price_risk == pytest.approx(scan - time_risk - vol_risk)
    assert ak.nov == pytest.approx(lov)
    assert m.total == 0.0  # the long option value covers the risk: max(0, 180.48 - 326)
    # the surplus option value offsets risk in another CC (capAnov is 0 in this file)
    m, ccs = one(res, "with_fut")
    assert ccs["ARCLKE"].scan == pytest.approx(arclk_scan) == pytest.approx(720.0)
    assert m.total == pytest.approx(arclk_scan + scan - lov) == pytest.approx(574.478042)


def inter_spread(root: ET.Element, cc_a: str, cc_b: str) -> tuple[int, float, dict[str, tuple[str, float]]]:
    """The highest-priority interSpreads dSpread between two CCs: (number, rate, {cc: (side, ratio)})."""
    found = []
    for sp in root.find("pointInTime/clearingOrg/interSpreads").findall("dSpread"):
        legs = {t.findtext("cc"): (t.findtext("rs"), float(t.findtext("i"))) for t in sp.findall("tLeg")}
        if set(legs) == {cc_a, cc_b}:
            found.append((int(sp.findtext("spread")), float(sp.findtext("rate/val")), legs))
    return min(found, key=lambda x: x[0])


def test_inter_commodity_pair_credit(xml, params):
    number, rate, legs = inter_spread(xml, "AKBNKE", "XU030")
    assert (number, rate, legs) == (3, 0.6, {"AKBNKE": ("A", 12.75), "XU030": ("B", 1.0)})
    ak, _, _ = raw_contract(xml, "futPf", "AKBNKE", "201605S0")
    xu, _, _ = raw_contract(xml, "futPf", "XU030", "201606S0")
    ak_scan, xu_scan = 13 * max(ak), max(-a for a in xu)  # long 13 AKBNKE, short 1 XU030
    assert (ak_scan, xu_scan) == (1170.0, 955.0)
    # price risk = scan (futures: no time or volatility risk); weighted futures price risk = per delta
    ak_wfpr, xu_wfpr = ak_scan / 13, xu_scan / 1
    spreads = min(13 / 12.75, 1 / 1.0)  # A long, B short: 1 spread
    ak_credit = spreads * 12.75 * ak_wfpr * rate
    xu_credit = spreads * 1.0 * xu_wfpr * rate
    assert (ak_credit, xu_credit) == (pytest.approx(688.5), pytest.approx(573.0))

    res = span_margin(
        params,
        {
            "P": {fut("AKBNKE", "201605S0"): 13, fut("XU030", "201606S0"): -1},
            "N": {fut("AKBNKE", "201605S0"): -13, fut("XU030", "201606S0"): 1},  # the mirror spread
            "Q": {fut("AKBNKE", "201605S0"): 13, fut("AKBNKE", "201606S0"): 0, fut("XU030", "201606S0"): 1},
        },
    )
    for acct in ("P", "N"):
        m, ccs = one(res, acct)
        assert ccs["AKBNKE"].inter == pytest.approx(ak_credit)
        assert ccs["XU030"].inter == pytest.approx(xu_credit)
        assert ccs["AKBNKE"].requirement == pytest.approx(ak_scan - ak_credit)
        assert m.total == pytest.approx(ak_scan + xu_scan - ak_credit - xu_credit) == pytest.approx(863.5)
    m, ccs = one(res, "Q")  # both long: no spread forms
    assert ccs["AKBNKE"].inter == 0.0 and ccs["XU030"].inter == 0.0
    assert m.total == pytest.approx(1170.0 + 955.0)


def test_inter_spreads_in_priority_order(xml, params):
    """AKBNKE/XU030 (spread 3) comes before GARANE/XU030 (spread 5): the one XU030 delta goes to AKBNKE."""
    n3, r3, _ = inter_spread(xml, "AKBNKE", "XU030")
    n5, r5, legs5 = inter_spread(xml, "GARANE", "XU030")
    assert n3 < n5 and legs5["GARANE"][0] == "A"
    ga, _, _ = raw_contract(xml, "futPf", "GARANE", "201605S0")
    res = span_margin(
        params,
        {"R": {fut("AKBNKE", "201605S0"): 13, fut("GARANE", "201605S0"): 13, fut("XU030", "201606S0"): -1}},
    )
    m, ccs = one(res, "R")
    assert ccs["GARANE"].inter == 0.0  # AKBNKE/GARANE (both long) cannot spread either
    assert ccs["GARANE"].scan == pytest.approx(13 * max(ga))
    assert ccs["AKBNKE"].inter == pytest.approx(12.75 * 90.0 * r3)
    assert m.total == pytest.approx(1170.0 + 13 * max(ga) + 955.0 - 12.75 * 90.0 * r3 - 955.0 * r3)


def test_spot_charge_from_spot_rate():
    """The Takasbank file defines no spotRate; a copy with one added to AKBNKE checks the spot charge."""
    data = SPN.read_bytes()
    spot = rb"<spotRate><r>1</r><pe>201605S0</pe><sprd>10</sprd><outr>25</outr></spotRate>"
    copy, n = re.subn(rb"(<cc>AKBNKE</cc>.*?)(</ccDef>)", rb"\1" + spot + rb"\2", data, count=1, flags=re.S)
    assert n == 1 and copy.count(b"<spotRate>") == 1
    params = parse_span_bytes(copy, "spot-copy")
    # long 3 May (spot month), short 2 June: 2 May deltas are in intra spreads, 1 is outright
    res = span_margin(params, {"S": {fut("AKBNKE", "201605S0"): 3, fut("AKBNKE", "201606S0"): -2}})
    m, ccs = one(res, "S")
    assert ccs["AKBNKE"].intra == pytest.approx(2 * 90.0)
    assert ccs["AKBNKE"].spot == pytest.approx(2 * 10 + 1 * 25)
    assert m.total == pytest.approx(90.0 + 180.0 + 45.0)


def test_som_max_method():
    """somMeth MAX charges the larger of short calls and short puts (GROSS: their sum)."""
    data = SPN.read_bytes()
    copy, n = re.subn(
        rb"(<cc>EREGLE</cc>(?:(?!</ccDef>).)*?<somMeth>)GROSS", rb"\1MAX", data, count=1, flags=re.S
    )
    assert n == 1
    gross = parse_span_bytes(data, "gross")
    maxp = parse_span_bytes(copy, "max-copy")
    pos = {
        "M": {
            ("BIST", "EREGLE", "OOP", "201605S0", "C", 5.5): -2,
            ("BIST", "EREGLE", "OOP", "201605S0", "P", 3.0): -3,
        }
    }
    assert one(span_margin(gross, pos), "M")[1]["EREGLE"].som == pytest.approx((2 + 3) * 10.0)
    assert one(span_margin(maxp, pos), "M")[1]["EREGLE"].som == pytest.approx(max(2, 3) * 10.0)
