-- 0004_schedules: recurring schedules, ticked into jobs by `substrate-db schedule-tick`.
--
-- `{schema}` is replaced by the quoted, validated schema identifier before this runs.
-- Append-only once released: change the schema in a new migration, never here.
--
-- A schedule's runs sit on a grid: `last_run_at` is the grid point the last run was
-- enqueued for (not the wall time of the tick), and `next_run_at` is always
-- `last_run_at + interval_secs`, or the time the schedule was created when it never ran.
-- Every time is Postgres' clock.

CREATE TABLE {schema}.schedules (
    -- 160 characters at most, so the dedupe key `schedule:<name>:<epoch>` of a run stays
    -- within the 200 characters a job's dedupe key may have.
    name          text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 160),
    kind          text        NOT NULL CHECK (length(kind) BETWEEN 1 AND 200),
    payload       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    interval_secs integer     NOT NULL CHECK (interval_secs >= 1),
    enabled       boolean     NOT NULL DEFAULT true,
    priority      smallint    NOT NULL DEFAULT 0,
    max_attempts  integer     NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    next_run_at   timestamptz NOT NULL,
    last_run_at   timestamptz,
    -- The job enqueued by the last run (kept as a plain number: jobs are pruned).
    last_job_id   bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A tick reads only enabled schedules that are due.
CREATE INDEX schedules_due_idx ON {schema}.schedules (next_run_at) WHERE enabled;
