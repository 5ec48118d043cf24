"""marginflow: the command line and configuration that start the tickerplant, rdb, calc and feeds.

Each process lives in its own top-level package; this one only wires them together.
"""
