"""Scenarios with a real consumer process: the `worker` draining a backlog next to the
peers, enqueue-to-claim latency (4), and the worker's memory over a long drain (6).

Every consumer is timed the same way, from outside its process: it is started and warmed
up first (connections open, statements prepared), the backlog is enqueued in bulk while
it idles, and the clock runs from the commit of that insert until a poll of the
database finds no job left to do. So the figure includes the wake-up, and no one's
start-up; the poll (every `POLL_SECS`) costs each system the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from . import throughput
from .env import KIND, MAIN_SCHEMA, Env, add_jobs, jobs_table, reset, top_up, vacuum
from .stats import Figure

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".bench-venv"
PEER_REQUIREMENTS = Path(__file__).resolve().parent / "requirements-peers.txt"
POLL_SECS = 0.01
WARMUP_ROUNDS = 6
DRAIN_TIMEOUT = 120.0

WORKER_CONCURRENCY = 200
"""Our worker's setting for a no-op handler: enough jobs in flight that claims of 50
overlap with write-backs (the best of 50, 100, 200, 500 measured here)."""
WORKER_BATCH = 50
PGQUEUER_BATCH = 100
"""PgQueuer's best batch_size here (10, 16, 50, 100, 200, 500 and 1000 measured)."""
PROCRASTINATE_CONCURRENCY = 10
"""Procrastinate's best concurrency here (1, 10 and 50 measured)."""


# -- processes --------------------------------------------------------------------------


class Consumer:
    """A child process speaking `peer_protocol` on its stdin and stdout."""

    def __init__(self, argv: list[str], log: Path, *, env: dict[str, str] | None = None) -> None:
        self.name = Path(argv[1]).name if len(argv) > 1 else argv[0]
        self._log = open(log, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def expect(self, word: str, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        out: IO[str] = self.proc.stdout
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(out.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = result[0].strip() if result else ""
        if line != word:
            self.close()
            raise RuntimeError(
                f"{self.proc.args!r}: expected {word!r}, got {line or 'nothing'!r} "
                f"(see {self._log.name})"
            )

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; see {self._log.name}"
            )

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_empty(
    conninfo: str,
    query: sql.Composed | str,
    timeout: float = DRAIN_TIMEOUT,
    alive: Callable[[], None] | None = None,
) -> float:
    """Poll until `query` (one boolean: is work left?) is false; return when, in
    perf_counter seconds. `alive` raises if the consumer died (no point waiting)."""
    deadline = time.perf_counter() + timeout
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while True:
            if alive is not None:
                alive()
            row = conn.execute(query).fetchone()
            now = time.perf_counter()
            if row is not None and not row[0]:
                return now
            if now > deadline:
                raise TimeoutError(f"the queue was not drained within {timeout} s")
            time.sleep(POLL_SECS)


def ours_left(schema: str = MAIN_SCHEMA) -> sql.Composed:
    # Two EXISTS, each over its own partial index: cheap at any table size.
    table = jobs_table(schema)
    return sql.SQL(
        "SELECT EXISTS (SELECT 1 FROM {t} WHERE state = 'available') "
        "OR EXISTS (SELECT 1 FROM {t} WHERE state = 'running')"
    ).format(t=table)


# -- our worker ----------------------------------------------------------------------------


def worker_argv(
    env: Env, *, handler: str, concurrency: int, extra: Sequence[str] = ()
) -> list[str]:
    cli = Path(sys.executable).with_name("substrate-db")
    return [
        str(cli),
        "worker",
        "--dsn",
        env.conninfo,
        "--kinds",
        KIND,
        "--handler",
        handler,
        "--concurrency",
        str(concurrency),
        "--batch-size",
        str(WORKER_BATCH),
        *extra,
    ]


_worker_numbers = itertools.count(1)


class WorkerProcess:
    """`substrate-db worker` as an operator runs it, warmed up before any measurement."""

    def __init__(
        self, env: Env, *, handler: str, concurrency: int, extra: Sequence[str] = ()
    ) -> None:
        self.env = env
        log = env.workdir / f"worker-{next(_worker_numbers)}.log"
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            worker_argv(env, handler=handler, concurrency=concurrency, extra=list(extra)),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=ROOT,
        )
        # Each round is one claim and one write-back: past psycopg's prepare threshold.
        # A polling worker waits up to a poll period per round: two rounds do.
        rounds = 2 if "--pgbouncer" in extra else WARMUP_ROUNDS
        with env.client(min_size=1, max_size=1) as client:
            for n in range(rounds):
                client.enqueue(KIND, {"warmup": n})
                wait_empty(env.conninfo, ours_left(), timeout=30, alive=self.check_alive)
        reset(env)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = Path(self._log.name).read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the worker exited with {self.proc.returncode}: {' | '.join(tail)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def drain_ours(env: Env, jobs: int, *, handler: str = "bench.handlers:noop") -> float:
    """Seconds for `substrate-db worker` to drain `jobs` enqueued with enqueue_many."""
    reset(env)
    worker = WorkerProcess(env, handler=handler, concurrency=WORKER_CONCURRENCY)
    try:
        specs = [{"kind": KIND, "payload": {"n": i}} for i in range(jobs)]
        with env.client(min_size=1, max_size=1) as client:
            client.enqueue_many(specs)
            began = time.perf_counter()
        ended = wait_empty(env.conninfo, ours_left(), alive=worker.check_alive)
        return ended - began
    finally:
        worker.stop()
        reset(env)


# -- peers --------------------------------------------------------------------------------


def peer_python() -> Path:
    """The peers' venv, created and brought to the pinned requirements when they change."""
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / ".requirements"
    wanted = PEER_REQUIREMENTS.read_text()
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(PEER_VENV)], check=True)
    if not stamp.exists() or stamp.read_text() != wanted:
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-r", str(PEER_REQUIREMENTS)],
            check=True,
        )
        stamp.write_text(wanted)
    return python


