"""Read a SPAN XML risk parameter file (spanFile/pointInTime/clearingOrg) into `SpanParams` arrays, once.

A malformed or truncated file raises `SpanFileError` naming the element path and the reason; nothing is
half-loaded.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from calc.span.model import (
    KIND_FUT,
    KIND_OPT,
    KIND_PHY,
    METH_F,
    METH_P,
    METH_W,
    SOM_GROSS,
    SOM_MAX,
    ContractKey,
    SpanFileError,
    SpanParams,
    contract_key,
)

_METHODS = {"F": METH_F, "P": METH_P, "W": METH_W}
_NONOPTION_PFS = (("phyPf", "phy", "PHY", KIND_PHY), ("futPf", "fut", "FUT", KIND_FUT))
_UNSUPPORTED_PFS = (
    "debtPf",
    "equityPf",
    "fwdPf",
    "IRSwapPf",
    "CDSwapPf",
    "eDebtPf",
    "ooePf",
    "cmbPf",
    "oocPf",
)
_UNSUPPORTED_CO = ("superSpreads", "superInterClearSpreads", "interClearSpreads")
_UNSUPPORTED_CC = ("scanTiers", "rateTiers", "liqRate", "basisRates", "concAdjRate", "pointDef")


class _Refuse(Exception):
    """Internal: carries (element path, reason) up to parse_span_bytes, which adds the source."""


def load_span_file(path: str | Path) -> SpanParams:
    """Parse a SPAN XML file; raises SpanFileError (element, reason) when it cannot be used."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpanFileError("spanFile", f"cannot read file: {e.strerror or e}", str(path)) from None
    return parse_span_bytes(data, source=str(path))


def parse_span_bytes(data: bytes, source: str = "<bytes>") -> SpanParams:
    """Parse SPAN XML bytes into SpanParams (the file's sha256 included)."""
    digest = hashlib.sha256(data).hexdigest()
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        element, reason = _locate_xml_error(data, e)
        raise SpanFileError(element, reason, source) from None
    try:
        return _build(root, digest)
    except _Refuse as e:
        element, reason = e.args
        raise SpanFileError(element, reason, source) from None


def _locate_xml_error(data: bytes, err: ET.ParseError) -> tuple[str, str]:
    """Re-read up to the syntax error with a pull parser to name the innermost open element."""
    stack: list[str] = []
    parser = ET.XMLPullParser(events=("start", "end"))
    try:
        for i in range(0, len(data), 1 << 16):
            parser.feed(data[i : i + (1 << 16)])
            for event, el in parser.read_events():
                if event == "start":
                    stack.append(el.tag)
                else:
                    stack.pop()
        parser.close()
    except ET.ParseError:
        for event, el in parser.read_events():  # events produced before the error
            if event == "start":
                stack.append(el.tag)
            elif stack:
                stack.pop()
    msg = str(err)
    line = getattr(err, "position", (0, 0))[0]
    if msg.startswith("no element found") or line >= data.count(b"\n") + 1:
        msg = f"file ends early (truncated?): {msg}"
    return ("/".join(stack) or "spanFile"), msg


# ---- small typed readers: every failure names the element path ---------------------------------------------


def _text(el: ET.Element, tag: str, ctx: str, default: str | None = None) -> str:
    child = el.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise _Refuse(f"{ctx}/{tag}", "required element missing or empty")
    return child.text.strip()


