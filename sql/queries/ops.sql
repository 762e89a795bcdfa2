-- Operator queries: stats, pruning, retry. See substrate_db/ops.py for the plans.


-- name: stats_by_kind :many
-- Job counts per kind and state, with the run_at of the oldest job that is available
-- and due (NULL when none). A full pass over the table: an operator's query, not a hot path.
SELECT kind, state, count(*) AS count,
       min(run_at) FILTER (WHERE state = 'available'
                             AND run_at <= coalesce(%(now)s::timestamptz, now())) AS oldest_due
FROM {schema}.jobs
GROUP BY kind, state
ORDER BY kind, state;


-- name: stats_health :one
-- Postgres' clock, the age of the oldest available job that is due, and the running jobs
-- whose lease has passed (what lease recovery would release now).
SELECT coalesce(%(now)s::timestamptz, now()) AS now,
       (SELECT extract(epoch FROM coalesce(%(now)s::timestamptz, now()) - min(j.run_at))
        FROM {schema}.jobs j
        WHERE j.state = 'available'
          AND j.run_at <= coalesce(%(now)s::timestamptz, now()))::double precision
           AS oldest_available_age_secs,
       (SELECT count(*)
        FROM {schema}.jobs j
        WHERE j.state = 'running'
          AND j.lease_expires_at <= coalesce(%(now)s::timestamptz, now())) AS expired_leases;


-- name: prune_cutoff :one
-- The moment before which finished jobs are pruned, fixed once so every batch agrees.
SELECT coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_secs)s)
    AS cutoff;


-- name: prune_count :one
-- How many finished jobs a prune would delete (for its progress bar and --dry-run).
SELECT count(*) AS count
FROM {schema}.jobs
WHERE finished_at < %(cutoff)s::timestamptz
  AND state = ANY(%(states)s::text[]);


-- name: prune_batch :exec
-- Deletes at most %(limit)s finished jobs older than the cutoff, oldest first, through
-- the finished_at index. Small batches keep each transaction and its locks short and
-- let autovacuum keep up; SKIP LOCKED passes rows someone is retrying right now. The
-- FOR UPDATE re-reads the newest row version, so a job retried meanwhile (no longer in
-- one of the states) is never deleted. Returns the number of rows deleted.
WITH doomed AS MATERIALIZED (
    SELECT j.id
    FROM {schema}.jobs j
    WHERE j.finished_at < %(cutoff)s::timestamptz
      AND j.state = ANY(%(states)s::text[])
    ORDER BY j.finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {schema}.jobs j
USING doomed
WHERE j.id = doomed.id;


-- name: retry_job :one
-- Makes a failed or cancelled job available again, due now (an available one is just
-- made due now). A job whose attempts are spent gets one more, so it is not failed again
-- by its first error. Running and completed jobs are left alone: a running job belongs to
-- its executor, a completed one already did its work.
UPDATE {schema}.jobs
SET state = 'available',
    run_at = coalesce(%(now)s::timestamptz, now()),
    max_attempts = greatest(max_attempts, attempts + 1),
    claimed_by = NULL,
    lease_expires_at = NULL,
    finished_at = NULL,
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE id = %(id)s
  AND state IN ('available', 'failed', 'cancelled')
RETURNING *;
