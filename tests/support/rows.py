"""Row builders for tests: columns of trades, quotes and fills as publishers send them, and trade
tables as the rdb stores them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

T0 = 1_705_312_800_000_000_000  # 2024-01-15 10:00:00 UTC in ns
ALERT_ROW = {  # one alert row as calc publishes it (webhook and email tests)
    "account": "TECH01",
    "rule": "utilisation-90",
    "kind": "utilisation",
    "state": "raised",
    "value": 0.93,
    "threshold": 0.9,
    "message": "TECH01: utilisation 93.0% above 90.0%",
    "last_seq": 7,
}


def trades(n: int, start: int = 0) -> dict[str, list]:
    syms = ["AAPL", "MSFT", "IBM", "JPM"]
    return {
        "sym": [syms[(start + i) % 4] for i in range(n)],
        "price": [100.0 + (start + i) % 97 * 0.25 for i in range(n)],
        "size": [1 + (start + i) % 13 for i in range(n)],
    }


def quotes(n: int, start: int = 0) -> dict[str, list]:
    syms = ["AAPL", "MSFT", "IBM", "JPM"]
    return {
        "sym": [syms[(start + i) % 4] for i in range(n)],
        "bid": [99.0 + (start + i) % 89 * 0.25 for i in range(n)],
        "ask": [99.5 + (start + i) % 89 * 0.25 for i in range(n)],
        "bid_size": [100] * n,
        "ask_size": [200] * n,
    }


def fills(n: int, start: int, accounts=("TECH01", "DIV02", "NRG03", "PHRM04", "MN05", "MACRO06")) -> dict:
    """n fills over the demo accounts and six of their instruments, unique exec_ids from `start`."""
    syms = ["AAPL", "KO", "XOM", "JNJ", "MSFT", "JPM"]
    return {
        "account": [accounts[(start + i) % len(accounts)] for i in range(n)],
        "sym": [syms[(start + i * 7) % 6] for i in range(n)],
        "side": ["B" if (start + i) % 3 else "S" for i in range(n)],
        "qty": [float(10 * (1 + (start + i) % 5)) for i in range(n)],
        "price": [100.0 + (start + i) % 11 for i in range(n)],
        "order_id": [f"O{start + i}" for i in range(n)],
        "exec_id": [f"E{start + i}" for i in range(n)],
    }


def trade_table(seq0: int, n: int, rng: np.random.Generator, t0: int = T0) -> pa.Table:
    """n trade rows as the rdb holds them, seq seq0.. ; times repeat in pairs (ties), syms interleave."""
    return pa.table(
        {
            "time": pa.array(t0 + (np.arange(n) // 2) * 1_000_000, pa.int64()).cast(pa.timestamp("ns")),
            "seq": pa.array(np.arange(seq0, seq0 + n), pa.int64()),
            "sym": pa.array(rng.choice(["AAPL", "MSFT", "IBM"], n)),
            "price": pa.array(rng.uniform(10, 20, n)),
            "size": pa.array(rng.integers(1, 1000, n), pa.int64()),
        }
    )
