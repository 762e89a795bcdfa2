"""`SubstrateConfig`: how an agent runtime's slot reaches the substrate.

A frozen pydantic model. `SubstrateConfig()` is valid and disabled, so a runtime that
never sets anything sees no change at all. Enabled, it needs a credential id (never a
password), the kinds to claim, the slot id and an explicit host: there is no default
host, so a misconfigured development slot can never reach a production database.

Keys are accepted in snake_case and in camelCase (`slotId`, `leaseSecs`,
`isLeaseRecoveryOwner`, ...); unknown keys are refused. Errors name the field and the
bad value, except for the credential, whose value is never echoed (a password put there
by mistake must not end up in a log). Pydantic's own echo of inputs is switched off for
the same reason: an unknown key such as `password` is reported by name only.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .. import core
from ..client import DEFAULT_SCHEMA
from ..errors import InvalidArgument

DEFAULT_LEASE_SECS: Final = 300
DEFAULT_PORT: Final = 5432
DEFAULT_RECOVERY_CADENCE_SECS: Final = 60
DEFAULT_CONNECT_TIMEOUT: Final = 5.0
"""Seconds a tick waits for a connection before it gives up with `db-unreachable`."""
MAX_CONNECT_TIMEOUT: Final = 600.0

HOST_CONFIG_BLOCK: Final = "substrate"
"""The key of the block `from_host_config` reads from a runtime's host config file."""

_CREDENTIAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


