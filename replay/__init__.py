"""replay: read journals back in seq order, for recovery (subscribers), backtests and paced replays.

The journal format itself (paths, scan, repair) is the tickerplant's: tickerplant/journal.py.
"""