def _float(el: ET.Element, tag: str, ctx: str, default: float | None = None) -> float:
    child = el.find(tag)
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise _Refuse(f"{ctx}/{tag}", "required number missing or empty")
    try:
        v = float(child.text)
    except ValueError:
        raise _Refuse(f"{ctx}/{tag}", f"{child.text.strip()!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise _Refuse(f"{ctx}/{tag}", f"{child.text.strip()!r} is not a finite number")
    return v


def _int(el: ET.Element, tag: str, ctx: str, default: int | None = None) -> int:
    v = _float(el, tag, ctx, None if default is None else float(default))
    if v != int(v):
        raise _Refuse(f"{ctx}/{tag}", f"{v!r} is not an integer")
    return int(v)


def _rate(el: ET.Element, ctx: str, rate_class: str = "1") -> float:
    """The `rate` child for rate class r=1 (the class the file's risk arrays use), else the first one."""
    rates = el.findall("rate")
    if not rates:
        raise _Refuse(f"{ctx}/rate", "required element missing")
    chosen = next((r for r in rates if (r.findtext("r") or "").strip() == rate_class), rates[0])
    return _float(chosen, "val", f"{ctx}/rate")


def _bool(el: ET.Element, tag: str) -> bool:
    return (el.findtext(tag) or "0").strip().lower() in ("1", "true", "y")


# ---- the file ---------------------------------------------------------------------------------------------


def _build(root: ET.Element, digest: str) -> SpanParams:
    if root.tag != "spanFile":
        raise _Refuse(root.tag, "root element must be spanFile")
    warnings: list[str] = []
    pits = root.findall("pointInTime")
    if not pits:
        raise _Refuse("spanFile/pointInTime", "required element missing")
    if len(pits) > 1:
        warnings.append(f"{len(pits)} pointInTime elements: only the first is used")
    pit = pits[0]
    date = _text(pit, "date", "spanFile/pointInTime")
    if len(date) != 8 or not date.isdigit():
        raise _Refuse("spanFile/pointInTime/date", f"{date!r} is not a YYYYMMDD date")
    cos = pit.findall("clearingOrg")
    if not cos:
        raise _Refuse("spanFile/pointInTime/clearingOrg", "required element missing")
    if len(cos) > 1:
        warnings.append(f"{len(cos)} clearingOrg elements: only the first is used")
    co = cos[0]
    co_path = "spanFile/pointInTime/clearingOrg"
    ec = _text(co, "ec", co_path)
    kind = (pit.findtext("setlQualifier") or "").strip() or ("setl" if _bool(pit, "isSetl") else "itd")
    for extra in ("time", "run"):
        v = (pit.findtext(extra) or "").strip()
        if v:
            kind += f"-{v}"
    if _bool(co, "isContractScale"):
        warnings.append("isContractScale=1: contract scaling is applied to deltas only")
    for tag in _UNSUPPORTED_CO:
        if co.find(tag) is not None:
            warnings.append(f"clearingOrg/{tag} present but not implemented")

    price, vol, weight, paired = _points(co, co_path)
    time_points = np.flatnonzero(price == 0.0).astype(np.int64)
    n_points = price.shape[0]

    pfs = _portfolios(co, co_path, n_points, warnings)
    ccs = _cc_defs(co, co_path, pfs, warnings)
    return _assemble(
        ec, date, kind, root, digest, price, vol, weight, paired, time_points, pfs, ccs, co, warnings
    )


def _points(co: ET.Element, co_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pdefs = co.findall("pointDef")
    if not pdefs:
        raise _Refuse(f"{co_path}/pointDef", "required element missing (scan point definitions)")
    path = f"{co_path}/pointDef"
    pts = pdefs[0].findall("scanPointDef")
    if not pts:
        raise _Refuse(f"{path}/scanPointDef", "no scan points defined")
    rows = []
    for sp in pts:
        ctx = f"{path}/scanPointDef[point={sp.findtext('point')}]"
        rows.append(
            (
                _int(sp, "point", ctx),
                _float(sp, "priceScanDef/mult", ctx),
                _float(sp, "volScanDef/mult", ctx),
                _float(sp, "weight", ctx, 1.0),
                _int(sp, "pairedPoint", ctx),
            )
        )
    rows.sort()
    numbers = [r[0] for r in rows]
    if numbers != list(range(1, len(rows) + 1)):
        raise _Refuse(f"{path}/scanPointDef/point", f"points must be numbered 1..{len(rows)}, got {numbers}")
    paired = np.array([r[4] - 1 for r in rows], dtype=np.int64)
    if paired.min() < 0 or paired.max() >= len(rows):
        raise _Refuse(f"{path}/scanPointDef/pairedPoint", f"paired points {list(paired + 1)} out of range")
    return (
        np.array([r[1] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows]),
        paired,
    )


class _Pf:
    """One product family (portfolio) of the file, with its contracts' raw values."""

    __slots__ = ("exch", "pf_id", "code", "ptype", "value_meth", "contracts")

    def __init__(self, exch: str, pf_id: str, code: str, ptype: str, value_meth: str) -> None:
        self.exch, self.pf_id, self.code, self.ptype, self.value_meth = exch, pf_id, code, ptype, value_meth
        # (key, pe of the delta period, kind, is_call, ra[S], d, sc, value, price, cvf, und (exch, pfId, cId))
        self.contracts: list[tuple] = []


def _risk_array(el: ET.Element, n_points: int, ctx: str) -> tuple[list[float], float]:
    ras = el.findall("ra")
    if not ras:
        raise _Refuse(f"{ctx}/ra", "risk array missing")
    ra = next((r for r in ras if (r.findtext("r") or "").strip() == "1"), ras[0])
    texts = [a.text for a in ra.iter("a")]
    if len(texts) != n_points:
        raise _Refuse(f"{ctx}/ra", f"{len(texts)} <a> values, the scan point definition has {n_points}")
    try:
        values = [float(t) for t in texts]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        bad = next(i for i, t in enumerate(texts) if not _is_number(t))
        raise _Refuse(f"{ctx}/ra/a[{bad + 1}]", f"{texts[bad]!r} is not a number") from None
    total = sum(values)  # nan or inf anywhere makes total - total nan
    if total - total != 0.0:
        raise _Refuse(f"{ctx}/ra/a", "risk array values must be finite")
    return values, _float(ra, "d", f"{ctx}/ra", 0.0)


def _is_number(t: str | None) -> bool:
    try:
        float(t)  # type: ignore[arg-type]
        return True
    except (TypeError, ValueError):
        return False


def _portfolios(
    co: ET.Element, co_path: str, n_points: int, warnings: list[str]
) -> dict[tuple[str, str], _Pf]:
    pfs: dict[tuple[str, str], _Pf] = {}
    exchanges = co.findall("exchange")
    if not exchanges:
        raise _Refuse(f"{co_path}/exchange", "required element missing")
    for ex in exchanges:
        exch = _text(ex, "exch", f"{co_path}/exchange")
        ex_path = f"{co_path}/exchange[exch={exch}]"
        for tag in _UNSUPPORTED_PFS:
            n = len(ex.findall(tag))
            if n:
                warnings.append(f"{exch}: {n} {tag} not implemented (positions in them are refused)")
        for pf_tag, c_tag, ptype, kind in _NONOPTION_PFS:
            for pf_el in ex.findall(pf_tag):
                pf = _pf_header(pf_el, exch, ptype, f"{ex_path}/{pf_tag}", pfs)
                pf_path = f"{ex_path}/{pf_tag}[pfCode={pf.code}]"
                for c in pf_el.findall(c_tag):
                    ctx = f"{pf_path}/{c_tag}[cId={c.findtext('cId')}]"
                    pe = _text(c, "pe", ctx)
                    ra, d = _risk_array(c, n_points, ctx)
                    p = _float(c, "p", ctx, 0.0)
                    cvf = _float(c, "cvf", ctx, 0.0)
                    cid = _text(c, "cId", ctx)
                    und = _und(c)
                    pf.contracts.append(
                        (contract_key(exch, pf.code, ptype, pe), pe, kind, False, ra, d,
                         _float(c, "sc", ctx, 1.0), 0.0, p, cvf, (exch, pf.pf_id, cid), und)
                    )  # fmt: skip
        for pf_tag, ptype in (("oopPf", "OOP"), ("oofPf", "OOF")):
            for pf_el in ex.findall(pf_tag):
                pf = _pf_header(pf_el, exch, ptype, f"{ex_path}/{pf_tag}", pfs)
                pf_path = f"{ex_path}/{pf_tag}[pfCode={pf.code}]"
                premium = pf.value_meth.upper() != "FUT"  # futures-style options carry no option value
                for s in pf_el.findall("series"):
                    s_ctx = f"{pf_path}/series[pe={s.findtext('pe')}]"
                    pe = _text(s, "pe", s_ctx)
                    s_cvf = _float(s, "cvf", s_ctx, 0.0)
                    s_sc = _float(s, "sc", s_ctx, 1.0)
                    und = _und(s)
                    for o in s.findall("opt"):
                        ctx = f"{s_ctx}/opt[cId={o.findtext('cId')}]"
                        side = _text(o, "o", ctx).upper()
                        if side not in ("C", "P"):
                            raise _Refuse(f"{ctx}/o", f"{side!r} must be C or P")
                        strike = _float(o, "k", ctx)
                        p = _float(o, "p", ctx)
                        cvf = _float(o, "cvf", ctx, s_cvf)
                        ra, d = _risk_array(o, n_points, ctx)
                        value = _float(o, "val", ctx, p * cvf) if premium else 0.0
                        key = contract_key(exch, pf.code, ptype, pe, side, strike)
                        pf.contracts.append(
                            (key, pe, KIND_OPT, side == "C", ra, d, _float(o, "sc", ctx, s_sc), value, p, cvf,
                             None, und)
                        )  # fmt: skip
    return pfs


def _und(el: ET.Element) -> tuple[str, str, str] | None:
    u = el.find("undC")
    if u is None:
        return None
    return (
        (u.findtext("exch") or "").strip(),
        (u.findtext("pfId") or "").strip(),
        (u.findtext("cId") or "").strip(),
    )


def _pf_header(pf_el: ET.Element, exch: str, ptype: str, path: str, pfs: dict[tuple[str, str], _Pf]) -> _Pf:
    pf_id = _text(pf_el, "pfId", path)
    code = _text(pf_el, "pfCode", f"{path}[pfId={pf_id}]")
    if (exch, pf_id) in pfs:
        raise _Refuse(f"{path}[pfId={pf_id}]/pfId", f"duplicate portfolio id {pf_id} on exchange {exch}")
    pf = _Pf(exch, pf_id, code, ptype, (pf_el.findtext("valueMeth") or "").strip())
    pfs[(exch, pf_id)] = pf
    return pf


class _CC:
    __slots__ = ("name", "currency", "som_meth", "cap_anov", "adj_rate", "pfs", "intra_tiers", "inter_tiers",
                 "som_tiers", "spreads", "spot")  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        self.pfs: list[_Pf] = []
        self.spreads: list[tuple[int, str, int, float, list[tuple]]] = []
        self.spot: dict[str, tuple[float, float]] = {}


def _tiers(cc_el: ET.Element, tag: str, ctx: str, with_rate: bool) -> list[tuple[int, str, str, float]]:
    out = []
    block = cc_el.find(tag)
    if block is None:
        return out
    for t in block.findall("tier"):
        t_ctx = f"{ctx}/{tag}/tier[tn={t.findtext('tn')}]"
        tn = _int(t, "tn", t_ctx)
        rate = _rate(t, t_ctx) if with_rate else 0.0
        out.append((tn, (t.findtext("sPe") or "").strip(), (t.findtext("ePe") or "").strip(), rate))
    return out


def _legs(sp: ET.Element, ctx: str) -> list[tuple]:
    """(cc, tn or None, pe or None, side, ratio) of a dSpread's tLeg/pLeg children, in document order."""
    legs = []
    for leg in sp:
        if leg.tag not in ("tLeg", "pLeg"):
            continue
        l_ctx = f"{ctx}/{leg.tag}[cc={leg.findtext('cc')}]"
        cc = _text(leg, "cc", l_ctx)
        side = _text(leg, "rs", l_ctx).upper()
        if side not in ("A", "B"):
            raise _Refuse(f"{l_ctx}/rs", f"{side!r} must be A or B")
        ratio = _float(leg, "i", l_ctx)
        if ratio <= 0:
            raise _Refuse(f"{l_ctx}/i", f"delta ratio {ratio} must be positive")
        if leg.tag == "tLeg":
            legs.append((cc, _int(leg, "tn", l_ctx), None, side, ratio))
        else:
            legs.append((cc, None, _text(leg, "pe", l_ctx), side, ratio))
    return legs


def _spread(sp: ET.Element, ctx: str, warnings: list[str], inter: bool) -> tuple | None:
    number = _int(sp, "spread", ctx)
    meth_s = _text(sp, "chargeMeth", ctx).upper()
    if meth_s not in _METHODS:
        raise _Refuse(f"{ctx}/chargeMeth", f"{meth_s!r} must be F, P or W")
    meth = _METHODS[meth_s]
    s_ctx = f"{ctx}[spread={number}]"
    legs = _legs(sp, s_ctx)
    if len(legs) < 2:
        warnings.append(f"{s_ctx}: fewer than two legs, ignored")
        return None
    if inter and meth != METH_W:
        warnings.append(f"{s_ctx}: inter-commodity chargeMeth {meth_s} not implemented, ignored")
        return None
    if not inter and meth == METH_W:
        warnings.append(f"{s_ctx}: intra-commodity chargeMeth W not implemented, ignored")
        return None
    if meth == METH_P:
        warnings.append(f"{s_ctx}: chargeMeth P treated as F (flat rate per spread)")
    if sp.find("dSpread") is not None or sp.find("rpLeg") is not None or sp.find("volRate") is not None:
        warnings.append(f"{s_ctx}: nested dSpread / rpLeg / volRate not implemented")
    if sp.find("pmpsRate") is not None and sp.find("rate") is None:
        warnings.append(f"{s_ctx}: pmpsRate not implemented, ignored")
        return None
    return (number, f"{'inter' if inter else 'intra'}:{number}", meth, _rate(sp, s_ctx), legs)


def _cc_defs(co: ET.Element, co_path: str, pfs: dict[tuple[str, str], _Pf], warnings: list[str]) -> list[_CC]:
    ccs: list[_CC] = []
    seen: dict[str, _CC] = {}
    owner: dict[tuple[str, str], str] = {}
    default_delta_meth = (co.findtext("oopDeltaMeth") or "PERIOD").strip().upper()
    for cc_el in co.findall("ccDef"):
        name = _text(cc_el, "cc", f"{co_path}/ccDef")
        ctx = f"{co_path}/ccDef[cc={name}]"
        if name in seen:
            raise _Refuse(f"{ctx}/cc", f"duplicate combined commodity {name}")
        cc = _CC(name)
        cc.currency = _text(cc_el, "currency", ctx)
        som_meth = (cc_el.findtext("somMeth") or "GROSS").strip().upper()
        if som_meth not in ("GROSS", "MAX"):
            warnings.append(f"{ctx}: somMeth {som_meth} not implemented, GROSS used")
        cc.som_meth = SOM_MAX if som_meth == "MAX" else SOM_GROSS
        cc.cap_anov = _bool(cc_el, "capAnov")
        adj = cc_el.find("adjRate")
        cc.adj_rate = _float(adj, "val", f"{ctx}/adjRate") if adj is not None else 1.0
        for tag in _UNSUPPORTED_CC:
            if cc_el.find(tag) is not None:
                warnings.append(f"{ctx}: {tag} not implemented")
        for meth_tag in ("procMeth", "wfprMeth", "spotMeth", "cmbMeth"):
            v = (cc_el.findtext(meth_tag) or "").strip().upper()
            if v not in ("", "NORMAL", "NONE"):
                warnings.append(f"{ctx}: {meth_tag} {v} not implemented, NORMAL used")
        for link in cc_el.findall("pfLink"):
            l_ctx = f"{ctx}/pfLink[pfId={link.findtext('pfId')}]"
            exch, pf_id = _text(link, "exch", l_ctx), _text(link, "pfId", l_ctx)
            pf = pfs.get((exch, pf_id))
            if pf is None:
                warnings.append(f"{l_ctx}: no portfolio {exch}/{pf_id} in the file, link ignored")
                continue
            if (exch, pf_id) in owner:
                raise _Refuse(f"{l_ctx}", f"portfolio {pf.code} already linked to {owner[(exch, pf_id)]}")
            owner[(exch, pf_id)] = name
            sc = _float(link, "sc", l_ctx, 1.0)
            dm = (link.findtext("oopDeltaMeth") or default_delta_meth).strip().upper()
            cc.pfs.append((pf, sc, dm))
        cc.intra_tiers = _tiers(cc_el, "intraTiers", ctx, False)
        cc.inter_tiers = _tiers(cc_el, "interTiers", ctx, False)
        cc.som_tiers = _tiers(cc_el, "somTiers", ctx, True)
        for sp in cc_el.findall("dSpread"):
            got = _spread(sp, f"{ctx}/dSpread", warnings, inter=False)
            if got is not None:
                cc.spreads.append(got)
        for sr in cc_el.findall("spotRate"):
            s_ctx = f"{ctx}/spotRate"
            cc.spot[_text(sr, "pe", s_ctx)] = (_float(sr, "sprd", s_ctx), _float(sr, "outr", s_ctx))
        seen[name] = cc
        ccs.append(cc)
    if not ccs:
        raise _Refuse(f"{co_path}/ccDef", "no combined commodities defined")
    return ccs


def _tier_of(pe: str, tiers: list[tuple[int, str, str, float]]) -> tuple[int, float]:
    """Tier number (and rate) whose sPe..ePe range holds pe; a tier without a range holds every period."""
    for tn, s, e, rate in tiers:
        if (not s or pe >= s) and (not e or pe <= e):
            return tn, rate
    return -1, 0.0


def _assemble(ec, date, kind, root, digest, price, vol, weight, paired, time_points, pfs, ccs, co, warnings):
    n_points = price.shape[0]
    # where each non-option contract sits, for options whose delta goes to the underlying's period
    und_pe: dict[tuple[str, str, str], str] = {}
    for pf in pfs.values():
        for c in pf.contracts:
            if c[10] is not None:
                und_pe[c[10]] = c[1]

    keys: list[ContractKey] = []
    rows: list[tuple] = []  # (cc index, pe, kind, call, ra, delta, value, som tier lookup later, price, cvf)
    cc_names = [cc.name for cc in ccs]
    cc_periods: list[list[str]] = []
    linked = 0
    for ci, cc in enumerate(ccs):
        pes: set[str] = set()
        for pf, link_sc, delta_meth in cc.pfs:
            linked += 1
            for c in pf.contracts:
                key, pe, kind_, call, ra, d, sc, value, p, cvf, _own, und = c
                delta_pe = pe
                if kind_ == KIND_OPT and (pf.ptype == "OOF" or delta_meth != "PERIOD") and und is not None:
                    delta_pe = und_pe.get(und, pe)
                pes.add(delta_pe)
                keys.append(key)
                rows.append((ci, delta_pe, kind_, call, ra, d * sc * link_sc, value, pe, p, cvf))
        cc_periods.append(sorted(pes))
    unlinked = len(pfs) - linked
    if unlinked:
        warnings.append(
            f"{unlinked} portfolio(s) not linked to any ccDef: their contracts cannot be margined"
        )

    index: dict[ContractKey, int] = {}
    for i, k in enumerate(keys):
        if k in index:
            raise _Refuse("ccDef/pfLink", f"contract {k} appears twice")
        index[k] = i

    # periods, grouped by CC
    p_cc, p_pe, p_intra, p_inter, p_sprd, p_outr, p_spot = [], [], [], [], [], [], []
    cc_p0, cc_p1 = [], []
    period_of: dict[tuple[int, str], int] = {}
    for ci, (cc, pes) in enumerate(zip(ccs, cc_periods, strict=True)):
        cc_p0.append(len(p_cc))
        for pe in pes:
            period_of[(ci, pe)] = len(p_cc)
            p_cc.append(ci)
            p_pe.append(pe)
            p_intra.append(_tier_of(pe, cc.intra_tiers)[0] if cc.intra_tiers else 0)
            p_inter.append(_tier_of(pe, cc.inter_tiers)[0] if cc.inter_tiers else 0)
            sprd, outr = cc.spot.get(pe, (0.0, 0.0))
            p_sprd.append(sprd)
            p_outr.append(outr)
            p_spot.append(pe in cc.spot)
        cc_p1.append(len(p_cc))

    n = len(keys)
    c_ra = np.empty((n, n_points))
    c_cc = np.empty(n, np.int64)
    c_period = np.empty(n, np.int64)
    c_kind = np.empty(n, np.int8)
    c_call = np.zeros(n, np.bool_)
    c_delta = np.empty(n)
    c_value = np.empty(n)
    c_som = np.zeros(n)
    c_price = np.empty(n)
    c_cvf = np.empty(n)
    for i, (ci, dpe, kind_, call, ra, delta, value, pe, p, cvf) in enumerate(rows):
        c_ra[i] = ra
        c_cc[i] = ci
        c_period[i] = period_of[(ci, dpe)]
        c_kind[i] = kind_
        c_call[i] = call
        c_delta[i] = delta
        c_value[i] = value
        c_price[i] = p
        c_cvf[i] = cvf
        if kind_ == KIND_OPT and ccs[ci].som_tiers:
            c_som[i] = _tier_of(pe, ccs[ci].som_tiers)[1]

    # spreads: intra (per CC, by priority), then inter (by priority)
    cc_idx = {name: i for i, name in enumerate(cc_names)}
    s_cc, s_meth, s_rate, s_l0, s_l1, s_name = [], [], [], [], [], []
    l_cc, l_period, l_tier, l_side, l_ratio, l_gross = [], [], [], [], [], []
    cc_s0, cc_s1 = [], []

    def add_spread(owner: int, spread: tuple, ctx: str) -> None:
        number, name, meth, rate, legs = spread
        resolved = []
        for cc_name, tn, pe, side, ratio in legs:
            if cc_name not in cc_idx:
                warnings.append(f"{ctx}[spread={number}]: leg cc {cc_name} not defined, spread ignored")
                return
            ci = cc_idx[cc_name]
            period = -1
            if pe is not None:
                period = period_of.get((ci, pe), -2)
                if period == -2:  # no contract carries delta in that period: the leg can never fill
                    warnings.append(f"{ctx}[spread={number}]: pLeg {cc_name} {pe} has no contracts")
                    period = -1
                    tn = -999
            resolved.append((ci, period, -1 if tn is None else tn, 1.0 if side == "A" else -1.0, ratio))
        s_cc.append(owner)
        s_meth.append(meth)
        s_rate.append(rate)
        s_name.append(name)
        s_l0.append(len(l_cc))
        for j, (ci, period, tn, side, ratio) in enumerate(resolved):
            gross = period < 0 and any(
                o[0] == ci and o[1] < 0 and o[2] == tn and o[3] != side
                for k, o in enumerate(resolved)
                if k != j
            )
            l_cc.append(ci)
            l_period.append(period)
            l_tier.append(tn)
            l_side.append(side)
            l_ratio.append(ratio)
            l_gross.append(gross)
        s_l1.append(len(l_cc))

    for ci, cc in enumerate(ccs):
        cc_s0.append(len(s_cc))
        for spread in sorted(cc.spreads, key=lambda s: s[0]):
            add_spread(ci, spread, f"ccDef[cc={cc.name}]/dSpread")
        cc_s1.append(len(s_cc))
    n_intra = len(s_cc)
    inter_el = co.find("interSpreads")
    inter_spreads = []
    if inter_el is not None:
        for sp in inter_el:
            if sp.tag == "dSpread":
                got = _spread(
                    sp, "spanFile/pointInTime/clearingOrg/interSpreads/dSpread", warnings, inter=True
                )
                if got is not None:
                    inter_spreads.append(got)
            elif sp.tag == "sSpread":
                warnings.append("interSpreads/sSpread (scan-based spreads) not implemented")
    for spread in sorted(inter_spreads, key=lambda s: s[0]):
        add_spread(-1, spread, "interSpreads/dSpread")
    cc_in_inter = np.zeros(len(ccs), np.bool_)
    for j in range(s_l0[n_intra] if n_intra < len(s_cc) else len(l_cc), len(l_cc)):
        cc_in_inter[l_cc[j]] = True

    currencies = tuple(sorted({cc.currency for cc in ccs}))
    cur_idx = {c: i for i, c in enumerate(currencies)}

    def arr(x: Iterable, dt: type | str) -> np.ndarray:
        a = np.array(list(x), dtype=dt)
        a.setflags(write=False)
        return a

    for a in (c_ra, c_cc, c_period, c_kind, c_call, c_delta, c_value, c_som, c_price, c_cvf,
              price, vol, weight, paired, time_points):  # fmt: skip
        a.setflags(write=False)
    return SpanParams(
        file_id=f"{ec}-{date}-{kind}",
        sha256=digest,
        clearing_org=ec,
        business_date=date,
        file_kind=kind,
        created=(root.findtext("created") or "").strip(),
        point_price=price,
        point_vol=vol,
        point_weight=weight,
        point_paired=paired,
        time_points=time_points,
        keys=tuple(keys),
        index=index,
        c_cc=c_cc,
        c_period=c_period,
        c_kind=c_kind,
        c_call=c_call,
        c_ra=c_ra,
        c_delta=c_delta,
        c_value=c_value,
        c_som_rate=c_som,
        c_price=c_price,
        c_cvf=c_cvf,
        cc_names=tuple(cc_names),
        cc_index=cc_idx,
        cc_currency=tuple(cc.currency for cc in ccs),
        currencies=currencies,
        cc_cur=arr((cur_idx[cc.currency] for cc in ccs), np.int64),
        cc_som_meth=arr((cc.som_meth for cc in ccs), np.int8),
        cc_cap_anov=arr((cc.cap_anov for cc in ccs), np.bool_),
        cc_p0=arr(cc_p0, np.int64),
        cc_p1=arr(cc_p1, np.int64),
        cc_s0=arr(cc_s0, np.int64),
        cc_s1=arr(cc_s1, np.int64),
        cc_in_inter=arr(cc_in_inter, np.bool_),
        cc_adj_rate=arr((cc.adj_rate for cc in ccs), np.float64),
        p_cc=arr(p_cc, np.int64),
        p_pe=tuple(p_pe),
        p_intra_tier=arr(p_intra, np.int64),
        p_inter_tier=arr(p_inter, np.int64),
        p_spot_sprd=arr(p_sprd, np.float64),
        p_spot_outr=arr(p_outr, np.float64),
        p_is_spot=arr(p_spot, np.bool_),
        n_intra=n_intra,
        s_cc=arr(s_cc, np.int64),
        s_meth=arr(s_meth, np.int8),
        s_rate=arr(s_rate, np.float64),
        s_l0=arr(s_l0, np.int64),
        s_l1=arr(s_l1, np.int64),
        s_name=tuple(s_name),
        l_cc=arr(l_cc, np.int64),
        l_period=arr(l_period, np.int64),
        l_tier=arr(l_tier, np.int64),
        l_side=arr(l_side, np.float64),
        l_ratio=arr(l_ratio, np.float64),
        l_gross=arr(l_gross, np.bool_),
        warnings=tuple(warnings),
    )
