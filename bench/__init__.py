"""The benchmark harness of substrate-db (`python -m bench`, `make bench`).

Measures the library against the SQL ceiling (pgbench running the library's own
statements on the same server, in the same run) and against its Python peers, PgQueuer
and Procrastinate, installed from PyPI into their own venv (`.bench-venv/`). See
docs/performance.md for the scenarios, the targets and the latest table.
"""
