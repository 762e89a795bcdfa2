"""The exceptions substrate-db raises.

A lost race is not an exception: write-backs return a `WriteBackResult`. These classes
are for bad input (caught before the database is touched) and for faults.
"""

from __future__ import annotations

from typing import Any


class SubstrateError(Exception):
    """Base class of every error raised by substrate-db."""


class InvalidArgument(SubstrateError, ValueError):
    """An argument was refused before anything was sent to the database."""

    def __init__(self, field: str, value: Any, expected: str) -> None:
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"expected {field} to be {expected}, got: {_show(value)}")


class ResultTooLarge(InvalidArgument):
    """A result was over `max_result_bytes`; the job was failed with that reason.

    `results` holds the write-back results of the whole call, in input order (for the
    oversized jobs, the result of failing them).
    """

    def __init__(self, field: str, size: int, limit: int, results: list[Any]) -> None:
        super().__init__(field, f"<{size} bytes of JSON>", f"at most {limit} bytes of JSON")
        self.args = (f"{self.args[0]}; the job was failed with this reason",)
        self.size = size
        self.limit = limit
        self.results = results


class DatabaseError(SubstrateError):
    """The database raised an error; the driver's exception is the `__cause__`."""

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        self.sqlstate = sqlstate
        super().__init__(message)


class ConnectionFailed(DatabaseError):
    """No connection to the database could be made or kept."""


class SchemaNotMigrated(DatabaseError):
    """The substrate tables are missing: run `substrate-db migrate` (or `migrate()`)."""


class MigrationError(SubstrateError):
    """A migration could not be applied."""


class MigrationChecksumMismatch(MigrationError):
    """An applied migration file was changed after it was applied."""


def _show(value: Any, limit: int = 120) -> str:
    """repr() the bad value, shortened so a huge payload cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
