"""`make demo`: the main job end to end, on a fresh machine, in well under a minute.

    python -m substrate_db.demo

1. Starts a throwaway embedded PostgreSQL (the `embedded` extra's binaries, through
   `substrate_db.testing.EphemeralPostgres`: a private unix socket, as an unprivileged
   account when run as root, removed at the end, and by its watchdog even if the demo
   is killed). It does not touch the CLI's long-lived embedded server in
   `$SUBSTRATE_HOME`: a demo should leave nothing behind that matters.
2. Migrates, enqueues 300 jobs and one recurring schedule (ticked once).
3. Runs two slots, each a real separate process that uses the intake adapter exactly as
   an agent runtime would: `SubstrateIntake.tick()` into its own SQLite local queue, a
   `LeaseKeeper` heartbeat (lease 3 s), the task's side effect through the idempotency
   store, then `write_back()`.
4. Kills the slot that takes job #120 with SIGKILL in the middle of that job, runs lease
   recovery until the lease has passed, shows the job reclaimed by the other slot at a
   new epoch, and replays the dead slot's late write-back from its SQLite queue: the
   fence refuses it (`stale_epoch`).
5. Waits until every job finished, prints a summary table and checks the invariants:
   every job completed exactly once, the side effect of every job ran once (the killed
   job's effect, already done by the dead slot, is not repeated), recovery released only
   the dead slot's job, the schedule ran once. Exit code 0 only when all of them held.

Progress and step lines go to stderr; the summary goes to stdout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

from . import Substrate, ops, schedules
from .cli.maintenance import recovery_line
from .models import JobState, RecoveryResult

JOBS: Final = 300
SLOW_JOB: Final = 120
"""The job (by enqueue position, 1-based) that is slow on its first claim: its slot dies."""
LEASE_SECS: Final = 3
WORK_SECS: Final = 0.003
"""What an ordinary job's work takes."""
SLOW_SECS: Final = 120.0
"""What the slow job would take on its first claim (it is killed long before)."""
KINDS: Final = ("demo.work", "liveness.ping")
CREDENTIAL: Final = "demo-db"
STEP_TIMEOUT: Final = 45.0
"""Longest wait for any one step; the whole demo takes seconds."""
HEARTBEAT: Final = {
    "name": "heartbeat",
    "kind": "liveness.ping",
    "payload": {"source": "substrate-db schedule"},
    "interval_secs": 3600,
}
"""The same schedule as fixtures/heartbeat.schedule.json."""

_started = time.monotonic()


def say(message: str) -> None:
    """A step line on stderr, with the time since the demo started."""
    click.echo(f"[{time.monotonic() - _started:5.1f}s] {message}", err=True)


# -- a slot: one process, the intake adapter into a SQLite local queue -------------------


def slot_main(config_path: str, queue_path: str, name: str) -> int:
    """A runtime's tick loop: claim into the local queue, run, write back. Prints one
    JSON event per line on stdout; stops when its stdin closes (the demo ended or died)."""
    from .intake import LeaseKeeper, SQLiteTaskQueue, SubstrateConfig, SubstrateIntake
    from .intake.idempotency import IdempotencyStore, job_effect_key

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=f"{name}: %(message)s")
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()  # returns at EOF: our parent closed the pipe or died
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "slot": name, **fields}), flush=True)

    config = SubstrateConfig.from_host_config(config_path)
    local = SQLiteTaskQueue(queue_path)
    store = IdempotencyStore(config.schema_name)
    with SubstrateIntake(config, local) as intake:
        keeper: LeaseKeeper = intake.lease_keeper()
        keeper.start()
        client = intake.client()
        emit("ready")
        while not stop.is_set():
            tick = intake.tick()
            taken = local.take_next()
            if taken is None:
                if not tick.claimed:
                    stop.wait(0.01)
                continue
            task = taken.task
            job_id = int(task.payload["_substrate_job_id"])
            epoch = int(task.payload["_substrate_claim_epoch"])
            keeper.track(task)
            emit("start", job=job_id, epoch=epoch, task=taken.task_id)
            ran = False

            def effect(epoch: int = epoch) -> Any:
                nonlocal ran
                ran = True
                return {"done_by": name, "epoch": epoch}

            # The side effect, once per job across claims (the fence guards the state,
            # the idempotency store guards the effect).
            with client.pool.connection() as conn:
                receipt = store.run_once(conn, job_effect_key(task, "demo"), effect)
            emit("effect", job=job_id, epoch=epoch, ran=ran, by=receipt["done_by"])
            slow = bool(task.payload.get("slow")) and epoch == 1
            if slow:
                stop.wait(SLOW_SECS)  # the demo kills us in here
            else:
                time.sleep(WORK_SECS)
            local.finish(taken.task_id, ok=True, result=receipt)
            outcome = intake.write_back(task, ok=True, result=receipt)
            emit(
                "done",
                job=job_id,
                epoch=epoch,
                applied=bool(outcome is not None and outcome.ok),
                reason=None if outcome is None else str(outcome.reason),
            )
        keeper.stop()
    local.close()
    return 0


