"""A short chaos run in CI: `benchmarks/chaos.py` kills random processes of `marginflow up --demo`
with SIGKILL and checks that nothing was lost, doubled or left wrong (the 50-round run's figures are in
BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_rounds_lose_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "chaos.py"),
            "--rounds",
            "8",
            "--seed",
            "3",
            "--rate",
            "1000",
            "--var",
            str(tmp_path / "var"),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["failures"] == [], summary
    assert summary["rounds"] == 8 and summary["restarts_seen"] == 8
    assert summary["marker_acked"] > 0 and summary["marker_lost"] == 0 and summary["marker_doubled"] == 0
    assert summary["duplicate_seqs"] == 0 and summary["duplicate_exec_ids"] == 0
    assert summary["restart_to_first_row_s"]["max"] <= 5.0
    assert summary["margin_max_rel_diff_vs_replay"] <= 1e-9
    assert summary["margin_rows_back_in_time"] == 0 and summary["alert_repeats"] == 0
    assert proc.returncode == 0, proc.stdout[-4000:]
