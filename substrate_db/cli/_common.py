"""What every command shares: where to connect, errors and exit codes, output.

Exit codes are a contract scripts rely on: 0 success, 1 the operation failed (a database
error, a job that does not exist or is in the wrong state), 2 the command was used wrong
(click's usage errors and every bad value, caught before the database is touched).
Errors are one line on stderr, never a traceback (`SUBSTRATE_DEBUG=1` shows it).

`--json` prints exactly one JSON document on stdout; logs and progress go to stderr.
Commands that loop (`--every`, `--watch`) print one document per line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
import psycopg
from pydantic import BaseModel

from .. import Substrate
from .._queries import Rendered
from ..errors import SubstrateError

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_SCHEMA = "substrate"
CONNECT_TIMEOUT = 5
"""Seconds a command waits for a connection before it reports the database unreachable."""

# libpq's own variables: when one is set, an empty conninfo means "ask libpq".
_LIBPQ_ENV = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")

log = logging.getLogger("substrate_db.cli")


# -- errors -------------------------------------------------------------------------------


class Failed(click.ClickException):
    """The operation failed (exit 1)."""

    exit_code = 1


class UserError(click.ClickException):
    """The command was used wrong (exit 2), like click's own usage errors."""

    exit_code = 2


def one_line(text: object) -> str:
    """Collapse a message to one line: errors are single lines on stderr."""
    return " ".join(str(text).split()) or "unknown error"


def translate(exc: BaseException) -> click.ClickException | None:
    """The CLI error for an exception escaping a command, or None to let it through."""
    if isinstance(exc, click.ClickException | click.exceptions.Exit | click.Abort):
        return None
    if isinstance(exc, SubstrateError) and isinstance(exc, ValueError):
        return UserError(one_line(exc))
    if isinstance(exc, SubstrateError):
        return Failed(one_line(exc))
    if isinstance(exc, psycopg.Error):
        # Raised outside the client's translation (a listener connection, a pre-flight).
        return Failed(one_line(exc))
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return None
    if isinstance(exc, Exception):
        if os.environ.get("SUBSTRATE_DEBUG"):
            return None
        return Failed(
            f"internal error: {type(exc).__name__}: {one_line(exc)} "
            "(set SUBSTRATE_DEBUG=1 for the traceback)"
        )
    return None


class SubstrateGroup(click.Group):
    """A click group that turns escaping errors into one line and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BaseException as exc:
            mapped = translate(exc)
            if mapped is None:
                raise
            raise mapped from None


# -- where to connect ---------------------------------------------------------------------


@dataclass
class Target:
    """A resolved database to connect to. `kwargs` may carry a secret: never print it."""

    conninfo: str
    source: str
    """Where it came from: --dsn, SUBSTRATE_DSN, --config, libpq environment, embedded."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    schema: str = DEFAULT_SCHEMA
    pgbouncer: bool = False
    listen: bool = True
    """Whether LISTEN works there (not behind PgBouncer in transaction mode)."""
    kwargs_factory: Callable[[], dict[str, Any]] | None = None
    """Builds `kwargs` afresh (a credential resolved again) for long-lived pools."""


@dataclass
class Settings:
    """Connection settings given on the group, shared by its commands."""

    dsn: str | None = None
    dsn_from_env: bool = False
    config: str | None = None
    schema: str = DEFAULT_SCHEMA
    schema_given: bool = False
    """--schema or SUBSTRATE_SCHEMA was set (else a --config's own schema applies)."""
    pgbouncer: bool = False


def settings(ctx: click.Context) -> Settings:
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        root.obj = Settings()
    return root.obj


@dataclass(frozen=True, slots=True)
class ConnectionArgs:
    """A command's own `--dsn`, `--config`, `--schema` and `--pgbouncer` (None: not given)."""

    dsn: str | None = None
    config_path: str | None = None
    schema: str | None = None
    pgbouncer: bool | None = None


def connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """`--dsn`, `--config`, `--schema` and `--pgbouncer` on a command, handed to it as one
    `conn: ConnectionArgs` argument for `resolve_target`. Given on a command they override
    the group's; unset, the group's (or their environment variables) apply."""

    @functools.wraps(f)
    def command(
        *args: Any,
        dsn: str | None,
        config_path: str | None,
        schema: str | None,
        pgbouncer: bool | None,
        **kwargs: Any,
    ) -> Any:
        return f(*args, conn=ConnectionArgs(dsn, config_path, schema, pgbouncer), **kwargs)

    wrapped: Callable[..., Any] = click.option(
        "--pgbouncer",
        is_flag=True,
        default=None,
        help="The DSN goes through PgBouncer in transaction mode: no prepared statements, "
        "no LISTEN (workers poll).",
    )(command)
    wrapped = click.option("--schema", default=None, metavar="NAME", help="Postgres schema.")(
        wrapped
    )
    wrapped = click.option(
        "--config",
        "config_path",
        default=None,
        metavar="HOST.JSON",
        type=click.Path(dir_okay=False),
        help="A runtime host config with a `substrate` block (its credential is resolved).",
    )(wrapped)
    return click.option("--dsn", default=None, metavar="CONNINFO", help="libpq conninfo or URI.")(
        wrapped
    )


def resolve_target(ctx: click.Context, conn: ConnectionArgs) -> Target:
    """Command options, then the group's, then SUBSTRATE_DSN, then libpq's environment,
    then the embedded server."""
    dsn, config_path, schema, pgbouncer = conn.dsn, conn.config_path, conn.schema, conn.pgbouncer
    group = settings(ctx)
    if dsn is not None and config_path is not None:
        raise UserError("give --dsn or --config, not both")
    explicit_schema = schema or (group.schema if group.schema_given else None)
    chosen_schema = explicit_schema or group.schema
    bouncer = group.pgbouncer if pgbouncer is None else pgbouncer
    if dsn is None and config_path is None:
        dsn, config_path = group.dsn, group.config
        if dsn is not None and config_path is not None and not group.dsn_from_env:
            raise UserError("give --dsn or --config, not both")
        if dsn is not None and config_path is not None:
            dsn = None  # an explicit --config beats SUBSTRATE_DSN from the environment
    if config_path is not None:
        return _config_target(config_path, explicit_schema, bouncer)
    if dsn is not None:
        _check_conninfo(dsn)
        source = "SUBSTRATE_DSN" if group.dsn_from_env and dsn == group.dsn else "--dsn"
        return Target(dsn, source, schema=chosen_schema, pgbouncer=bouncer, listen=not bouncer)
    if any(os.environ.get(v) for v in _LIBPQ_ENV):
        return Target(
            "", "libpq environment", schema=chosen_schema, pgbouncer=bouncer, listen=not bouncer
        )
    from .. import embedded

    conninfo = embedded.ensure_running(progress=lambda msg: click.echo(msg, err=True))
    return Target(conninfo, "embedded", schema=chosen_schema)


