"""Testing support: a throwaway PostgreSQL server, pytest fixtures and queue assertions.

- `EphemeralPostgres`: a private server on a unix socket, started in well under a
  second and never left behind (see `substrate_db.testing._server`).
- The pytest plugin (`substrate_db.testing.pytest_plugin`) is loaded by pytest
  through its entry point and provides the ``substrate_postgres``,
  ``substrate_template_db``, ``substrate_dsn``, ``substrate`` and
  ``async_substrate`` fixtures.
- `assert_enqueued`, `refute_enqueued`, `drain` and their async twins check and run
  what your code enqueued.
"""

from ._server import (
    EphemeralPostgres,
    PostgresNotFound,
    PostgresStartError,
    ServerAccount,
    find_pg_bindir,
    prepare_bindir_for,
    server_account,
)
from .helpers import (
    DrainOutcome,
    DrainResult,
    aassert_enqueued,
    adrain,
    arefute_enqueued,
    assert_enqueued,
    drain,
    payload_contains,
    refute_enqueued,
)

__all__ = [
    "DrainOutcome",
    "DrainResult",
    "EphemeralPostgres",
    "PostgresNotFound",
    "PostgresStartError",
    "ServerAccount",
    "aassert_enqueued",
    "adrain",
    "arefute_enqueued",
    "assert_enqueued",
    "drain",
    "find_pg_bindir",
    "payload_contains",
    "prepare_bindir_for",
    "refute_enqueued",
    "server_account",
]
