"""The engine's accounts on external models (calc.models.register_model; SPAN in calc/span/engine_model.py):
the model objects, which contracts their accounts may hold, and each account's last result.

    ext = ExternalAccounts(specs, calc_config, syms)   # the engine's `eng.ext` (`eng.external`: ext.models)
    ext.instrument("span", "ESZ6")   # (price, multiplier) | None (unknown) | () (the model takes any sym)
    ext.refresh(st, acc)             # the changed accounts of a kernel step re-evaluated
    ext.contrib[a]                   # per-slot contributions to account a's margin (for its drivers)

A model is called per changed account with `evaluate(syms, qty, price, multiplier)`, or
`evaluate_account(account, ...)` if it keeps per-account state; optional `instrument(sym)` names the
contracts its accounts may hold (added to the engine when first traded) and `param_id` the file their
rows carry. Results go into the kernel state's `res` (var, es, margin) like the built-in models'.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from calc.history import InputError
from calc.inputs import AccountSpec
from calc.kernels import R_ES, R_MARGIN, R_VAR, State
from calc.models import BUILTIN_MODELS, ExternalModel, ExternalResult, external_model
from marginflow.config import CalcConfig


def numbers(r: ExternalResult) -> tuple[float, float, float]:
    """An external model's result as the engine's (var, es, margin), floored at 0: margin is the VaR
    unless the model gives its own (a CCP model's, add-ons included)."""
    return max(r.var, 0.0), max(r.es, 0.0), max(r.var if r.margin is None else r.margin, 0.0)


class ExternalAccounts:
    """The external models the accounts `specs` use, instantiated under `calc_config` (an unknown model
    is refused); `syms` is the engine's instrument list (it grows with it)."""

    def __init__(self, specs: Sequence[AccountSpec], calc_config: CalcConfig, syms: list[str]):
        self.account_names = [s.account for s in specs]
        self._model_named = {s.account: s.model for s in specs}
        self.model_of = [s.model for s in specs]
        self.models: dict[str, ExternalModel] = {}
        for m in self.model_of:
            if m not in BUILTIN_MODELS and m not in self.models:
                self.models[m] = external_model(m, calc_config)
        self.accounts = frozenset(a for a, m in enumerate(self.model_of) if m in self.models)  # indices
        self.contrib: dict[int, np.ndarray] = {}  # account -> per-slot contributions of its last result
        self.components: dict[int, Any] = {}  # account -> the parts of its last margin (CCP models)
        self.syms = syms

    def instrument(self, model: str, sym: str) -> tuple[float, float] | tuple[()] | None:
        """(price, multiplier) of a contract of external model `model` (its `instrument(sym)`), None when
        the model does not know the sym, () when the model takes any sym (no `instrument` method)."""
        look = getattr(self.models[model], "instrument", None)
        return () if look is None else look(sym)

    def contract(self, account: str, sym: str) -> tuple[float, float] | tuple[()]:
        """(price, multiplier) of `sym` as a start-of-day position of `account` when its external model
        names its contracts, () for any other account; refused: a sym the model does not know."""
        model = self._model_named.get(account, "")
        info = self.instrument(model, sym) if model in self.models else ()
        if info is None:
            raise InputError(
                f"positions: account {account!r}: unknown sym {sym!r} (not an instrument of model {model!r})"
            )
        return info

    def check_held(self, st: State) -> None:
        """Refused (InputError naming account, sym and model): a start-of-day position of an external
        model's account in a sym its model does not know (checked once the models are bound)."""
        for a in sorted(self.accounts):
            model = self.model_of[a]
            for j in st.inst[a, : st.nslot[a]].tolist():
                if self.instrument(model, self.syms[j]) is None:
                    raise InputError(
                        f"positions: account {self.account_names[a]!r}: unknown sym {self.syms[j]!r} "
                        f"(not an instrument of model {model!r})"
                    )

    def admit(
        self,
        a_l: list[int],
        j_l: list[int],
        sym: Sequence[str],
        sym_index: Mapping[str, int],
        add_instruments: Callable[[list[str], str], None],
    ) -> list[bool]:
        """Rows of external-model accounts (a_l, j_l: account and instrument indices, -1 unknown): False
        where the model does not know the sym; a sym it knows that the engine does not yet is added
        (`add_instruments(syms, model)`) and j_l updated in place from `sym_index`."""
        ok = [True] * len(a_l)
        rows = [i for i, a in enumerate(a_l) if a >= 0 and a in self.accounts]
        new: dict[str, dict[str, None]] = {}
        for i in rows:
            model = self.model_of[a_l[i]]
            if self.instrument(model, sym[i]) is None:
                ok[i] = False
            elif j_l[i] < 0:
                new.setdefault(model, {})[sym[i]] = None
        for model, syms in new.items():
            add_instruments([s for s in syms if s not in sym_index], model)
        if new:
            for i in rows:
                j_l[i] = sym_index.get(sym[i], -1)
        return ok

    def evaluate(self, st: State, a: int, full: bool = False) -> ExternalResult:
        """Account a under its external model: `evaluate_account(account, ...)` when the model keeps
        per-account state (e.g. SPAN's book, updated incrementally), else (or for the `full`
        reference path) the stateless `evaluate(...)` on the account's positions."""
        n = int(st.nslot[a])
        inst = st.inst[a, :n]
        model = self.models[self.model_of[a]]
        args = (
            [self.syms[j] for j in inst],
            st.qty[a, :n].copy(),
            st.price[inst],  # (indexing by `inst` copies already)
            st.mult[inst],
        )
        per_account = None if full else getattr(model, "evaluate_account", None)
        if per_account is not None:
            return per_account(self.account_names[a], *args)
        return model.evaluate(*args)

    def store(self, st: State, a: int, r: ExternalResult) -> None:
        """Account a's result into the kernel state's numbers (floored at 0) and its contributions."""
        st.res[a, [R_VAR, R_ES, R_MARGIN]] = numbers(r)
        self.contrib[a] = np.asarray(r.contrib, dtype=np.float64)
        if r.components is not None:
            self.components[a] = r.components

    def refresh(self, st: State, acc: np.ndarray, full: bool = False) -> None:
        """The accounts of `acc` on external models evaluated and stored (the others skipped)."""
        for a in [a for a in acc.tolist() if a in self.accounts]:
            self.store(st, a, self.evaluate(st, a, full))

    def update(self, model: str, update: Callable[[ExternalModel], Any], st: State) -> np.ndarray:
        """A parameter event for `model`: `update(model object)` (an exception propagates, nothing
        changed here), then its accounts re-evaluated; returns them."""
        update(self.models[model])
        acc = np.array([a for a, m in enumerate(self.model_of) if m == model], dtype=np.int64)
        for a in acc.tolist():
            self.store(st, a, self.evaluate(st, a))
        return acc
