"""rdb: today's data in an in-memory DuckDB, a sandboxed SQL service over it, the end-of-day Parquet HDB
and the q-like console (store, sandbox, query, hdb, qsql, service, server, console).
"""
