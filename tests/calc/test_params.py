"""The commands that journal one param row (`marginflow params load`, `marginflow prices accept`): a
refused input exits 2, a row that could not be journaled exits 1, each saying why on stderr."""

from __future__ import annotations

from calc import params, prices
from tests.support import SPAN_FILE

NOWHERE = "ws://127.0.0.1:1"  # nothing listens on port 1


def test_params_load_stores_but_says_it_could_not_journal(tmp_path, capsys):
    code = params.main(["load", str(SPAN_FILE), "--tp", NOWHERE, "--params-dir", str(tmp_path)])
    err = capsys.readouterr().err
    (stored,) = tmp_path.iterdir()  # stored by content hash before the journal was tried
    assert code == 1 and f"stored {stored.stem[:12]}... but could not journal it at {NOWHERE}" in err, err


def test_prices_accept_refuses_or_says_it_was_not_journaled(capsys):
    assert prices.main(["accept", "AAPL", "--price", "-5", "--tp", NOWHERE]) == 2
    assert "marginflow prices: refused:" in capsys.readouterr().err
    assert prices.main(["accept", "AAPL", "--tp", NOWHERE, "--who", "ops@test"]) == 1
    err = capsys.readouterr().err
    assert f"the acceptance was not journaled: could not journal it at {NOWHERE}" in err, err
