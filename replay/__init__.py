"""replay: journals read back for backtests, paced replays and `journal check`.

The journal itself (format, writer, reader in seq order) is the tickerplant's: tickerplant/journal*.py.
"""
