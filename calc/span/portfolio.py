"""SPAN state for many accounts: positions, per-CC scenario loss vectors, charges; incremental and full
paths.

`SpanBook.fill` / `apply_fills` update one CC per fill in O(scenarios); `recompute_full` rebuilds from
positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from calc.span import kernels as K
from calc.span.model import (
    AccountMargin,
    CCMargin,
    ContractKey,
    SpanParams,
    SpanPositionError,
    contract_key,
)


class _State:
    """Per-account arrays (rows = accounts), grown by doubling; see kernels.py for the tuple order."""

    def __init__(self, params: SpanParams, capacity: int) -> None:
        a = max(1, capacity)
        n, c, s, p = params.n_contracts, len(params.cc_names), params.n_points, len(params.p_pe)
        self.qty = np.zeros((a, n))
        self.npos = np.zeros((a, c), np.int64)
        self.loss = np.zeros((a, c, s))
        self.pdelta = np.zeros((a, p))
        self.rem = np.zeros((a, p))
        self.acc = np.zeros((a, c, 3))
        self.res = np.zeros((a, c, K.NRES))
        self.total = np.zeros((a, len(params.currencies)))
        self.live = np.zeros((a, len(params.s_rate)), np.int64)
        self.nlive = np.zeros(a, np.int64)

    _FIELDS = ("qty", "npos", "loss", "pdelta", "rem", "acc", "res", "total", "live", "nlive")

    def args(self) -> tuple:
        return tuple(getattr(self, f) for f in self._FIELDS)

    @property
    def capacity(self) -> int:
        return self.qty.shape[0]

    def grow(self, need: int) -> None:
        new = max(need, 2 * self.capacity)
        for f in self._FIELDS:
            old = getattr(self, f)
            arr = np.zeros((new, *old.shape[1:]), old.dtype)
            arr[: old.shape[0]] = old
            setattr(self, f, arr)


class SpanBook:
    """SPAN margin of a set of accounts under one parameter file, kept current fill by fill."""

    def __init__(self, params: SpanParams, accounts: Iterable[str] = (), capacity: int = 64) -> None:
        self.params = params
        self._prm = K.pack(params)
        self.accounts: list[str] = []
        self.account_index: dict[str, int] = {}
        self._st = _State(params, capacity)
        for acct in accounts:
            self.account(acct)

    # ---- accounts and contracts ------------------------------------------------------------------------
    def account(self, name: str) -> int:
        """Row of an account, adding it (empty) when new."""
        i = self.account_index.get(name)
        if i is None:
            i = len(self.accounts)
            if i >= self._st.capacity:
                self._st.grow(i + 1)
            self.accounts.append(name)
            self.account_index[name] = i
        return i

    def contract(self, key: ContractKey | tuple) -> int:
        """Contract row of a key (raw 4- or 6-tuples are normalised); KeyError naming an unknown contract."""
        row = self.params.index.get(key)  # type: ignore[arg-type]
        if row is not None:
            return row
        if len(key) not in (4, 6):
            raise ValueError(f"contract key {key!r} must be (exch, pf_code, pf_type, pe[, o, k])")
        return self.params.lookup(contract_key(*key))

    # ---- incremental path ------------------------------------------------------------------------------
    def apply_fills(self, acct_idx: np.ndarray, contract_idx: np.ndarray, dqty: np.ndarray) -> np.ndarray:
        """Apply a batch of fills (rows from `account`/`contract`); returns each fill's account total
        after it."""
        acct_idx = np.ascontiguousarray(acct_idx, np.int64)
        contract_idx = np.ascontiguousarray(contract_idx, np.int64)
        dqty = np.ascontiguousarray(dqty, np.float64)
        if not (acct_idx.shape == contract_idx.shape == dqty.shape) or acct_idx.ndim != 1:
            raise ValueError("acct_idx, contract_idx and dqty must be 1-d arrays of one length")
        if acct_idx.size == 0:
            return np.empty(0)
        if acct_idx.min() < 0 or acct_idx.max() >= len(self.accounts):
            raise ValueError("account row out of range")
        if contract_idx.min() < 0 or contract_idx.max() >= self.params.n_contracts:
            raise ValueError("contract row out of range")
        if not np.isfinite(dqty).all():
            raise ValueError("fill quantities must be finite")
        out = np.empty(acct_idx.shape[0])
        K.apply_fills(acct_idx, contract_idx, dqty, self._prm, self._st.args(), out)
        return out

    def sync(self, account: str, rows: np.ndarray, qty: np.ndarray) -> tuple[float, np.ndarray]:
        """Bring an account to quantities `qty` in contracts `rows` (every contract it holds, once; -1 =
        skip), recomputing only the CCs that moved, in one kernel call. Returns its total (summed over
        currencies) and each row's contribution (as `contributions`)."""
        rows = np.ascontiguousarray(rows, np.int64)
        qty = np.ascontiguousarray(qty, np.float64)
        if rows.shape != qty.shape or rows.ndim != 1:
            raise ValueError("rows and qty must be 1-d arrays of one length")
        if len(rows) and rows.max() >= self.params.n_contracts:
            raise ValueError("contract row out of range")
        if not np.isfinite(qty).all():
            raise ValueError("quantities must be finite")
        a = self.account(account)
        out = np.zeros(len(rows))
        total = K.sync_account(a, rows, qty, self._prm, self._st.args(), out)
        return float(total), out

    def fill(self, account: str, key: ContractKey | tuple, dqty: float) -> float:
        """One fill (signed quantity change); returns the account's total in that CC's currency."""
        k = self.contract(key)  # an unknown contract raises before the account is created
        a = self.account(account)
        return float(self.apply_fills(np.array([a]), np.array([k]), np.array([float(dqty)]))[0])

    def what_if(
        self, account: str, trades: Iterable[tuple[ContractKey | tuple, float]]
    ) -> list[AccountMargin]:
        """The account's margin if `trades` (key, signed qty) were filled; the book itself is not changed."""
        rows = [(self.contract(key), float(q)) for key, q in trades]
        scratch = SpanBook(self.params, [account], capacity=1)
        a = self.account_index.get(account)
        if a is not None:
            for f in _State._FIELDS:
                getattr(scratch._st, f)[0] = getattr(self._st, f)[a]
        if rows:
            k_idx, dq = zip(*rows, strict=True)
            scratch.apply_fills(np.zeros(len(rows), np.int64), np.array(k_idx), np.array(dq))
        return scratch.margin(account)

    # ---- full path -------------------------------------------------------------------------------------
    def set_positions(self, positions: Mapping[str, Mapping[ContractKey, float]] | Iterable[tuple]) -> None:
        """Replace all positions: {account: {key: qty}} or rows (account, key, qty) (summed); then
        recompute."""
        rows = (
            ((acct, key, q) for acct, book in positions.items() for key, q in book.items())
            if isinstance(positions, Mapping)
            else positions
        )
        problems: list[str] = []
        entries: list[tuple[str, int, float]] = []
        for acct, key, q in rows:
            try:
                entries.append((str(acct), self.contract(key), float(q)))
            except (KeyError, ValueError) as e:
                problems.append(f"account {acct}: {e.args[0] if e.args else e}")
        if problems:  # refused as a whole: the book is unchanged
            raise SpanPositionError(problems)
        self._st.qty[:] = 0.0
        for acct, k, q in entries:
            self._st.qty[self.account(acct), k] += q
        self.recompute_full()

    def recompute_full(self) -> None:
        """Recompute every account from its positions (the reference the incremental path must match)."""
        n = len(self.accounts)
        st = tuple(x[:n] for x in self._st.args())
        K.full_recompute(self._prm, st)

    def reload(self, params: SpanParams) -> SpanBook:
        """The same positions under a new parameter file; raises SpanPositionError (self unchanged) if the
        new file lacks a held contract."""
        n = len(self.accounts)
        a_idx, k_idx = np.nonzero(self._st.qty[:n])
        rows = [
            (self.accounts[a], self.params.keys[k], self._st.qty[a, k])
            for a, k in zip(a_idx, k_idx, strict=True)
        ]
        book = SpanBook(params, self.accounts, capacity=max(n, 1))
        book.set_positions(rows)
        return book

    # ---- results ---------------------------------------------------------------------------------------
    def positions(self, account: str) -> dict[ContractKey, float]:
        a = self.account_index[account]
        row = self._st.qty[a]
        return {self.params.keys[k]: float(row[k]) for k in np.flatnonzero(row)}

    def held(self, account: str) -> tuple[np.ndarray, np.ndarray]:
        """(contract rows, quantities) of an account's non-zero positions (empty for an unknown account)."""
        a = self.account_index.get(account)
        if a is None:
            return np.zeros(0, np.int64), np.zeros(0)
        rows = np.flatnonzero(self._st.qty[a])
        return rows, self._st.qty[a, rows]

    def quantities(self, account: str, rows: np.ndarray) -> np.ndarray:
        """The account's quantities in contracts `rows` (zeros for an account the book does not have)."""
        a = self.account_index.get(account)
        return np.zeros(len(rows)) if a is None else self._st.qty[a, rows]

    def contributions(self, account: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each held contract's share of the account's SPAN total: (contract rows, amounts), the amounts
        summing to the total of each currency (summed over currencies). `rows` (every held contract once,
        in any order, -1 for none) chooses the order; default: the held contracts in row order.

        Per CC: when SOM sets the requirement, it is shared by the short options in proportion to their
        SOM (in MAX method, the options of the larger side); otherwise each contract takes its loss in
        the active scenario (these add up to the scan risk) plus a share of intra + spot - inter in
        proportion to its |delta| (equal shares when the CC has no delta). Each option then subtracts its
        own option value (NOV). A CC whose capAnov floor binds, and a currency whose total is floored at
        0, contribute 0.
        """
        if rows is None:
            rows, q = self.held(account)
        else:
            rows = np.ascontiguousarray(rows, np.int64)
            q = np.where(rows >= 0, self.quantities(account, np.maximum(rows, 0)), 0.0)
        out = np.zeros(len(rows))
        a = self.account_index.get(account)
        if a is not None and len(rows):
            K.contributions(a, rows, np.ascontiguousarray(q, np.float64), self._prm, self._st.args(), out)
        return rows, out

    def totals(self) -> np.ndarray:
        """float64[accounts, currencies] (currencies = params.currencies)."""
        return self._st.total[: len(self.accounts)]

    def cc_results(self) -> np.ndarray:
        """float64[accounts, CCs, kernels.NRES]: the raw per-CC components (columns kernels.R_*)."""
        return self._st.res[: len(self.accounts)]

    def loss_vectors(self) -> np.ndarray:
        """float64[accounts, CCs, scenarios]: each CC's scenario loss (positive = loss)."""
        return self._st.loss[: len(self.accounts)]

    def margin(self, account: str) -> list[AccountMargin]:
        """An account's SPAN margin, one entry per currency it holds CCs in, CCs sorted by name."""
        a = self.account_index[account]
        p = self.params
        held = np.flatnonzero(self._st.npos[a] > 0)
        by_cur: dict[str, list[CCMargin]] = {}
        for c in sorted(held, key=lambda c: p.cc_names[c]):
            r = self._st.res[a, c]
            cur = p.cc_currency[c]
            by_cur.setdefault(cur, []).append(
                CCMargin(
                    cc=p.cc_names[c], currency=cur,
                    scan=float(r[K.R_SCAN]), active_scenario=int(r[K.R_ACTIVE]),
                    time_risk=float(r[K.R_TIME]), vol_risk=float(r[K.R_VOL]), price_risk=float(r[K.R_PRICE]),
                    net_delta=float(r[K.R_DELTA]), wfpr=float(r[K.R_WFPR]), intra=float(r[K.R_INTRA]),
                    spot=float(r[K.R_SPOT]), inter=float(r[K.R_INTER]), som=float(r[K.R_SOM]),
                    nov=float(r[K.R_NOV]), requirement=float(r[K.R_REQ]),
                )
            )  # fmt: skip
        cur_idx = {c: i for i, c in enumerate(p.currencies)}
        return [
            AccountMargin(account, cur, float(self._st.total[a, cur_idx[cur]]), tuple(ccs))
            for cur, ccs in sorted(by_cur.items())
        ]


def span_margin(
    params: SpanParams, positions: Mapping[str, Mapping[ContractKey, float]] | Iterable[tuple]
) -> dict[str, list[AccountMargin]]:
    """One-off SPAN margin: {account: [AccountMargin per currency]} for {account: {key: qty}} or rows."""
    book = SpanBook(params)
    book.set_positions(positions)
    return {acct: book.margin(acct) for acct in book.accounts}
