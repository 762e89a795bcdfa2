"""Connections for the intake: a pool that resolves the credential at every connect.

psycopg_pool (>= 3.3) accepts a callable as `kwargs`: the pool calls it each time it
opens a connection, so a rotated password is picked up by the next connection without
a restart, and the plain password exists only for the duration of one attempt.

Two more things the pool cannot do by itself:

- Retry once on an authentication failure with a freshly resolved password (the
  secret may have rotated between resolving and connecting). A connection class is
  the one documented hook that sees the error of a connect, so the retry lives there.
- Tell a tick *why* it got no connection. The pool connects in a background worker
  and only hands the waiting client a `PoolTimeout`; the connection class records the
  last failure in a `ConnectTracker`, which the tick reads to choose between
  `credential-fail` and `db-unreachable`.

psycopg's connection errors carry the failed `pgconn`, whose repr includes the password
given to libpq. The connection class therefore replaces such an error by a plain
`OperationalError` holding only the message, raised outside the `except` block so the
original is not kept as its context either.

psycopg_pool's own log records about the intake's pools are demoted to DEBUG (see
`_DemotePoolChatter`), so the runtime hears of a failure once, through the contract's
line.

The pool keeps no connection when idle at start (`min_size=0`), waits at most
`connect_timeout` for one, and gives up reconnecting right after a failed attempt and
its immediate retry (`reconnect_timeout=0`): the next tick asks again and the pool makes
a fresh attempt then, so a failure never disables the intake and never leaves a worker
retrying in the background on its own.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal, Self

import psycopg
import psycopg_pool

from .config import SubstrateConfig
from .credentials import CredentialError, CredentialResolver, resolve

FailureKind = Literal["credential", "unreachable"]

MIN_LIBPQ_CONNECT_TIMEOUT: Final = 2
"""libpq reads a connect_timeout below 2 as 2."""
DEFAULT_MAX_CONNECTIONS: Final = 4
"""A tick, a write-back, a lease keeper beat and lease recovery may overlap."""

_AUTH_SQLSTATES: Final = frozenset({"28P01", "28000"})
# libpq reports authentication failures without a SQLSTATE psycopg can expose, so the
# messages are matched too (the server's English texts and libpq's own).
_AUTH_MESSAGE = re.compile(
    r"password authentication failed|no password supplied|authentication failed"
    r"|pg_hba\.conf|role \"[^\"]*\" does not exist|not permitted to log in",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """Why the last connection attempt failed, as safe to log text."""

    kind: FailureKind
    message: str


class ConnectTracker:
    """Remembers the last connection failure until a connection succeeds.

    Written by pool workers, read by ticks: single attribute stores, safe under the GIL.
    """

    def __init__(self) -> None:
        self.last: ConnectFailure | None = None

    def failed(self, failure: ConnectFailure) -> None:
        self.last = failure

    def succeeded(self) -> None:
        self.last = None


def one_line(exc: BaseException) -> str:
    """An exception as one line of text: its message with whitespace collapsed."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def is_auth_failure(exc: BaseException) -> bool:
    """Whether a connection error means the server refused these credentials."""
    if getattr(exc, "sqlstate", None) in _AUTH_SQLSTATES:
        return True
    pgconn = getattr(exc, "pgconn", None)
    if pgconn is not None and getattr(pgconn, "needs_password", False):
        return True
    return bool(_AUTH_MESSAGE.search(str(exc)))


def describe(exc: BaseException) -> ConnectFailure:
    return ConnectFailure("credential" if is_auth_failure(exc) else "unreachable", one_line(exc))


class ConnectSettings:
    """The keyword arguments of one connection attempt, credential resolved afresh.

    Used as the pool's `kwargs` callable. Holds no password between calls.
    """

    def __init__(
        self, config: SubstrateConfig, resolver: CredentialResolver, tracker: ConnectTracker
    ) -> None:
        if config.credential is None or config.host is None:
            raise ValueError("ConnectSettings needs an enabled, validated SubstrateConfig")
        self.config = config
        self.tracker = tracker
        self._resolver = resolver
        self._credential: str = config.credential
        static: dict[str, Any] = {
            "host": config.host,
            "port": config.port,
            "connect_timeout": max(MIN_LIBPQ_CONNECT_TIMEOUT, math.ceil(config.connect_timeout)),
            # Shown in pg_stat_activity: which slot holds which connection.
            "application_name": f"substrate-intake {config.slot_id}"[:63],
            "autocommit": True,
        }
        if config.database is not None:
            static["dbname"] = config.database
        if config.user is not None:
            static["user"] = config.user
        if config.pgbouncer:
            # PgBouncer in transaction mode: server-side prepared statements would leak
            # between clients.
            static["prepare_threshold"] = None
        self._static = static

    def __call__(self) -> dict[str, Any]:
        try:
            secret = resolve(self._resolver, self._credential)
        except CredentialError as exc:
            self.tracker.failed(ConnectFailure("credential", one_line(exc)))
            raise
        params = dict(self._static)
        if secret is not None:
            params["password"] = secret.reveal()
        return params

    def __repr__(self) -> str:
        shown = {k: v for k, v in self._static.items() if k != "password"}
        return f"ConnectSettings({shown!r}, credential={self._credential!r})"


