"""The `substrate-db` command line: one module per command group, gathered here."""

from __future__ import annotations

import sys

import click

from .. import Substrate, SubstrateError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Operate a substrate-db job substrate."""


@cli.command()
@click.option(
    "--dsn", envvar="SUBSTRATE_DSN", default="", help="libpq conninfo (key=value or URI)."
)
@click.option("--schema", default="substrate", show_default=True, help="Postgres schema.")
def migrate(dsn: str, schema: str) -> None:
    """Apply pending migrations."""
    try:
        with Substrate.connect(dsn, schema=schema, timeout=10) as client:
            applied = client.migrate()
    except SubstrateError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))


def main() -> None:
    """Console-script entry point."""
    cli()