def fresh_database(env: Env, name: str) -> str:
    with env.admin() as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return env.conninfo_for(name)


def as_uri(conninfo: str) -> str:
    """A libpq conninfo as a postgresql:// URI: asyncpg reads URIs only."""
    params = {k: str(v) for k, v in conninfo_to_dict(conninfo).items()}
    user = quote(params.pop("user", ""), safe="")
    dbname = quote(params.pop("dbname", ""), safe="")
    return f"postgresql://{user}@/{dbname}?{urlencode(params)}"


@dataclass(frozen=True)
class Peer:
    name: str
    script: str
    setting: int
    left: str
    """The poll: is any job of the backlog left?"""


PGQUEUER = Peer(
    "PgQueuer 1.6 (asyncpg)",
    "peer_pgqueuer.py",
    PGQUEUER_BATCH,
    "SELECT EXISTS (SELECT 1 FROM pgqueuer)",
)
PROCRASTINATE = Peer(
    "Procrastinate 3.10",
    "peer_procrastinate.py",
    PROCRASTINATE_CONCURRENCY,
    "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))",
)


class PeerSession:
    """One peer's consumer process in a fresh database of its own."""

    def __init__(self, env: Env, peer: Peer, jobs: int) -> None:
        python = peer_python()
        self.env, self.peer, self.jobs = env, peer, jobs
        name = peer.script.removeprefix("peer_").removesuffix(".py")
        self.dbname = f"peer_{name}_{peer.setting}"
        self.conninfo = fresh_database(env, self.dbname)
        script = Path(__file__).resolve().parent / peer.script
        self.consumer = Consumer(
            [str(python), str(script), as_uri(self.conninfo), str(jobs), str(peer.setting)],
            env.workdir / f"{self.dbname}.log",
            env={k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")},
        )

    def drain(self) -> float:
        """One drain of the backlog; jobs/s."""
        self.consumer.expect("ready", timeout=120)
        self.consumer.send("go")
        self.consumer.expect("enqueued", timeout=120)
        began = time.perf_counter()
        ended = wait_empty(self.conninfo, self.peer.left, alive=self.consumer.check_alive)
        self.consumer.send("done")
        return self.jobs / (ended - began)

    def close(self) -> None:
        self.consumer.close()
        with self.env.admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(self.dbname)
                )
            )


