"""calc/shard_plan.py: the plan keeps each option's holders on one shard where the book allows it (two
desks on disjoint underlyings: a desk a shard, no contract in two shards), balances the work (an American
contract weighs AMERICAN_COST European ones), is deterministic, and `marginflow shards plan` writes a file
calc.shard_file reads; the loads of an assignment against a count by hand; the demo's shard engines on a
plan give the unsharded engine's margins."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from calc import shard, shard_plan
from calc.engine import MarginEngine
from calc.fullreval import AMERICAN_COST
from calc.shard import read_assignment, shard_of
from marginflow import config
from tests.support.rows import fills
from tests.support.servers import running_tp
from tickerplant.client import Publisher


def _desks(n_desks: int = 2, per_desk: int = 20, contracts: int = 12, seed: int = 1):
    """Accounts of `n_desks` desks; each holds 3 of its desk's options and 2 of 10 shared stocks."""
    rng = random.Random(seed)
    held, cost = {}, {}
    for d in range(n_desks):
        mine = [f"D{d}O{c}" for c in range(contracts)]
        cost |= {o: 1.0 for o in mine}
        for i in range(per_desk):
            held[f"D{d}A{i:02d}"] = set(rng.sample(mine, 3)) | set(
                rng.sample([f"S{j}" for j in range(10)], 2)
            )
    return held, cost


def test_loads_count_accounts_positions_contracts_and_work_by_hand():
    held = {"A": {"X", "O1"}, "B": {"O1", "O2"}, "C": {"Y"}}
    cost = {"O1": 1.0, "O2": float(AMERICAN_COST)}
    rows = shard_plan.loads(held, cost, {"A": 0, "B": 1, "C": 1}, 2)
    p = shard_plan.POSITION_COST
    assert [(r.accounts, r.positions, r.contracts) for r in rows] == [(1, 2, 1), (2, 3, 2)]
    assert [r.contract_share for r in rows] == [0.5, 1.0]
    assert rows[0].work == pytest.approx(2 * p + 1.0) and rows[1].work == pytest.approx(
        3 * p + 1.0 + AMERICAN_COST
    )


def test_two_desks_on_disjoint_underlyings_get_a_shard_each():
    held, cost = _desks()
    got = shard_plan.plan(held, cost, 2)
    assert set(got) == set(held) and set(got.values()) == {0, 1}
    for d in (0, 1):
        assert len({got[a] for a in held if a.startswith(f"D{d}")}) == 1  # a desk on one shard
    rows = shard_plan.loads(held, cost, got, 2)
    assert [r.contract_share for r in rows] == [0.5, 0.5]  # no contract repriced twice
    hashed = shard_plan.loads(held, cost, {a: shard_of(a, 2) for a in held}, 2)
    assert min(r.contract_share for r in hashed) > 0.75  # (5 holders a contract on average: most in both)
    assert max(r.work for r in rows) < min(r.work for r in hashed)
    assert max(r.work for r in rows) / min(r.work for r in rows) < 1.05


def test_four_desks_on_two_shards_balance_and_an_american_contract_weighs_more():
    held, cost = _desks(4, per_desk=10)
    got = shard_plan.plan(held, cost, 2)
    rows = shard_plan.loads(held, cost, got, 2)
    assert max(r.work for r in rows) / min(r.work for r in rows) < 1.05
    assert sum(r.contracts for r in rows) == len({c for s in held.values() for c in s if c in cost})
    # one account holding an American contract is as much work as all the accounts of one European each
    # together (each a price and a position): it gets a shard alone
    p = shard_plan.POSITION_COST
    n = int((AMERICAN_COST + p) // (1.0 + p))
    held = {f"E{i}": {f"O{i}"} for i in range(n)} | {"AM": {"OAM"}}
    cost = {f"O{i}": 1.0 for i in range(n)} | {"OAM": float(AMERICAN_COST)}
    got = shard_plan.plan(held, cost, 2)
    assert [a for a in held if got[a] == got["AM"]] == ["AM"]


def test_the_plan_is_deterministic_and_covers_every_account_once():
    held, cost = _desks(3, per_desk=15)
    first = shard_plan.plan(held, cost, 3)
    keys = list(held)
    random.Random(7).shuffle(keys)
    assert shard_plan.plan({a: held[a] for a in keys}, cost, 3) == first
    assert set(first) == set(held) and set(first.values()) <= {0, 1, 2}
    assert set(shard_plan.plan(held, cost, 1).values()) == {0}


def test_the_cli_writes_a_file_the_shards_read_and_the_demo_s_shards_keep_the_margins(tmp_path, capsys):
    calc = config.load().calc
    out = tmp_path / "shards.csv"
    assert shard_plan.main(["plan", "--shards", "2", "--positions", str(tmp_path / "none.csv")]) == 2
    assert "none.csv: file not found" in capsys.readouterr().err  # a bad file: named, no traceback
    assert shard_plan.main(["plan", "--shards", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the hash assignment" in printed and "the plan" in printed and str(out) in printed
    assigned = read_assignment(out, 2)
    held, cost = shard_plan.holdings(calc.positions_file, calc.instruments_file)
    assert assigned == shard_plan.plan(held, cost, 2) and set(assigned) == set(held)
    whole = MarginEngine.from_config(calc)
    want = whole.snapshot()
    want = dict(zip(want["account"], want["margin"], strict=True))
    seen = {}
    for k in range(2):
        eng = shard.shard_engine(calc, shard.Shard(k, 2, assigned))
        assert sorted(eng.accounts) == sorted(a for a in held if assigned[a] == k)
        snap = eng.snapshot()
        seen |= dict(zip(snap["account"], snap["margin"], strict=True))
    assert seen.keys() == want.keys()
    np.testing.assert_array_equal([seen[a] for a in want], list(want.values()))


def test_a_plan_during_the_day_counts_what_today_s_fills_traded(tmp_path, capsys):
    """`--journal`: an account that bought OPT08's contract today (a fill journaled by a real tickerplant)
    goes to OPT08's shard (without the journal it does not hold it, and goes by the balance alone)."""
    calc = config.load().calc
    contract = "AAPL230127C125"  # (OPT08's, data/demo/positions.csv)

    async def journal_a_fill() -> None:
        async with running_tp(tmp_path / "journal") as (_, url), Publisher(url) as pub:
            fill = fills(1, 0, accounts=("TECH01",))
            await pub.upd("fill", {**fill, "sym": [contract]})
            await pub.wait_acked(timeout=10)

    asyncio.run(journal_a_fill())
    held, cost = shard_plan.holdings(calc.positions_file, calc.instruments_file, tmp_path / "journal")
    before, _ = shard_plan.holdings(calc.positions_file, calc.instruments_file)
    assert contract in held["TECH01"] and contract not in before["TECH01"]
    got = shard_plan.plan(held, cost, 2)
    assert got["TECH01"] == got["OPT08"]  # no second copy of the contract's scenario rows
    assert shard_plan.main(["plan", "--shards", "2", "--journal", str(tmp_path / "none")]) == 2
    assert "no journal day" in capsys.readouterr().err