def connection_class(settings: ConnectSettings) -> type[psycopg.Connection[Any]]:
    """A `psycopg.Connection` whose `connect` retries once on an authentication failure
    with a freshly resolved password, records failures and strips secrets from errors."""

    class IntakeConnection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            failure: ConnectFailure | None = None
            try:
                conn = super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                failure = describe(exc)
            if failure is not None and failure.kind == "credential":
                # The password may have rotated since it was resolved: resolve, retry once.
                retry = {**kwargs, **settings()}
                try:
                    conn = super().connect(conninfo, **retry)
                    failure = None
                except psycopg.Error as exc:
                    failure = describe(exc)
            if failure is not None:
                settings.tracker.failed(failure)
                raise psycopg.OperationalError(failure.message)
            settings.tracker.succeeded()
            return conn

    return IntakeConnection


def async_connection_class(settings: ConnectSettings) -> type[psycopg.AsyncConnection[Any]]:
    """The asyncio twin of `connection_class`."""

    class AsyncIntakeConnection(psycopg.AsyncConnection[Any]):
        @classmethod
        async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
            failure: ConnectFailure | None = None
            try:
                conn = await super().connect(conninfo, **kwargs)
            except psycopg.Error as exc:
                failure = describe(exc)
            if failure is not None and failure.kind == "credential":
                retry = {**kwargs, **settings()}
                try:
                    conn = await super().connect(conninfo, **retry)
                    failure = None
                except psycopg.Error as exc:
                    failure = describe(exc)
            if failure is not None:
                settings.tracker.failed(failure)
                raise psycopg.OperationalError(failure.message)
            settings.tracker.succeeded()
            return conn

    return AsyncIntakeConnection


POOL_NAME_PREFIX: Final = "substrate-intake:"


class _DemotePoolChatter(logging.Filter):
    """Demotes the intake pools' own records to DEBUG.

    psycopg_pool logs every connection request and return at INFO, and every failed
    connect twice at WARNING. For the intake's pools (named `substrate-intake:<slot>`)
    these records become DEBUG: an idle tick then logs nothing at INFO or above, as the
    log contract promises, and a failure is told once, by the contract's own line, which
    carries the same cause (see `ConnectTracker`). Records of other pools, and records
    above WARNING, are left alone.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.WARNING and _about_our_pool(record):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _about_our_pool(record: logging.LogRecord) -> bool:
    """Whether a psycopg_pool record concerns an intake pool: it names the pool, or it
    was logged by one of the pool's workers (threads, or asyncio tasks, named after it;
    filters run in the logging caller's context, so the current task is the worker)."""
    if isinstance(record.args, tuple) and any(
        isinstance(a, str) and a.startswith(POOL_NAME_PREFIX) for a in record.args
    ):
        return True
    if (record.threadName or "").startswith(POOL_NAME_PREFIX):
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        return False
    return task is not None and task.get_name().startswith(POOL_NAME_PREFIX)


_POOL_FILTER: Final = _DemotePoolChatter()


def _install_pool_filter() -> None:
    pool_logger = logging.getLogger("psycopg.pool")
    if _POOL_FILTER not in pool_logger.filters:
        pool_logger.addFilter(_POOL_FILTER)


def _pool_options(settings: ConnectSettings, max_size: int) -> dict[str, Any]:
    _install_pool_filter()
    return {
        "kwargs": settings,
        "min_size": 0,
        "max_size": max_size,
        "timeout": settings.config.connect_timeout,
        "reconnect_timeout": 0.0,
        "name": f"{POOL_NAME_PREFIX}{settings.config.slot_id}",
        "num_workers": 2,
    }


def open_pool(
    settings: ConnectSettings, max_size: int = DEFAULT_MAX_CONNECTIONS
) -> psycopg_pool.ConnectionPool[Any]:
    """A pool for the intake; opening it connects nothing (connections come on demand)."""
    return psycopg_pool.ConnectionPool(
        "",
        connection_class=connection_class(settings),
        # A pooled connection is checked before use, so a write-back after a database
        # restart does not fail on a dead connection and leave its job to lease recovery.
        check=psycopg_pool.ConnectionPool.check_connection,
        open=True,
        **_pool_options(settings, max_size),
    )


async def open_async_pool(
    settings: ConnectSettings, max_size: int = DEFAULT_MAX_CONNECTIONS
) -> psycopg_pool.AsyncConnectionPool[Any]:
    """The asyncio twin of `open_pool`."""
    pool = psycopg_pool.AsyncConnectionPool(
        "",
        connection_class=async_connection_class(settings),
        check=psycopg_pool.AsyncConnectionPool.check_connection,
        open=False,
        **_pool_options(settings, max_size),
    )
    await pool.open()
    return pool