# -- scenarios -----------------------------------------------------------------------------


def scenario_drain(env: Env, *, peers: bool, into: dict[str, Figure], prefix: str) -> list[str]:
    """The worker and the peers draining a backlog with a no-op handler, next to the
    batch SQL ceiling, all interleaved run by run. Figures land in `into` as they are
    measured, so a failing peer costs only its own figure; returns notes."""
    n, m = env.sizes.drain, env.sizes.procrastinate_drain
    notes: list[str] = []
    # The batch ceiling again, in the same window as the drains: they are long, and the
    # machine is shared, so a ceiling measured minutes earlier is another machine.
    ceiling = into[prefix + "ceiling"] = Figure(
        "claim 50 + complete 50, 2 clients (SQL), same window", "jobs/s"
    )
    worker = into[prefix + "worker"] = Figure(
        f"worker drains {n:,} (no-op async handler)", "jobs/s"
    )
    wanted = [
        ("pgqueuer", PGQUEUER, n, f"PgQueuer drains {n:,} (batch {PGQUEUER_BATCH})"),
        # Issue 5's reference figure for PgQueuer used batch 16: kept for comparison.
        (
            "pgqueuer16",
            dataclasses.replace(PGQUEUER, setting=16),
            n,
            f"PgQueuer drains {n:,} (batch 16)",
        ),
        (
            "procrastinate",
            PROCRASTINATE,
            m,
            f"Procrastinate drains {m:,} (concurrency {PROCRASTINATE_CONCURRENCY})",
        ),
    ]
    figures = {key: Figure(title, "jobs/s") for key, _, _, title in wanted}
    broken: set[str] = set()
    for rep in range(env.sizes.runs):
        env.say(f"drain, run {rep + 1}/{env.sizes.runs}")
        reset(env)
        # Deep enough for 2 s at ~60k jobs/s: a ceiling run must never find the queue empty.
        top_up(env, max(env.sizes.backlog * 5, 60_000 * env.sizes.seconds))
        vacuum(env)
        # Two clients: the worker keeps one claim and one write-back in flight.
        run = throughput.ceiling_claim(env, clients=2, batch=WORKER_BATCH)
        ceiling.add(run.rate)
        if run.dry:
            notes.append("drain-window ceiling: the backlog ran dry; raise Sizes.backlog")
        reset(env)
        worker.add(n / drain_ours(env, n))
        for key, peer, jobs, _ in wanted if peers else []:
            if key in broken:
                continue
            fig = figures[key]
            # A fresh process per run, as for our worker. (Peer processes kept across
            # runs, idle in between, drained several times slower on later runs here.)
            try:
                session = PeerSession(env, peer, jobs)
                try:
                    fig.add(session.drain())
                finally:
                    session.close()
                into[prefix + key] = fig
            except Exception as exc:
                broken.add(key)
                notes.append(f"{fig.name} failed: {type(exc).__name__}: {exc}")
                env.say(f"{fig.name} FAILED: {exc}")
        done = {"ceiling": ceiling, "worker": worker} | figures
        env.say(
            "    " + ", ".join(f"{k} {f.samples[-1]:,.0f}/s" for k, f in done.items() if f.samples)
        )
    return notes


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def latency_run(env: Env, *, listen: bool) -> list[float]:
    """Enqueue-to-handler latencies (ms) of jobs enqueued one by one at a light rate to an
    idle worker; without `listen`, the worker only polls (as behind PgBouncer)."""
    reset(env)
    extra: list[str] = [] if listen else ["--pgbouncer"]
    worker = WorkerProcess(env, handler="bench.handlers:stamp", concurrency=10, extra=extra)
    try:
        count = max(1, int(env.sizes.latency_rate * env.sizes.latency_seconds))
        gap = 1.0 / env.sizes.latency_rate
        with env.client(min_size=1, max_size=1) as client:
            next_at = time.perf_counter()
            for i in range(count):
                client.enqueue(KIND, {"t": time.time(), "i": i})
                next_at += gap
                time.sleep(max(0.0, next_at - time.perf_counter()))
        wait_empty(env.conninfo, ours_left(), alive=worker.check_alive)
        with env.admin() as conn:
            rows = conn.execute(
                sql.SQL(
                    "SELECT (result->>'ran_at')::float8 - (payload->>'t')::float8 FROM {} "
                    "WHERE payload ? 't' AND state = 'completed'"
                ).format(jobs_table(MAIN_SCHEMA))
            ).fetchall()
        return [float(r[0]) * 1000 for r in rows]
    finally:
        worker.stop()
        reset(env)


