"""schemas: the single definition of every table, wire message and derived type (Arrow, DuckDB, msgspec).

Nothing outside this package spells a column list or a message layout.
"""
