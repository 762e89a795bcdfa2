-- Recurring schedules (migration 0004). See substrate_db/schedules.py for the plans.
--
-- A schedule's runs sit on a grid of `interval_secs` that starts when it first ran:
-- `last_run_at` is the grid point of the last run, `next_run_at` = `last_run_at +
-- interval_secs` (or the creation time when it never ran). Time is Postgres'.


-- name: schedule_upsert :one
-- Creates a schedule or replaces every field of an existing one, in place. The next run
-- is recomputed from the new interval (last run + interval, or now when it never ran),
-- so no stale next_run_at survives an update and a new schedule is due at once.
-- `created` tells an insert (xmax = 0 on a freshly inserted row) from an update.
INSERT INTO {schema}.schedules AS s
    (name, kind, payload, interval_secs, enabled, priority, max_attempts, next_run_at,
     created_at, updated_at)
VALUES (%(name)s, %(kind)s, %(payload)s::jsonb, %(interval_secs)s, %(enabled)s, %(priority)s,
        %(max_attempts)s, coalesce(%(now)s::timestamptz, now()),
        coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO UPDATE
SET kind = EXCLUDED.kind,
    payload = EXCLUDED.payload,
    interval_secs = EXCLUDED.interval_secs,
    enabled = EXCLUDED.enabled,
    priority = EXCLUDED.priority,
    max_attempts = EXCLUDED.max_attempts,
    next_run_at = coalesce(s.last_run_at + make_interval(secs => EXCLUDED.interval_secs),
                           EXCLUDED.next_run_at),
    updated_at = EXCLUDED.updated_at
RETURNING s.name, s.kind, s.payload, s.interval_secs, s.enabled, s.priority, s.max_attempts,
          s.next_run_at, s.last_run_at, s.last_job_id, (s.xmax = 0) AS created;


-- name: schedule_list :many
-- Every schedule, by name.
SELECT name, kind, payload, interval_secs, enabled, priority, max_attempts,
       next_run_at, last_run_at, last_job_id
FROM {schema}.schedules
ORDER BY name;


-- name: schedule_delete :one
-- Removes a schedule. Jobs it already enqueued stay.
DELETE FROM {schema}.schedules WHERE name = %(name)s RETURNING name;


-- name: schedule_due :many
-- One page of a tick, first statement of its transaction: locks up to %(limit)s due,
-- enabled schedules with SKIP LOCKED. Exactly once with many tickers: a schedule row
-- locked by another ticker is skipped, and one it already advanced is no longer due when
-- this ticker's FOR UPDATE re-reads the newest row version. The run's dedupe key
-- `schedule:<name>:<due epoch>` is a second fence (a run whose job is still unfinished
-- is never enqueued twice). Missed runs coalesce: `due_at` is the latest grid point not
-- after now, so a schedule nobody ticked for ten intervals runs once. The jobs are then
-- inserted by `enqueue_jobs`, the one insert every job goes through.
SELECT d.name, d.kind, d.payload, d.priority, d.max_attempts, d.due_at,
       'schedule:' || d.name || ':' || floor(extract(epoch FROM d.due_at))::bigint AS dedupe_key
FROM (
    SELECT s.name, s.kind, s.payload, s.priority, s.max_attempts,
           s.next_run_at + make_interval(secs => (s.interval_secs * floor(
               extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - s.next_run_at)
               / s.interval_secs))::double precision) AS due_at
    FROM {schema}.schedules s
    WHERE s.enabled
      AND s.next_run_at <= coalesce(%(now)s::timestamptz, now())
    ORDER BY s.next_run_at, s.name
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
) AS d
ORDER BY d.due_at, d.name;


-- name: schedule_advance :many
-- Last statement of a tick page: each ticked schedule's last run becomes the grid point
-- it ran for, and its next run the following grid point.
UPDATE {schema}.schedules s
SET last_run_at = a.due_at,
    next_run_at = a.due_at + make_interval(secs => s.interval_secs),
    last_job_id = coalesce(a.job_id, s.last_job_id),
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM unnest(%(names)s::text[], %(due_ats)s::timestamptz[], %(job_ids)s::bigint[])
     AS a (name, due_at, job_id)
WHERE s.name = a.name
RETURNING s.name, s.next_run_at;
