"""One-shot SPAN: a POS file (CSV or Parquet) margined under the Takasbank file; unknown contracts named."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from calc.span import SpanPositionError
from calc.span.oneshot import main, span_accounts
from tests.support import SPAN_FILE

SPN = str(SPAN_FILE)
POS = """account,exch,pf_code,pf_type,pe,qty,o,k
desk2,BIST,AKBNKE,OOP,201605S0,2,C,6.00
desk1,BIST,AKBNKE,FUT,201605S0,10,,
desk1,BIST,XU030,FUT,201606S0,-1,,
desk1,BIST,AKBNKE,FUT,201605S0,3,,
desk2,BIST,ARCLKE,FUT,201605S0,3,,
desk3,BIST,EREGLE,OOP,201605S0,-4,c,5.5
"""


@pytest.fixture()
def pos_csv(tmp_path: Path) -> Path:
    path = tmp_path / "pos.csv"
    path.write_text(POS)
    return path


def test_csv_accounts_and_shape(pos_csv):
    out = span_accounts(SPN, str(pos_csv))
    assert out["file_id"] == "TAKASBANK-20160517-final" and len(out["sha256"]) == 64
    accts = {a["account"]: a for a in out["accounts"]}
    assert [a["account"] for a in out["accounts"]] == ["desk1", "desk2", "desk3"]
    for a in out["accounts"]:
        assert set(a) == {"account", "total", "currency", "ccs"} and a["currency"] == "TRY"
        for c in a["ccs"]:
            assert set(c) == {
                "cc",
                "scan",
                "intra",
                "spot",
                "inter",
                "som",
                "nov",
                "requirement",
                "active_scenario",
            }
    # the rows of desk1 sum to long 13 AKBNKE / short 1 XU030: 1170 + 955 - 0.6 x (12.75 x 90 + 955)
    assert accts["desk1"]["total"] == pytest.approx(1170 + 955 - 0.6 * (12.75 * 90 + 955))
    assert [c["cc"] for c in accts["desk1"]["ccs"]] == ["AKBNKE", "XU030"]
    assert accts["desk2"]["total"] == pytest.approx(720 + 2 * 90.239021 - 2 * 163)
    assert accts["desk3"]["total"] == pytest.approx(4 * 10 + 4 * 1.0)
    assert accts["desk3"]["ccs"][0]["som"] == pytest.approx(40.0)
    assert json.loads(json.dumps(out)) == out


def test_parquet_gives_the_same_answer(pos_csv, tmp_path):
    lines = [line.split(",") for line in POS.strip().splitlines()]
    cols = {name: [row[i] or None for row in lines[1:]] for i, name in enumerate(lines[0])}
    cols["qty"] = [float(q) for q in cols["qty"]]
    cols["k"] = [float(k) if k else None for k in cols["k"]]
    pq.write_table(pa.table(cols), tmp_path / "pos.parquet")
    assert span_accounts(SPN, str(tmp_path / "pos.parquet")) == span_accounts(SPN, str(pos_csv))


def test_unknown_contracts_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "account,exch,pf_code,pf_type,pe,qty,o,k\n"
        "a,BIST,AKBNKE,FUT,201605S0,1,,\n"
        "a,BIST,NOSUCH,FUT,201605S0,1,,\n"
        "b,BIST,AKBNKE,OOP,201605S0,1,C,6.10\n"
    )
    with pytest.raises(SpanPositionError) as ei:
        span_accounts(SPN, str(path))
    text = str(ei.value)
    assert "BIST/NOSUCH/FUT/201605S0" in text and "BIST/AKBNKE/OOP/201605S0/C/6.1" in text
    assert len(ei.value.problems) == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("account,exch,pf_code,pe,qty\na,BIST,AKBNKE,201605S0,1\n", "missing column(s) pf_type"),
        ("account,exch,pf_code,pf_type,pe,qty\na,BIST,AKBNKE,FUT,201605S0,lots\n", "row 1: qty 'lots'"),
        ("account,exch,pf_code,pf_type,pe,qty,o,k\na,BIST,AKBNKE,OOP,201605S0,1,,6\n", "row 1: option o"),
        ("account,exch,pf_code,pf_type,pe,qty\n,BIST,AKBNKE,FUT,201605S0,1\n", "row 1: account is empty"),
        ("account,exch,pf_code,pf_type,pe,qty\na,BIST,AKBNKE,SWAP,201605S0,1\n", "row 1: pf_type 'SWAP'"),
    ],
)
def test_bad_rows_are_named(tmp_path, body, message):
    path = tmp_path / "rows.csv"
    path.write_text(body)
    with pytest.raises(SpanPositionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        span_accounts(SPN, str(path))


def test_main_json_and_errors(pos_csv, tmp_path, capsys):
    assert main(["--span-file", SPN, "--positions", str(pos_csv), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == span_accounts(SPN, str(pos_csv))
    assert main(["--span-file", SPN, "--positions", str(pos_csv)]) == 0
    assert "desk1  total 863.50 TRY" in capsys.readouterr().out
    bad = tmp_path / "bad.csv"
    bad.write_text("account,exch,pf_code,pf_type,pe,qty\na,BIST,NOSUCH,FUT,201605S0,1\n")
    assert main(["--span-file", SPN, "--positions", str(bad), "--json"]) == 2
    assert "BIST/NOSUCH/FUT/201605S0" in capsys.readouterr().err
    truncated = tmp_path / "cut.spn"
    truncated.write_bytes(Path(SPN).read_bytes()[:200_000])
    assert main(["--span-file", str(truncated), "--positions", str(pos_csv)]) == 2
    assert "SPAN file refused at <spanFile/pointInTime/clearingOrg/exchange" in capsys.readouterr().err
