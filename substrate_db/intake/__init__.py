"""The intake adapter: agent runtimes take substrate jobs into their own local queues.

An agent runtime runs a loop. On each tick, when intake is enabled, `tick()` claims one
job of the slot's kinds, turns it into a `LocalTask` of the runtime's own queue and
enqueues it; the runtime runs it like any other local task and then calls
`write_back()`, which completes or fails the job, fenced on the claim's epoch. The
adapter never takes the runtime down: every failure is a value and a log line.

    config = SubstrateConfig.from_host_config("host.json")
    queue = SQLiteTaskQueue("tasks.db")
    with SubstrateIntake(config, queue) as intake, intake.lease_keeper() as keeper:
        while running:
            intake.tick()
            intake.lease_recovery_tick()
            taken = queue.take_next()
            if taken is not None:
                keeper.track(taken.task)
                ok, result, error = run(taken.task)
                queue.finish(taken.task_id, ok=ok, result=result, error=error)
                intake.write_back(taken.task, ok=ok, result=result, error=error)

Public names: `SubstrateConfig`, `SubstrateIntake`, `AsyncSubstrateIntake`,
`LocalTask`, `TickResult`, `SkipReason`, `LocalTaskQueue`, `AsyncLocalTaskQueue`,
`SQLiteTaskQueue`, `TakenTask`, `LeaseKeeper`, `AsyncLeaseKeeper`, `IdempotencyStore`,
`AsyncIdempotencyStore`, `IdempotencyRecord`, `job_effect_key`, the credential
resolvers, `Secret` and `CredentialError`. The log lines are listed, with their levels,
in `substrate_db.loglines`.
"""

from .adapter import AsyncSubstrateIntake, SubstrateIntake
from .config import SubstrateConfig
from .credentials import (
    ChainResolver,
    CredentialError,
    CredentialResolver,
    EnvCredentialResolver,
    FileCredentialResolver,
    LibpqPassfileResolver,
    Secret,
    default_resolver,
    env_var_name,
)
from .idempotency import (
    AsyncIdempotencyStore,
    IdempotencyRecord,
    IdempotencyStore,
    job_effect_key,
)
from .lease import AsyncLeaseKeeper, LeaseKeeper
from .logic import SkipReason, TickResult
from .tasks import AsyncLocalTaskQueue, LocalTask, LocalTaskQueue, SQLiteTaskQueue, TakenTask

__all__ = [
    "AsyncIdempotencyStore",
    "AsyncLeaseKeeper",
    "AsyncLocalTaskQueue",
    "AsyncSubstrateIntake",
    "ChainResolver",
    "CredentialError",
    "CredentialResolver",
    "EnvCredentialResolver",
    "FileCredentialResolver",
    "IdempotencyRecord",
    "IdempotencyStore",
    "LeaseKeeper",
    "LibpqPassfileResolver",
    "LocalTask",
    "LocalTaskQueue",
    "SQLiteTaskQueue",
    "Secret",
    "SkipReason",
    "SubstrateConfig",
    "SubstrateIntake",
    "TakenTask",
    "TickResult",
    "default_resolver",
    "env_var_name",
    "job_effect_key",
]
