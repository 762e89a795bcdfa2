"""Running helper processes (PgBouncer, a restarted postmaster) the way the test server runs.

As root, PostgreSQL and PgBouncer refuse to run, so children run as the same
unprivileged account as `EphemeralPostgres` (`server_account()`). Every child asks the
kernel for SIGINT when the test process dies (PR_SET_PDEATHSIG), so a killed test run
leaves no PgBouncer or postmaster behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from substrate_db.testing import server_account

_PR_SET_PDEATHSIG = 1


def account_options() -> dict[str, Any]:
    """`subprocess.Popen` keyword arguments that run a child as the server's account
    (only when we are root; otherwise the child runs as us, like the server)."""
    account = server_account()
    return account.subprocess_options() if account is not None else {}


def give_to_account(path: Path) -> None:
    """Let the server's account own `path` (a directory it writes its files into)."""
    account = server_account()
    if account is not None:
        os.chown(path, account.uid, account.gid)


def death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking for SIGINT when our thread dies (Linux, main thread only: the
    signal follows the parent thread). CPython applies user=/group= before preexec_fn,
    and a credential change clears the death signal, so it must be set there."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def set_it() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the request took effect

    return set_it


def spawn(argv: list[str], *, log: Path, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """Start `argv` as the server's account, output appended to `log`, in its own session
    (a Ctrl-C at the terminal reaches pytest, whose teardown stops the child)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=death_signal(),
            **account_options(),
        )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal `proc`, wait `grace` seconds, then SIGKILL; always reaps it."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