def _check_conninfo(dsn: str) -> None:
    """Refuse a malformed conninfo without echoing it: it may hold a password."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise UserError(
            "--dsn / SUBSTRATE_DSN is not a libpq conninfo (key=value pairs or a "
            "postgresql:// URI); its text is not shown as it may hold a password"
        ) from None


def _config_target(path: str, schema: str | None, pgbouncer: bool) -> Target:
    """A target from a runtime's host config: the intake's own `SubstrateConfig` and its
    credential chain (environment variable, credentials directory, libpq passfile). The
    password is resolved for each new connection, so a rotated one needs no restart."""
    from ..intake import SubstrateConfig, default_resolver
    from ..intake.credentials import resolve

    if not Path(path).is_file():
        raise UserError(f"--config: no such file: {path}")
    try:
        config = SubstrateConfig.from_host_config(path)
    except (ValueError, OSError) as exc:
        raise UserError(f"--config {path}: {one_line(exc)}") from None
    if config.host is None:
        raise UserError(f"--config {path}: the `substrate` block has no host")
    static: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "connect_timeout": max(1, round(config.connect_timeout)),
        "application_name": "substrate-db cli",
    }
    if config.database is not None:
        static["dbname"] = config.database
    if config.user is not None:
        static["user"] = config.user
    resolver = default_resolver()
    credential = config.credential

    def connect_kwargs() -> dict[str, Any]:
        params = dict(static)
        if credential is not None:
            secret = resolve(resolver, credential)
            if secret is not None:
                params["password"] = secret.reveal()
        return params

    try:
        kwargs = connect_kwargs()
    except SubstrateError as exc:  # CredentialError: says which credential, never its value
        raise Failed(f"--config {path}: {one_line(exc)}") from None
    bouncer = pgbouncer or config.pgbouncer
    return Target(
        "",
        f"--config {path}",
        kwargs=kwargs,
        kwargs_factory=connect_kwargs,
        schema=schema or config.schema_name,
        pgbouncer=bouncer,
        listen=not bouncer,
    )


def preflight(target: Target, timeout: float = CONNECT_TIMEOUT, *, service: bool = False) -> None:
    """One direct connection before a pool is built, so an unreachable database or a bad
    password is reported at once with libpq's own words (a pool would retry quietly until
    its timeout and then report only that it timed out). A one-shot command fails on it;
    a `service` (a worker, a loop with --every) logs it and starts anyway: its pool keeps
    retrying, so a database that comes up later is picked up without a restart."""
    kwargs = {"connect_timeout": max(1, round(timeout)), **target.kwargs}
    try:
        with psycopg.connect(target.conninfo, autocommit=True, **kwargs):
            pass
    except psycopg.Error as exc:
        message = f"cannot connect ({target.source}): {one_line(exc)}"
        if not service:
            raise Failed(message) from None
        log.warning("[substrate] %s; starting anyway, retrying in the background", message)


@contextlib.contextmanager
def open_client(target: Target, *, max_size: int = 1, service: bool = False) -> Iterator[Substrate]:
    """A `Substrate` for one command, on a small pool of its own (`service`: see
    `preflight`)."""
    preflight(target, service=service)
    kwargs = {"connect_timeout": CONNECT_TIMEOUT, **target.kwargs}
    with Substrate.connect(
        target.conninfo,
        schema=target.schema,
        pgbouncer=target.pgbouncer,
        min_size=1,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT * 2,
        kwargs=kwargs,
        name="substrate-cli",
    ) as client:
        yield client


# -- output -------------------------------------------------------------------------------


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def dumps(document: object) -> str:
    """One JSON document on one line (so looping commands print JSON lines)."""
    return json.dumps(document, default=_default, ensure_ascii=False, separators=(",", ":"))


def print_json(document: object) -> None:
    click.echo(dumps(document))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; None shows as '-'."""
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    lines = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def fmt_time(value: datetime | None) -> str:
    """A timestamp for humans: seconds precision, with its offset."""
    return "-" if value is None else value.isoformat(timespec="seconds")


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(f)


# -- loops that stop cleanly --------------------------------------------------------------


class GracefulStop:
    """SIGTERM and SIGINT ask a loop to stop after the pass in progress; a second one
    stops at once (KeyboardInterrupt). Handlers are restored on exit.

    The handler only sets a flag: a threading.Event set from a signal handler can
    deadlock on the Event's own lock if the signal lands while the main thread is inside
    Event.wait(), so `sleep` naps in short slices and checks the flag instead."""

    SLICE = 0.05

    def __init__(self) -> None:
        self.requested = False
        self._saved: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("%s received: finishing the pass in progress", signal.Signals(signum).name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def sleep(self, secs: float) -> bool:
        """Wait `secs` or until asked to stop; True when asked to stop."""
        deadline = time.monotonic() + secs
        while not self.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self.SLICE, left))
        return True


def every_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--every",
        type=click.FloatRange(min=0.1),
        default=None,
        metavar="SECS",
        help=help_text,
    )


def loop(every: float | None, one_pass: Callable[[], None]) -> None:
    """Run `one_pass` once, or every `every` seconds until SIGTERM/SIGINT (exit 0)."""
    if every is None:
        one_pass()
        return
    with GracefulStop() as stop:
        while True:
            one_pass()
            sys.stdout.flush()
            if stop.sleep(every):
                return


def parse_json_arg(name: str, text: str) -> Any:
    """A JSON value given inline, or `@path` to read it from a file (`@-`: stdin)."""
    source = text
    if text.startswith("@"):
        path = text[1:]
        try:
            source = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        return json.loads(source)
    except json.JSONDecodeError as exc:
        raise UserError(f"{name}: not valid JSON ({exc})") from None


def queries(client: Substrate) -> Mapping[str, Rendered]:
    """The named queries for the client's schema, to build feature plans with."""
    return client.queries
