"""pytest fixtures for substrate-db users: a server, a migrated template, a database per test.

Loaded automatically through the ``pytest11`` entry point once substrate-db is
installed (disable with ``-p no:substrate_db``). Fixtures:

- ``substrate_postgres`` (session): the server. The one named by the
  ``SUBSTRATE_TEST_DSN`` environment variable (any libpq conninfo, key=value or URI;
  its database is used for CREATE/DROP DATABASE), else a private `EphemeralPostgres`.
- ``substrate_template_db`` (session): the name of a database migrated once per run,
  dropped at the end. Its name carries the pid and a random part, so runs sharing
  one external server do not collide.
- ``substrate_dsn``: conninfo of a fresh database cloned from the template
  (``CREATE DATABASE … TEMPLATE``, faster than migrating), dropped after the test.
  Every test gets committed rows that other connections can see, as concurrency
  tests need.
- ``substrate``: a `Substrate` on that database; ``async_substrate``: an
  `AsyncSubstrate` (defined only when pytest-asyncio is installed).

substrate_db itself is imported inside the fixtures, so merely having the plugin
installed costs a pytest run nothing.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import psycopg

    from substrate_db import AsyncSubstrate, Substrate
    from substrate_db.testing._server import EphemeralPostgres

TEST_DSN_ENV = "SUBSTRATE_TEST_DSN"
"""Environment variable naming an existing server to test against."""

_test_db_numbers = itertools.count(1)


class PostgresFixture:
    """The server behind the ``substrate_`` fixtures: where to connect, and databases
    created and dropped through one autocommit admin connection."""

    def __init__(self, conninfo: str, ephemeral: EphemeralPostgres | None = None) -> None:
        self.conninfo = conninfo
        """The admin (maintenance) database's conninfo."""
        self.ephemeral = ephemeral
        """The private server, or None when testing against SUBSTRATE_TEST_DSN."""
        self._admin: psycopg.Connection[Any] | None = None

    def conninfo_for(self, dbname: str) -> str:
        """The conninfo of database `dbname` on this server."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.conninfo, dbname=dbname)

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """CREATE DATABASE `name` (from `template`, if given); return its conninfo."""
        from psycopg import sql

        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            # The default strategy: STRATEGY FILE_COPY measured no faster here, and
            # forces two checkpoints, unkind to a shared server named by SUBSTRATE_TEST_DSN.
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        self._admin_connection().execute(query)
        return self.conninfo_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE `name` if it exists, disconnecting its sessions (PG 13+)."""
        from psycopg import sql

        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        self._admin_connection().execute(query)

    def _admin_connection(self) -> psycopg.Connection[Any]:
        import psycopg

        if self._admin is None or self._admin.closed or self._admin.broken:
            self._admin = psycopg.connect(self.conninfo, autocommit=True)
        return self._admin

    def close(self) -> None:
        """Close the admin connection and stop the private server, if any."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.ephemeral is not None:
            self.ephemeral.stop()

    def __repr__(self) -> str:
        where = repr(self.ephemeral) if self.ephemeral is not None else f"${TEST_DSN_ENV}"
        return f"<PostgresFixture {where}>"


def _unique(prefix: str) -> str:
    # pid + random: distinct across xdist workers and across machines sharing a server.
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def substrate_postgres() -> Iterator[PostgresFixture]:
    """The PostgreSQL server for this test session (SUBSTRATE_TEST_DSN or a private one)."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        server = PostgresFixture(dsn)
    else:
        from substrate_db.testing._server import EphemeralPostgres

        ephemeral = EphemeralPostgres().start()
        server = PostgresFixture(ephemeral.conninfo, ephemeral)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def substrate_template_db(substrate_postgres: PostgresFixture) -> Iterator[str]:
    """The name of a database migrated once for the session, the template of every test's."""
    from substrate_db import Substrate

    name = _unique("substrate_tpl")
    conninfo = substrate_postgres.create_database(name)
    try:
        # The pool is closed on leaving the block: cloning needs the template unused.
        with Substrate.connect(conninfo, min_size=1, max_size=1) as client:
            client.migrate()
        yield name
    finally:
        substrate_postgres.drop_database(name)


@pytest.fixture
def substrate_dsn(substrate_postgres: PostgresFixture, substrate_template_db: str) -> Iterator[str]:
    """Conninfo of a fresh, migrated database for this test, dropped afterwards."""
    name = f"{_unique('substrate_test')}_{next(_test_db_numbers)}"
    conninfo = substrate_postgres.create_database(name, template=substrate_template_db)
    try:
        yield conninfo
    finally:
        substrate_postgres.drop_database(name)


@pytest.fixture
def substrate(substrate_dsn: str) -> Iterator[Substrate]:
    """A `Substrate` on this test's database, closed after the test."""
    from substrate_db import Substrate

    client = Substrate.connect(substrate_dsn)
    try:
        yield client
    finally:
        client.close()


try:
    import pytest_asyncio
except ImportError:  # the async fixture needs pytest-asyncio; the rest does not
    _HAVE_PYTEST_ASYNCIO = False
else:
    _HAVE_PYTEST_ASYNCIO = True

if _HAVE_PYTEST_ASYNCIO:

    @pytest_asyncio.fixture
    async def async_substrate(substrate_dsn: str) -> AsyncIterator[AsyncSubstrate]:
        """An `AsyncSubstrate` on this test's database, closed after the test."""
        from substrate_db import AsyncSubstrate

        client = await AsyncSubstrate.connect(substrate_dsn)
        try:
            yield client
        finally:
            await client.close()
