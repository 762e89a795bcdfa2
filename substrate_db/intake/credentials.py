"""Credentials: a credential id in the config, a password only in memory, only when needed.

A *resolver* turns a credential id into a password: any callable `(credential_id) ->
str | Secret | None`. None means "not found here": the next resolver of a chain is
asked, and at the end of the chain libpq's own mechanisms decide (the passfile
`PGPASSFILE` / `~/.pgpass`, a service file through `PGSERVICE`, or no password at all).
A resolver raises `CredentialError` when it found the credential but cannot use it (an
empty value, a file others can read): that is a configuration fault, never skipped.

The default chain, used when the runtime plugs in no resolver of its own:

1. the environment variable `SUBSTRATE_CREDENTIAL_<ID>` (the id upper-cased, every
   character other than a letter or a digit turned into `_`);
2. the file `<dir>/<id>`, where `<dir>` is `$SUBSTRATE_CREDENTIALS_DIR`, by default
   `~/.config/substrate-db/credentials`; a file readable by group or others is refused;
3. libpq's passfile or service file.

A password is held in a `Secret`, whose repr and str never show it, and is revealed
only to build the keyword arguments of one connection attempt.
"""

from __future__ import annotations

import hmac
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from ..errors import SubstrateError

ENV_PREFIX: Final = "SUBSTRATE_CREDENTIAL_"
DIR_ENV: Final = "SUBSTRATE_CREDENTIALS_DIR"
DEFAULT_DIR: Final = "~/.config/substrate-db/credentials"
_MASK: Final = "**********"


class CredentialError(SubstrateError):
    """A credential id could not be turned into a usable password (the message holds the
    id and where it looked, never a secret)."""


class Secret:
    """A password that does not show itself: repr, str and format print a mask.

    Call `reveal()` at the one place the plain text is needed. Two secrets compare equal
    when their values do (in constant time).
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"a Secret holds a str, got: {type(value).__name__}")
        self._value = value

    def reveal(self) -> str:
        """The plain text. Never log it, never put it in an exception."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_MASK!r})"

    def __str__(self) -> str:
        return _MASK

    def __format__(self, spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> str:
        # Pickling would copy the plain text into wherever the pickle goes.
        raise TypeError("a Secret cannot be pickled")


CredentialResolver = Callable[[str], str | Secret | None]
"""A callable from a credential id to a password (None: not found, ask the next one)."""


def env_var_name(credential_id: str, prefix: str = ENV_PREFIX) -> str:
    """`SUBSTRATE_CREDENTIAL_<ID>`: the id upper-cased, other characters as `_`."""
    return prefix + "".join(
        c if c.isascii() and c.isalnum() else "_" for c in credential_id.upper()
    )


class EnvCredentialResolver:
    """Reads `SUBSTRATE_CREDENTIAL_<ID>` (see `env_var_name`). Unset: not found."""

    def __init__(self, environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX):
        self._environ = os.environ if environ is None else environ
        self._prefix = prefix

    def __call__(self, credential_id: str) -> Secret | None:
        name = env_var_name(credential_id, self._prefix)
        value = self._environ.get(name)
        if value is None:
            return None
        if not value:
            raise CredentialError(
                f"credential {credential_id!r}: environment variable {name} is set but empty"
            )
        return Secret(value)

    def __repr__(self) -> str:
        return f"EnvCredentialResolver(prefix={self._prefix!r})"


class FileCredentialResolver:
    """Reads the file `<directory>/<credential id>`: one password, a trailing newline is
    dropped. A missing file is "not found"; a file readable or writable by group or
    others, a non-regular file or an empty one is refused with `CredentialError`."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self._directory = directory

    @property
    def directory(self) -> Path:
        """The directory read, resolved at each call (so `$SUBSTRATE_CREDENTIALS_DIR`
        may change while the process runs)."""
        raw = self._directory if self._directory is not None else os.environ.get(DIR_ENV)
        return Path(raw if raw else DEFAULT_DIR).expanduser()

    def __call__(self, credential_id: str) -> Secret | None:
        if not credential_id or "/" in credential_id or credential_id.startswith("."):
            raise CredentialError(f"credential {credential_id!r} cannot name a file")
        path = self.directory / credential_id
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CredentialError(
                f"credential {credential_id!r}: cannot open {str(path)!r}: {exc.strerror}"
            ) from None
        with os.fdopen(fd, "rb") as file:
            # Check the file that was opened, not the path: no window to swap it.
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CredentialError(f"credential {credential_id!r}: {str(path)!r} is not a file")
            if info.st_mode & 0o077:
                raise CredentialError(
                    f"credential {credential_id!r}: {str(path)!r} is accessible by group or "
                    f"others (mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600 on it"
                )
            raw = file.read()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialError(
                f"credential {credential_id!r}: {str(path)!r} is not UTF-8 text"
            ) from None
        value = value.removesuffix("\n").removesuffix("\r")
        if not value:
            raise CredentialError(f"credential {credential_id!r}: {str(path)!r} is empty")
        return Secret(value)

    def __repr__(self) -> str:
        return f"FileCredentialResolver(directory={str(self.directory)!r})"


class LibpqPassfileResolver:
    """Leaves the password to libpq: its passfile (`PGPASSFILE`, `~/.pgpass`) or a
    service file (`PGSERVICE`). Always "not found" here, so it ends a chain."""

    def __call__(self, credential_id: str) -> None:
        return None

    def __repr__(self) -> str:
        return "LibpqPassfileResolver()"


class ChainResolver:
    """Asks each resolver in turn; the first that finds the credential wins."""

    def __init__(self, resolvers: Sequence[CredentialResolver]) -> None:
        self.resolvers = tuple(resolvers)

    def __call__(self, credential_id: str) -> str | Secret | None:
        for resolver in self.resolvers:
            found = resolver(credential_id)
            if found is not None:
                return found
        return None

    def __repr__(self) -> str:
        return f"ChainResolver({list(self.resolvers)!r})"


def default_resolver() -> ChainResolver:
    """Environment variable, then credentials directory, then libpq's passfile."""
    return ChainResolver(
        [EnvCredentialResolver(), FileCredentialResolver(), LibpqPassfileResolver()]
    )


def resolve(resolver: CredentialResolver, credential_id: str) -> Secret | None:
    """Run a resolver and normalise its answer; any failure becomes `CredentialError`.

    The message of a resolver's own exception is kept (a resolver must not put secrets
    in its messages); its traceback is not chained, so nothing it held is carried on.
    """
    problem: str | None = None
    try:
        found = resolver(credential_id)
    except CredentialError:
        raise
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        raise CredentialError(f"credential {credential_id!r}: the resolver failed: {problem}")
    if found is None or isinstance(found, Secret):
        return found
    if isinstance(found, str):
        if not found:
            raise CredentialError(f"credential {credential_id!r}: the resolver returned ''")
        return Secret(found)
    raise CredentialError(
        f"credential {credential_id!r}: expected the resolver to return a str, a Secret or "
        f"None, got: {type(found).__name__}"
    )