class SubstrateConfig(BaseModel):
    """The intake settings of one slot. See the module docstring for the rules.

    The block is read as a whole: a runtime whose host configs extend a base config by
    merging top-level keys (a shallow merge) replaces the base's `substrate` block with
    the slot's, so a slot that overrides one field must repeat the whole block.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        hide_input_in_errors=True,
    )

    enabled: bool = False
    """Off by default: a disabled intake never touches the network."""
    credential: str | None = None
    """A credential id, resolved to a password when a connection opens; never a password."""
    kinds: tuple[str, ...] = ()
    """The job kinds this slot claims."""
    slot_id: str | None = None
    """Who claims: stored in `jobs.claimed_by` and shown in the log lines."""
    lease_secs: int = DEFAULT_LEASE_SECS
    """The lease of a claim; a `LeaseKeeper` renews it every lease_secs / 3."""
    host: str | None = None
    """A hostname, an IP address, or a unix socket directory, as in libpq. No default."""
    port: int = DEFAULT_PORT
    database: str | None = None
    """None: libpq's default (PGDATABASE, then the user name)."""
    user: str | None = None
    """None: libpq's default (PGUSER, then the OS user)."""
    is_lease_recovery_owner: bool = False
    """Whether this slot releases expired leases (any number may; one runs at a time)."""
    lease_recovery_cadence_secs: int = DEFAULT_RECOVERY_CADENCE_SECS
    """`lease_recovery_tick()` does its work at most once per this many seconds."""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds a tick waits for a connection to an unreachable database."""
    schema_name: str = DEFAULT_SCHEMA
    """The Postgres schema holding the substrate's tables."""
    pgbouncer: bool = False
    """Behind PgBouncer in transaction mode: no server-side prepared statements."""

    # -- field checks: each message names the field and the bad value -------------------

    @field_validator("enabled", "is_lease_recovery_owner", "pgbouncer", mode="before")
    @classmethod
    def _bool(cls, value: object, info: ValidationInfo) -> bool:
        if not isinstance(value, bool):
            raise InvalidArgument(str(info.field_name), value, "true or false")
        return value

    @field_validator("credential", mode="before")
    @classmethod
    def _credential(cls, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not _CREDENTIAL_ID.fullmatch(value):
            # Never echo the value: it may be a password pasted into the wrong field.
            shape = f"a str of length {len(value)}" if isinstance(value, str) else "a non-str"
            raise ValueError(
                "expected credential to be a credential id (a letter or digit, then letters, "
                f"digits, '_', '.' or '-', at most 200), never a password; got {shape} "
                "(value not shown)"
            )
        return value

    @field_validator("kinds", mode="before")
    @classmethod
    def _kinds(cls, value: object) -> tuple[str, ...]:
        if isinstance(value, list | tuple) and not value:
            return ()
        return tuple(core.check_kinds(value))

    @field_validator("slot_id", mode="before")
    @classmethod
    def _slot_id(cls, value: object) -> str | None:
        return core.check_optional_name("slot_id", value)

    @field_validator("lease_secs", mode="before")
    @classmethod
    def _lease_secs(cls, value: object) -> int:
        return core.check_int("lease_secs", value, 1, core.MAX_LEASE_SECS)

    @field_validator("lease_recovery_cadence_secs", mode="before")
    @classmethod
    def _cadence(cls, value: object) -> int:
        return core.check_int("lease_recovery_cadence_secs", value, 1, core.INT_MAX)

    @field_validator("port", mode="before")
    @classmethod
    def _port(cls, value: object) -> int:
        return core.check_int("port", value, 1, 65535)

    @field_validator("host", "database", "user", mode="before")
    @classmethod
    def _optional_text(cls, value: object, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or "\x00" in value or len(value) > 1000:
            raise InvalidArgument(str(info.field_name), value, "a string")
        return value.strip()

    @field_validator("connect_timeout", mode="before")
    @classmethod
    def _connect_timeout(cls, value: object) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= MAX_CONNECT_TIMEOUT
        ):
            raise InvalidArgument(
                "connect_timeout", value, f"a number of seconds > 0 and <= {MAX_CONNECT_TIMEOUT:g}"
            )
        return float(value)

    @field_validator("schema_name", mode="before")
    @classmethod
    def _schema_name(cls, value: object) -> str:
        try:
            return core.check_schema(value)
        except InvalidArgument as exc:
            raise InvalidArgument("schema_name", value, exc.expected) from None

    @model_validator(mode="after")
    def _required_when_enabled(self) -> SubstrateConfig:
        if not self.enabled:
            return self
        missing = [
            f"{name} (got: {shown})"
            for name, bad, shown in (
                ("credential", self.credential is None, "None"),
                ("kinds", not self.kinds, repr(list(self.kinds))),
                ("slot_id", self.slot_id is None, "None"),
                ("host", not self.host, repr(self.host)),
            )
            if bad
        ]
        if missing:
            raise ValueError(
                "an enabled substrate intake needs " + ", ".join(missing) + "; host has no "
                "default on purpose: set it to a hostname, an IP address or a unix socket "
                "directory"
            )
        return self

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def from_host_config(cls, path: str | os.PathLike[str]) -> SubstrateConfig:
        """Read the `substrate` block of a runtime's host config JSON file.

        A file without the block gives the disabled default. The block is taken as it
        is, never merged with anything (see the class docstring about shallow merges).
        """
        file = Path(path)
        try:
            document = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            # The message gives the position only, never the content.
            raise ValueError(
                f"host config {str(file)!r} is not valid JSON: {exc.msg} at line {exc.lineno} "
                f"column {exc.colno}"
            ) from None
        return cls.from_host_mapping(document, source=str(file))

    @classmethod
    def from_host_mapping(cls, document: object, *, source: str = "host config") -> SubstrateConfig:
        """Like `from_host_config`, for a host config already parsed."""
        if not isinstance(document, Mapping):
            raise ValueError(
                f"expected {source!r} to hold a JSON object, got: {type(document).__name__}"
            )
        block = document.get(HOST_CONFIG_BLOCK)
        if block is None:
            return cls()
        if not isinstance(block, Mapping):
            raise ValueError(
                f"expected the {HOST_CONFIG_BLOCK!r} block of {source!r} to be a JSON object, "
                f"got: {type(block).__name__}"
            )
        return cls.model_validate(dict(block))
