"""calc/state.py's slots (issue #19: found in the state's own arrays, no index beside them): place_slots
against a plain dict model of the slots, in order, a pair met twice in one call given one slot, the slots
and holders doubled when full; slot_of agrees."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from calc import kernels
from calc.state import place_slots, slot_of


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 11)), max_size=40), min_size=1, max_size=5)
)
def test_place_slots_equals_a_dict_of_the_pairs(calls):
    state = kernels.alloc(A=6, N=12, P=2, H=1, S=0, K=0, R=0, C=0, Q=0)
    model: dict[tuple[int, int], int] = {}  # (account, instrument) -> slot, slots numbered per account
    for pairs in calls:
        a_ix = np.array([a for a, _ in pairs], dtype=np.int64)
        j_ix = np.array([j for _, j in pairs], dtype=np.int64)
        state, slots, opened = place_slots(state, a_ix, j_ix)
        want, want_open = [], []
        for a, j in pairs:
            new = (a, j) not in model
            if new:
                model[(a, j)] = sum(1 for b, _ in model if b == a)
            want.append(model[(a, j)])
            want_open.append(new)
        assert slots.tolist() == want and opened.tolist() == want_open
    for a in range(6):
        mine = sorted((s, j) for (b, j), s in model.items() if b == a)
        assert int(state.nslot[a]) == len(mine)
        assert state.inst[a, : len(mine)].tolist() == [j for _, j in mine]
    for j in range(12):
        holders = sorted((state.hold_acc[j, h], state.hold_slot[j, h]) for h in range(state.nhold[j]))
        assert [(int(a), int(s)) for a, s in holders] == sorted(
            (a, s) for (a, i), s in model.items() if i == j
        )
        for a in range(6):
            assert slot_of(state, a, j) == model.get((a, j), -1)
    assert state.inst.shape[1] >= max(state.nslot.max(), 2) and state.hold_acc.shape[1] >= state.nhold.max()