# -- the demo ----------------------------------------------------------------------------


@dataclass
class Slot:
    name: str
    config: Path
    queue: Path
    proc: subprocess.Popen[str]
    log: Path
    killed: bool = False
    applied: int = 0
    effects: int = 0


@dataclass
class Seen:
    """What the slots reported."""

    starts: dict[int, list[tuple[str, int, str]]] = field(default_factory=lambda: defaultdict(list))
    applied: Counter[int] = field(default_factory=Counter)
    refused: list[dict[str, Any]] = field(default_factory=list)
    effects: Counter[int] = field(default_factory=Counter)
    effect_by: dict[int, str] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)


class DemoFailed(Exception):
    """A step did not happen in time; the message says which."""


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen = Seen()
        self.slots: dict[str, Slot] = {}
        self.checks: list[tuple[bool, str]] = []
        self.facts: list[tuple[str, str]] = []

    # -- events from the slots -----------------------------------------------------------

    def _read(self, slot: Slot) -> None:
        assert slot.proc.stdout is not None
        for line in slot.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.events.put(json.loads(line))

    def _apply(self, event: dict[str, Any]) -> None:
        kind, slot, seen = event["event"], self.slots[event["slot"]], self.seen
        if kind == "ready":
            seen.ready.add(slot.name)
        elif kind == "start":
            seen.starts[event["job"]].append((slot.name, event["epoch"], event["task"]))
        elif kind == "effect" and event["ran"]:
            seen.effects[event["job"]] += 1
            seen.effect_by[event["job"]] = slot.name
            slot.effects += 1
        elif kind == "done":
            if event["applied"]:
                seen.applied[event["job"]] += 1
                slot.applied += 1
            else:
                seen.refused.append(event)

    def pump(self, until: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
        """Apply slot events until `until()` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoFailed(f"timed out after {timeout:g} s waiting for {what}")
            with contextlib.suppress(queue.Empty):
                self._apply(self.events.get(timeout=min(left, 0.05)))
            for slot in self.slots.values():
                if not slot.killed and slot.proc.poll() is not None:
                    raise DemoFailed(
                        f"{slot.name} exited with code {slot.proc.returncode} (log: {slot.log})"
                    )

    # -- the steps -------------------------------------------------------------------------

    def run(self) -> bool:
        from .testing import EphemeralPostgres

        say("starting a throwaway embedded PostgreSQL (binaries from the `embedded` extra)")
        with EphemeralPostgres() as pg, Substrate.connect(pg.conninfo, max_size=4) as client:
            say(f"PostgreSQL {pg.version} on a unix socket in {pg.socket_dir}")
            try:
                return self._main(pg.conninfo, pg.socket_dir, pg.port, client)
            finally:
                self._stop_slots()

    def _main(self, conninfo: str, socket_dir: Path, port: int, client: Substrate) -> bool:
        q = client.queries
        versions = client.migrate()
        say(f"migrated: {', '.join(f'{v:04d}' for v in versions)}")

        specs: list[dict[str, Any]] = [
            {
                "kind": KINDS[0],
                "payload": {"n": n, "subject": f"demo job {n}", "slow": n == SLOW_JOB},
            }
            for n in range(1, JOBS + 1)
        ]
        ids = client.enqueue_many(specs)
        slow_id = ids[SLOW_JOB - 1]
        spec = schedules.ScheduleSpec.from_mapping(HEARTBEAT)
        client.run(schedules.upsert(q, spec, None))
        tick = client.run(schedules.tick(q))
        heartbeat_ids = [r.job_id for r in tick.runs if r.job_id is not None]
        total = len(ids) + len(heartbeat_ids)
        say(
            f"enqueued {len(ids)} jobs (job {slow_id} is slow on its first claim) and the "
            f"schedule {spec.name!r} every {spec.interval_secs} s: its tick enqueued job "
            f"{', '.join(map(str, heartbeat_ids))}"
        )

        for name in ("slot-a", "slot-b"):
            self._start_slot(name, socket_dir, port)
        self.pump(lambda: len(self.seen.ready) == 2, "both slots to start")
        say(
            "two slots running, each its own process: intake tick -> SQLite local queue -> "
            f"work -> write-back; lease {LEASE_SECS} s, renewed every {LEASE_SECS / 3:g} s"
        )

        with self._progress(total, client, "draining") as bar:
            self.pump(
                lambda: bar() and any(j == slow_id for j in self.seen.effect_by),
                f"a slot to start job {slow_id}",
            )
        victim_name, _, victim_task = self.seen.starts[slow_id][0]
        victim = self.slots[victim_name]
        survivor = next(s for s in self.slots.values() if s is not victim)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        victim.killed = True
        say(
            f"killed {victim.name} with SIGKILL in the middle of job {slow_id} (epoch 1); "
            f"its effect was already recorded"
        )

        recovered = self._recover(client, slow_id)
        self.pump(
            lambda: any(e >= 2 for _, e, _ in self.seen.starts[slow_id]),
            f"job {slow_id} to be claimed again",
        )
        reclaimer, epoch2, _ = self.seen.starts[slow_id][-1]
        say(f"job {slow_id} reclaimed by {reclaimer} at epoch {epoch2}")

        stale = self._late_write_back(victim, victim_task, slow_id)

        with self._progress(total, client, "finishing") as bar:
            self.pump(lambda: bar() and self._all_done(client), "every job to finish", 60)
        self._stop_slots()
        say(
            f"every job finished ({sum(self.seen.applied.values())} write-backs applied); "
            f"{survivor.name} stopped"
        )
        self._verify(client, q, ids, heartbeat_ids, slow_id, victim, survivor, recovered, stale)
        return all(ok for ok, _ in self.checks)

    def _start_slot(self, name: str, socket_dir: Path, port: int) -> None:
        config = self.workdir / f"{name}.host.json"
        block = {
            "enabled": True,
            "credential": CREDENTIAL,
            "kinds": list(KINDS),
            "slotId": name,
            "leaseSecs": LEASE_SECS,
            "host": str(socket_dir),
            "port": port,
            "database": "postgres",
            "user": "postgres",
            "isLeaseRecoveryOwner": False,
        }
        config.write_text(json.dumps({"runtime": name, "substrate": block}, indent=2))
        local = self.workdir / f"{name}.tasks.sqlite"
        log = self.workdir / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # The credential id resolves through the environment (trust auth ignores it here).
        env["SUBSTRATE_CREDENTIAL_DEMO_DB"] = "demo-password"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "substrate_db.demo",
                    "--slot",
                    str(config),
                    str(local),
                    name,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
            )
        slot = self.slots[name] = Slot(name, config, local, proc, log)
        threading.Thread(target=self._read, args=(slot,), daemon=True).start()

    def _recover(self, client: Substrate, slow_id: int) -> RecoveryResult:
        """`substrate-db recover-leases --every 0.25` until the dead slot's lease passed."""
        say(
            f"lease recovery (as `substrate-db recover-leases --every 0.25`), until the "
            f"{LEASE_SECS} s lease of job {slow_id} has passed:"
        )
        deadline = time.monotonic() + STEP_TIMEOUT
        passes = 0
        while True:
            result = client.release_expired_leases_exclusive()
            passes += 1
            if result is not None and result.released:
                click.echo(f"    {recovery_line(result)}", err=True)
                break
            if time.monotonic() > deadline:
                raise DemoFailed(f"lease recovery never released job {slow_id}")
            self.pump(lambda: True, "")
            time.sleep(0.25)
        say(f"released after {passes} passes; the job is available again at once")
        return result

    def _late_write_back(self, victim: Slot, task_id: str, slow_id: int) -> Any:
        """The dead slot comes back and writes back the task its SQLite queue still holds
        as running: exactly what a runtime restarting after a crash might do."""
        from .intake import SQLiteTaskQueue, SubstrateConfig, SubstrateIntake

        config = SubstrateConfig.from_host_config(victim.config)
        with SQLiteTaskQueue(victim.queue) as local:
            task = local.get_task(task_id)
            state = local.state(task_id)
            assert task is not None
            logging.getLogger("substrate_db").setLevel(logging.WARNING)
            with SubstrateIntake(config, local, resolve_credential=lambda _: None) as intake:
                result = intake.write_back(task, ok=True, result={"done_by": victim.name})
        reason = (
            "none" if result is None else f"{result.reason} (job at epoch {result.actual_epoch})"
        )
        say(
            f"{victim.name}'s late write-back of job {slow_id} (its SQLite task {task_id} is "
            f"still {state!r}, epoch 1): refused, reason={reason}"
        )
        return result

    def _all_done(self, client: Substrate) -> bool:
        stats = client.run(ops.stats(client.queries))
        return stats.totals["available"] == 0 and stats.totals["running"] == 0

    @contextlib.contextmanager
    def _progress(self, total: int, client: Substrate, label: str) -> Iterator[Callable[[], bool]]:
        """A progress bar on a terminal, a line per quarter otherwise. Yields a callable
        that refreshes it (and always returns True, to sit inside a `pump` predicate)."""
        tty = sys.stderr.isatty()
        bar = (
            click.progressbar(length=total, label=f"    {label}", file=sys.stderr) if tty else None
        )
        shown = 0
        last_check = 0.0
        quarter = 0

        def refresh() -> bool:
            nonlocal shown, last_check, quarter
            now = time.monotonic()
            if now - last_check < 0.1:
                return True
            last_check = now
            done = sum(self.seen.applied.values())
            if bar is not None:
                bar.update(done - shown)
            elif done * 4 // total > quarter:
                quarter = done * 4 // total
                click.echo(f"    {label}: {done}/{total} jobs completed", err=True)
            shown = done
            return True

        if bar is not None:
            bar.__enter__()
        try:
            yield refresh
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)

    def _stop_slots(self) -> None:
        for slot in self.slots.values():
            if slot.proc.poll() is None and slot.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    slot.proc.stdin.close()  # EOF: the slot finishes its task and exits
        for slot in self.slots.values():
            try:
                slot.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                slot.proc.kill()
                slot.proc.wait()
        while not self.events.empty():
            self._apply(self.events.get_nowait())

    # -- the verdict -----------------------------------------------------------------------

    def check(self, ok: bool, text: str) -> None:
        self.checks.append((ok, text))

    def _verify(
        self,
        client: Substrate,
        q: Any,
        ids: list[int],
        heartbeat_ids: list[int],
        slow_id: int,
        victim: Slot,
        survivor: Slot,
        recovered: RecoveryResult,
        stale: Any,
    ) -> None:
        all_ids = ids + heartbeat_ids
        jobs = {j.id: j for j in client.list_jobs(limit=len(all_ids) + 100)}
        stats = client.run(ops.stats(q))
        completed = [i for i in all_ids if jobs[i].state == JobState.COMPLETED]
        once = all(self.seen.applied[i] == 1 for i in all_ids)
        self.check(
            len(completed) == len(all_ids) == len(jobs) and once,
            f"every job completed exactly once ({len(completed)} of {len(all_ids)} completed, "
            f"{sum(self.seen.applied.values())} write-backs applied)",
        )
        self.check(
            stats.totals["available"] == stats.totals["running"] == stats.totals["failed"] == 0,
            "nothing left available, running or failed",
        )
        slow = jobs[slow_id]
        self.check(
            recovered.requeued_ids == (slow_id,) and recovered.failed == 0,
            f"lease recovery released only the dead slot's job ({recovery_line(recovered)})",
        )
        self.check(
            slow.claim_epoch == 2 and slow.attempts == 2 and slow.claimed_by == survivor.name,
            f"job {slow_id} was reclaimed and finished by {survivor.name} "
            f"(epoch {slow.claim_epoch}, attempts {slow.attempts})",
        )
        self.check(
            stale is not None
            and not stale.ok
            and str(stale.reason) == "stale_epoch"
            and slow.result is not None
            and slow.result.get("done_by") == victim.name
            and slow.state == JobState.COMPLETED,
            f"{victim.name}'s late write-back was refused (stale_epoch) and changed nothing",
        )
        effects_once = all(self.seen.effects[i] == 1 for i in all_ids)
        self.check(
            effects_once and self.seen.effect_by.get(slow_id) == victim.name,
            f"each job's side effect ran once ({sum(self.seen.effects.values())} effects; "
            f"job {slow_id}'s ran in {victim.name} before it died and was not repeated)",
        )
        sched = client.run(schedules.list_schedules(q))
        beat = sched[0] if sched else None
        self.check(
            len(heartbeat_ids) == 1
            and beat is not None
            and beat.last_run_at is not None
            and (beat.next_run_at - beat.last_run_at).total_seconds() == beat.interval_secs,
            "the schedule enqueued one run; its next run is one interval later",
        )
        self.facts = [
            ("PostgreSQL", "throwaway embedded server (removed at exit)"),
            ("jobs", f"{len(ids)} work + {len(heartbeat_ids)} from the schedule"),
            ("slots", "2 processes, intake adapter into SQLite local queues"),
            (victim.name, f"{victim.applied} completed, then SIGKILLed during job {slow_id}"),
            (survivor.name, f"{survivor.applied} completed, including job {slow_id} at epoch 2"),
            (
                f"job {slow_id}",
                f"{slow.state.value}, attempts {slow.attempts}, last_error {slow.last_error!r}",
            ),
            ("late write-back", "refused: " + ("-" if stale is None else str(stale.reason))),
            ("effects", f"{sum(self.seen.effects.values())} for {len(all_ids)} jobs"),
        ]

    def report(self, elapsed: float) -> None:
        width = max(len(k) for k, _ in self.facts) if self.facts else 0
        click.echo("")
        click.echo("substrate-db demo: summary")
        for key, value in self.facts:
            click.echo(f"  {key:<{width}}  {value}")
        click.echo("")
        click.echo("invariants")
        for ok, text in self.checks:
            click.echo(f"  [{'ok' if ok else 'FAILED'}] {text}")
        verdict = (
            "all invariants held"
            if self.checks and all(o for o, _ in self.checks)
            else ("SOME INVARIANTS FAILED")
        )
        click.echo(f"\n{verdict} ({elapsed:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--slot"] and len(args) == 4:
        return slot_main(*args[1:])
    if args:
        click.echo("usage: python -m substrate_db.demo", err=True)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="    %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="substrate-demo-"))
    demo = Demo(workdir)
    ok = False
    try:
        ok = demo.run()
    except DemoFailed as exc:
        say(f"demo failed: {exc}")
    finally:
        demo.report(time.monotonic() - _started)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