def scenario_latency(env: Env) -> dict[str, Figure]:
    """(4) enqueue-to-claim latency p50/p99, with and without LISTEN/NOTIFY wake-ups."""
    figs = {
        "notify_p50": Figure("latency p50, LISTEN/NOTIFY", "ms", higher_is_better=False),
        "notify_p99": Figure("latency p99, LISTEN/NOTIFY", "ms", higher_is_better=False),
        "poll_p50": Figure("latency p50, polling (1 s)", "ms", higher_is_better=False),
        "poll_p99": Figure("latency p99, polling (1 s)", "ms", higher_is_better=False),
    }
    for rep in range(env.sizes.runs):
        env.say(f"(4) latency, run {rep + 1}/{env.sizes.runs}")
        for prefix, listen in (("notify", True), ("poll", False)):
            lat = latency_run(env, listen=listen)
            figs[f"{prefix}_p50"].add(statistics.median(lat))
            figs[f"{prefix}_p99"].add(_percentile(lat, 0.99))
    return figs


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class MemoryTrace:
    jobs: int
    seconds: float
    samples: list[tuple[float, float]]
    """(seconds since the backlog was written, RSS MiB)."""

    def halves(self) -> tuple[float, float]:
        """Peak RSS in the first and in the second half of the drain."""
        mid = self.seconds / 2
        first = [r for t, r in self.samples if t <= mid] or [float("nan")]
        second = [r for t, r in self.samples if t > mid] or [float("nan")]
        return max(first), max(second)

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "seconds": self.seconds, "samples": self.samples}


def scenario_memory(env: Env) -> tuple[dict[str, Figure], MemoryTrace]:
    """(6) the worker's RSS while it drains `Sizes.memory_jobs`, sampled every 100 ms."""
    n = env.sizes.memory_jobs
    reset(env)
    worker = WorkerProcess(env, handler="bench.handlers:noop", concurrency=WORKER_CONCURRENCY)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    began = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            rss = _rss_mib(worker.proc.pid)
            if rss is not None:
                samples.append((time.perf_counter() - began, rss))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        env.say(f"(6) memory: {n:,} jobs through one worker")
        sampler.start()
        # Written in slices, as producers would, so the worker drains while they arrive.
        chunk = 50_000
        for start in range(0, n, chunk):
            add_jobs(env, min(chunk, n - start))
        ended = wait_empty(
            env.conninfo, ours_left(), timeout=DRAIN_TIMEOUT * 2, alive=worker.check_alive
        )
    finally:
        stop.set()
        sampler.join()
        worker.stop()
    trace = MemoryTrace(n, ended - began, samples)
    first, second = trace.halves()
    figs = {
        "start": Figure("worker RSS when the backlog arrives", "MiB", [samples[0][1]]),
        "peak": Figure(f"worker peak RSS over {n:,} jobs", "MiB", [max(r for _, r in samples)]),
        "first": Figure("peak RSS, first half of the drain", "MiB", [first]),
        "second": Figure("peak RSS, second half of the drain", "MiB", [second]),
        "rate": Figure(
            f"worker drains {n:,} while they are enqueued (memory run)",
            "jobs/s",
            [n / trace.seconds],
        ),
    }
    reset(env)
    return figs, trace
