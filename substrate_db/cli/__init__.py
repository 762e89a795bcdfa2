"""The `substrate-db` command line: one module per command group, gathered here.

Where each command connects: its own `--dsn`/`--config`, else the group's, else
`SUBSTRATE_DSN`, else libpq's `PG*` variables, else the embedded PostgreSQL (started on
first use, see `substrate_db.embedded`). See `_common` for exit codes and `--json`.
"""

from __future__ import annotations

import logging
import os
import sys

import click
from click.core import ParameterSource

from ._common import DEFAULT_SCHEMA, Settings, SubstrateGroup, settings

_EPILOG = """\b
Connecting: --dsn, SUBSTRATE_DSN, --config HOST.JSON, libpq's PG* variables, or else
an embedded PostgreSQL under $SUBSTRATE_HOME (started on first use).
\b
Exit codes: 0 success; 1 the operation failed (database error, job not found or in the
wrong state); 2 the command was used wrong. --json prints one JSON document on stdout.
"""


@click.group(
    cls=SubstrateGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=_EPILOG,
)
@click.option(
    "--dsn",
    envvar="SUBSTRATE_DSN",
    default=None,
    metavar="CONNINFO",
    help="libpq conninfo or URI [env: SUBSTRATE_DSN].",
)
@click.option(
    "--config",
    "config_path",
    envvar="SUBSTRATE_CONFIG",
    default=None,
    metavar="HOST.JSON",
    type=click.Path(dir_okay=False),
    help="A runtime host config with a `substrate` block [env: SUBSTRATE_CONFIG].",
)
@click.option(
    "--schema",
    envvar="SUBSTRATE_SCHEMA",
    default=DEFAULT_SCHEMA,
    show_default=True,
    metavar="NAME",
    help="Postgres schema [env: SUBSTRATE_SCHEMA].",
)
@click.option(
    "--pgbouncer",
    is_flag=True,
    default=False,
    help="Connect through PgBouncer in transaction mode (no prepared statements, no LISTEN).",
)
@click.option("-v", "--verbose", count=True, help="More log lines on stderr (-vv: debug).")
@click.version_option(package_name="substrate-db", prog_name="substrate-db")
@click.pass_context
def cli(
    ctx: click.Context,
    dsn: str | None,
    config_path: str | None,
    schema: str,
    pgbouncer: bool,
    verbose: int,
) -> None:
    """Operate a substrate-db job substrate: jobs, schedules, lease recovery, workers."""
    ctx.obj = Settings(
        dsn=dsn,
        dsn_from_env=ctx.get_parameter_source("dsn") == ParameterSource.ENVIRONMENT,
        config=config_path,
        schema=schema,
        schema_given=ctx.get_parameter_source("schema")
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT),
        pgbouncer=pgbouncer,
    )
    _setup_logging(verbose)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(verbose: int) -> None:
    """Log lines go to stderr, never stdout (which is for data). Quiet by default:
    warnings only; -v adds the library's info lines, -vv debug."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("substrate_db")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    # The pool reports its own retries; the CLI reports connection failures itself.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)


def _register() -> None:
    from . import agents, embedded, jobs, maintenance, migrate, schedule, stats, worker

    for module in (migrate, jobs, stats, maintenance, schedule, worker, agents, embedded):
        module.register(cli)


_register()


def main() -> None:
    """Console-script entry point."""
    if os.environ.get("SUBSTRATE_DEBUG"):
        logging.basicConfig(level=logging.DEBUG)
    cli(prog_name="substrate-db")


__all__ = ["cli", "main", "settings"]
