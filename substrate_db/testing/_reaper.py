"""A tiny watchdog that cleans up after an `EphemeralPostgres` whose owner died.

`EphemeralPostgres` starts this script next to its server, as
``python -I -S _reaper.py <tempdir> <datadir>``, in its own session, with a pipe on
stdin. The owner writes one line per process to watch (``<pid>\\n``: initdb, then
the postmaster) and otherwise writes nothing. The script blocks reading stdin; EOF
means the owner closed the pipe (a normal stop, after which there is nothing left to
do) or the owner died, even by SIGKILL (the kernel closes its end). Then the script
stops the watched processes (SIGINT, then SIGQUIT, then SIGKILL), waits for them and
removes the temporary directory.

It imports nothing from substrate_db and only the standard library, so it runs by
path with ``-I -S`` (fast, and independent of sys.path, the working directory and
whether the package is installed).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path

# How long each signal gets before the next, harder one is sent. SIGINT is
# PostgreSQL's fast shutdown (a few ms here); SIGQUIT is immediate shutdown, after
# which the postmaster itself SIGKILLs children that linger.
ESCALATION: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGINT, 5.0),
    (signal.SIGQUIT, 3.0),
    (signal.SIGKILL, 2.0),
)


class _Watched:
    """One process to stop, held by pidfd when the kernel has them (no pid reuse race)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.fd = -1  # already gone
        except (OSError, AttributeError):
            self.fd = None  # no pidfd support: fall back to the bare pid

    def alive(self) -> bool:
        if self.fd == -1:
            return False
        if self.fd is not None:
            # A pidfd becomes readable once the process has exited (zombie or reaped).
            readable, _, _ = select.select([self.fd], [], [], 0)
            return not readable
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def signal(self, sig: signal.Signals) -> None:
        try:
            if self.fd is not None and self.fd >= 0:
                signal.pidfd_send_signal(self.fd, sig)
            elif self.fd is None:
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _postmaster_pid(datadir: Path) -> int | None:
    """The pid in postmaster.pid, if that process is alive and really runs in datadir.

    A postmaster that was SIGKILLed leaves its pid file behind and the pid may have
    been reused since: the postmaster's working directory is its data directory, so
    checking /proc/<pid>/cwd tells ours from a stranger (no /proc: no fallback).
    """
    try:
        pid = int((datadir / "postmaster.pid").read_text().splitlines()[0])
        if os.path.realpath(f"/proc/{pid}/cwd") != os.path.realpath(datadir):
            return None
    except (OSError, IndexError, ValueError):
        return None
    return pid


def stop_all(watched: list[_Watched]) -> None:
    """Signal every live process, escalating until all have exited."""
    for sig, grace in ESCALATION:
        live = [w for w in watched if w.alive()]
        if not live:
            return
        for w in live:
            w.signal(sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(w.alive() for w in live):
            time.sleep(0.01)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: _reaper.py TEMPDIR DATADIR  (pids to watch on stdin)", file=sys.stderr)
        return 2
    tempdir, datadir = Path(argv[1]), Path(argv[2])
    # The owner's Ctrl-C or a `kill` of its process group must not stop the cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    watched: list[_Watched] = []
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        try:
            watched.append(_Watched(int(line)))
        except ValueError:
            continue

    # EOF. If the owner died before it could report the postmaster, the pid file still
    # names it (the postmaster has PR_SET_PDEATHSIG too; this is the second line of defence).
    pid = _postmaster_pid(datadir)
    if pid is not None and all(w.pid != pid for w in watched):
        watched.append(_Watched(pid))
    stop_all(watched)
    shutil.rmtree(tempdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
