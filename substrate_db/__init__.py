"""substrate-db: one PostgreSQL database as a job substrate shared by many agent runtimes.

Slots claim jobs with `FOR UPDATE SKIP LOCKED`, hold them under a lease measured by
Postgres' clock, and write outcomes back fenced on the job's claim epoch, so a stale
executor can never overwrite a newer claim. See the README for the state machine and
the fencing contract.
"""

import logging

from .client import AsyncSubstrate, Substrate
from .errors import (
    ConnectionFailed,
    DatabaseError,
    InvalidArgument,
    MigrationChecksumMismatch,
    MigrationError,
    ResultTooLarge,
    SchemaNotMigrated,
    SubstrateError,
)
from .liveness import AsyncSlotHeartbeat, SlotHeartbeat
from .models import (
    ClaimedJob,
    Job,
    JobOutcome,
    JobState,
    MigrationStatus,
    RecoveryResult,
    WriteBackReason,
    WriteBackResult,
)
from .slots import SlotInfo, SlotState, SlotStatus

# The library logs through the `substrate_db` logger and leaves levels and handlers to
# the application.
logging.getLogger("substrate_db").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "AsyncSlotHeartbeat",
    "AsyncSubstrate",
    "ClaimedJob",
    "ConnectionFailed",
    "DatabaseError",
    "InvalidArgument",
    "Job",
    "JobOutcome",
    "JobState",
    "MigrationChecksumMismatch",
    "MigrationError",
    "MigrationStatus",
    "RecoveryResult",
    "ResultTooLarge",
    "SchemaNotMigrated",
    "SlotHeartbeat",
    "SlotInfo",
    "SlotState",
    "SlotStatus",
    "Substrate",
    "SubstrateError",
    "WriteBackReason",
    "WriteBackResult",
    "__version__",
]
