"""The CLI's default database: a long-lived PostgreSQL under the user's data directory.

When `substrate-db` is given no DSN (no `--dsn`, `SUBSTRATE_DSN`, `--config` or `PG*`
variable), it uses this server: started on first use, reused by later runs (attaching
costs a read of `postmaster.pid` and a `stat` of the socket: milliseconds), stopped by
`substrate-db embedded stop`. It listens on a unix socket only, in a directory only its
owner can enter, with trust authentication: whoever can reach the socket is the owner.
It keeps PostgreSQL's durable defaults (fsync on): it holds real work, unlike the
test server.

Where it lives (`SUBSTRATE_HOME` moves it):

- a normal user: `$XDG_DATA_HOME/substrate-db`, else `~/.local/share/substrate-db`
  (mode 0700);
- root: `/var/lib/substrate-db` (mode 0755, owned by root). PostgreSQL refuses to run
  as root, so the server runs as an unprivileged account (`postgres`, else `nobody`, as
  for the test server), which owns `pg/` below; root's own home (`/root`, mode 0700)
  would be unreachable for that account, which is why root does not default to it. A
  `SUBSTRATE_HOME` the account cannot reach is refused with a message saying so.

Layout: `<home>/embedded.lock` (serialises start and stop), `<home>/pg/data` (the
cluster), `<home>/pg/startup.log` (the server's output until its logger starts), logs
in `<home>/pg/data/log/` (one file per weekday, overwritten a week later), the socket
`<home>/pg/.s.PGSQL.5432` (or, when that path is too long for a unix socket, in
`/tmp/substrate-db-<uid>-<hash>`, mode 0700), and as root possibly `<home>/pgbin-*`, a
copy of the binaries the account can read.

Binaries, the account and the copy come from `substrate_db.testing._server`, so the
test server and this one find the same PostgreSQL the same way. Unlike the test server,
this one gets no parent-death signal and no reaper: it must outlive the command that
started it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from psycopg.conninfo import make_conninfo

from .errors import SubstrateError
from .testing._server import (
    PostgresNotFound,
    PostgresStartError,
    ServerAccount,
    find_pg_bindir,
    prepare_bindir_for,
    server_account,
)

HOME_ENV: Final = "SUBSTRATE_HOME"
ROOT_HOME: Final = Path("/var/lib/substrate-db")
"""The default home when running as root (see the module docstring)."""
PORT: Final = 5432
"""Names the socket file only: nothing listens on TCP."""
START_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 30.0
"""Seconds a fast shutdown gets before an immediate shutdown (then SIGKILL)."""
_MAX_SOCKET_PATH: Final = 103
_USER: Final = "postgres"
"""The superuser role initdb creates (the same name as the test server's)."""

# Servers this process started, by pid, so stop() can reap them (no zombie left behind
# in a long-lived process such as a test run or the demo).
_children: dict[int, subprocess.Popen[bytes]] = {}


class EmbeddedError(SubstrateError):
    """The embedded server could not be set up, started or stopped."""


@dataclasses.dataclass(frozen=True)
class EmbeddedStatus:
    """Where the embedded server lives and whether it runs."""

    home: str
    data_dir: str
    socket_dir: str
    initialized: bool
    running: bool
    pid: int | None
    conninfo: str
    url: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def default_home() -> Path:
    """`$SUBSTRATE_HOME`, else root's `/var/lib/substrate-db`, else the XDG data dir."""
    env = os.environ.get(HOME_ENV)
    if env:
        return Path(env).expanduser().absolute()
    if os.geteuid() == 0:
        return ROOT_HOME
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "substrate-db"


class EmbeddedServer:
    """The embedded server of one home directory. Cheap to build: touches nothing."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home).absolute() if home is not None else default_home()
        self.pg_dir = self.home / "pg"
        self.data_dir = self.pg_dir / "data"
        self.socket_dir = self._socket_dir()

    def _socket_dir(self) -> Path:
        if len(os.fsencode(self.pg_dir / f".s.PGSQL.{PORT}")) <= _MAX_SOCKET_PATH:
            return self.pg_dir
        digest = hashlib.sha256(os.fsencode(self.home)).hexdigest()[:10]
        return Path("/tmp") / f"substrate-db-{os.geteuid()}-{digest}"

    # -- where to connect ------------------------------------------------------------------

    @property
    def conninfo(self) -> str:
        return make_conninfo(host=str(self.socket_dir), port=PORT, user=_USER, dbname="postgres")

    @property
    def url(self) -> str:
        # libpq takes a socket directory as the `host` query parameter of a URI.
        return f"postgresql:///postgres?host={self.socket_dir}&port={PORT}&user={_USER}"

    # -- state -----------------------------------------------------------------------------

    def _postmaster(self) -> tuple[int, list[str]] | None:
        """The live postmaster of our data dir (pid and postmaster.pid lines), or None.
        A pid file left by a crash may name a pid reused since by another process; the
        postmaster's working directory is its data dir, which tells them apart."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        with contextlib.suppress(OSError):
            if os.path.realpath(f"/proc/{pid}/cwd") != os.path.realpath(self.data_dir):
                return None
        return pid, lines

    def _ready(self) -> int | None:
        found = self._postmaster()
        if found is None:
            return None
        pid, lines = found
        ready = len(lines) >= 8 and lines[7].strip() == "ready"
        return pid if ready and (self.socket_dir / f".s.PGSQL.{PORT}").exists() else None

    def status(self) -> EmbeddedStatus:
        """Read-only: never starts or creates anything."""
        pid = self._ready()
        return EmbeddedStatus(
            home=str(self.home),
            data_dir=str(self.data_dir),
            socket_dir=str(self.socket_dir),
            initialized=(self.data_dir / "PG_VERSION").exists(),
            running=pid is not None,
            pid=pid,
            conninfo=self.conninfo,
            url=self.url,
        )

    # -- start and stop --------------------------------------------------------------------

    def ensure_running(self, progress: Callable[[str], None] | None = None) -> str:
        """Attach to the running server, or set it up and start it; return its conninfo."""
        if self._ready() is not None:
            return self.conninfo  # the fast path: no lock, no binaries, no subprocess
        say = progress or (lambda _msg: None)
        with self._locked():
            if self._ready() is None:
                self._start(say)
        return self.conninfo

    def stop(self) -> bool:
        """Fast shutdown; True when a server was running. Waits until it has exited."""
        with self._locked():
            found = self._postmaster()
            if found is None:
                return False
            pid = found[0]
            for sig, grace in (
                (signal.SIGINT, STOP_TIMEOUT),
                (signal.SIGQUIT, 5.0),
                (signal.SIGKILL, 5.0),
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_gone(pid, grace):
                    break
            child = _children.pop(pid, None)
            if child is not None:
                child.wait()
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._make_home()
        with open(self.home / "embedded.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _make_home(self) -> None:
        root = os.geteuid() == 0
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o755 if root else 0o700)
        except OSError as exc:
            raise EmbeddedError(
                f"cannot create the embedded server's home {self.home}: {exc.strerror or exc}; "
                f"set {HOME_ENV} to a directory you can write"
            ) from None

    def _account(self) -> ServerAccount | None:
        """As root, the account owning pg/ (a later `useradd postgres` must not orphan an
        existing cluster), else the test server's choice."""
        if os.geteuid() != 0:
            return None
        with contextlib.suppress(OSError):
            st = self.pg_dir.stat()
            if st.st_uid != 0:
                import pwd

                with contextlib.suppress(KeyError):
                    return ServerAccount(pwd.getpwuid(st.st_uid).pw_name, st.st_uid, st.st_gid)
        return server_account()

    def _start(self, say: Callable[[str], None]) -> None:
        try:
            account = self._account()
            bindir = prepare_bindir_for(find_pg_bindir(), account, cache_root=self.home)
        except (PostgresNotFound, PostgresStartError, OSError) as exc:
            raise EmbeddedError(str(exc)) from None
        self._prepare_dirs(account)
        if not (self.data_dir / "PG_VERSION").exists():
            say(f"initialising the embedded PostgreSQL in {self.data_dir} (first use)")
            self._initdb(bindir, account)
        stale = self.data_dir / "postmaster.pid"
        if stale.exists() and self._postmaster() is None:
            # Left by a crash, naming a pid that is gone or no longer ours. PostgreSQL
            # would refuse to start if that pid now belongs to another live process.
            stale.unlink(missing_ok=True)
        say(f"starting the embedded PostgreSQL ({self.data_dir})")
        self._launch(bindir, account)

    def _prepare_dirs(self, account: ServerAccount | None) -> None:
        dirs = [self.pg_dir] if self.socket_dir == self.pg_dir else [self.pg_dir, self.socket_dir]
        for d in dirs:
            d.mkdir(mode=0o700, exist_ok=True)
            if account is not None:
                os.chown(d, account.uid, account.gid)
            st = d.lstat()
            expected = account.uid if account is not None else os.geteuid()
            if d.is_symlink() or st.st_uid != expected or st.st_mode & 0o077:
                raise EmbeddedError(
                    f"{d} must be a directory owned by uid {expected} with mode 0700 "
                    "(it holds the database and its socket); fix or remove it"
                )
        if account is not None and not _reachable(self.pg_dir, account):
            raise EmbeddedError(
                f"the account {account.name!r} that runs PostgreSQL for root cannot reach "
                f"{self.pg_dir} (a parent directory is closed to it, as /root is); set "
                f"{HOME_ENV} elsewhere, e.g. {ROOT_HOME} (the default for root)"
            )

    def _run_as(self, account: ServerAccount | None) -> dict[str, object]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
        env |= {"LC_ALL": "C", "LANG": "C"}
        options: dict[str, object] = {
            "env": env,
            "cwd": str(self.pg_dir),
            "stdin": subprocess.DEVNULL,
        }
        if account is not None:
            options |= account.subprocess_options()
        return options

    def _initdb(self, bindir: Path, account: ServerAccount | None) -> None:
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "--no-locale",
            "-E",
            "UTF8",
            "-A",
            "trust",
            "-U",
            _USER,
        ]
        done = subprocess.run(
            argv, capture_output=True, timeout=START_TIMEOUT, check=False, **self._run_as(account)
        )  # type: ignore[call-overload]
        if done.returncode != 0:
            tail = (done.stderr or done.stdout or b"").decode(errors="replace").strip()
            raise EmbeddedError(f"initdb failed (exit {done.returncode}): {_last_lines(tail)}")

    def _launch(self, bindir: Path, account: ServerAccount | None) -> None:
        settings = {
            "listen_addresses": "",
            "unix_socket_directories": str(self.socket_dir),
            "unix_socket_permissions": "0700",
            "port": str(PORT),
            # Its own log files, rotated daily and overwritten after a week, so a server
            # that runs for months does not fill the disk with one growing file.
            "logging_collector": "on",
            "log_directory": "log",
            "log_filename": "postgresql-%a.log",
            "log_truncate_on_rotation": "on",
            "log_rotation_age": "1d",
            "log_rotation_size": "0",
        }
        argv = [str(bindir / "postgres"), "-D", str(self.data_dir)]
        argv += [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        log_path = self.pg_dir / "startup.log"
        with open(log_path, "wb") as log:
            if account is not None:
                os.chown(log_path, account.uid, account.gid)
            # Its own session: the terminal's Ctrl-C (or a kill of the CLI's process
            # group) must not reach a server meant to outlive this command.
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._run_as(account),
            )  # type: ignore[call-overload]
        _children[proc.pid] = proc
        deadline = time.monotonic() + START_TIMEOUT
        while self._ready() is None:
            code = proc.poll()
            if code is not None:
                _children.pop(proc.pid, None)
                raise EmbeddedError(
                    f"the embedded PostgreSQL exited with code {code} while starting: "
                    f"{_last_lines(_read(log_path))} (log: {log_path})"
                )
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"the embedded PostgreSQL was not ready within {START_TIMEOUT:g} s "
                    f"(log: {log_path})"
                )
            time.sleep(0.01)


def ensure_running(
    home: Path | str | None = None, progress: Callable[[str], None] | None = None
) -> str:
    """The conninfo of the embedded server of `home` (default: `default_home()`),
    started first if needed."""
    return EmbeddedServer(home).ensure_running(progress)


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        child = _children.get(pid)
        if child is not None and child.poll() is not None:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _reachable(path: Path, account: ServerAccount) -> bool:
    """Whether `account` (no supplementary groups) may enter `path` and its parents."""
    for d in [path, *path.parents]:
        try:
            st = d.stat()
        except OSError:
            return False
        if st.st_uid == account.uid:
            bits = st.st_mode >> 6
        elif st.st_gid == account.gid:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        if not bits & 0o1:
            return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"
