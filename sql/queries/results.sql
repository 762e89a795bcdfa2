-- Results back to the enqueuer: the outcomes of finished jobs, by source.
-- The source check is always in the WHERE clause, never in Python after a row was read.


-- name: fetch_results :many
-- Delivers finished, undelivered outcomes of one source, oldest first, each exactly once
-- even with several consumers: rows are locked with SKIP LOCKED (re-checked on their newest
-- version, so a row delivered meanwhile drops out) and marked delivered in this statement.
WITH picked AS MATERIALIZED (
    SELECT j.id
    FROM {schema}.jobs j
    WHERE j.source_id = %(source_id)s
      AND j.finished_at IS NOT NULL
      AND j.delivered_at IS NULL
    ORDER BY j.finished_at, j.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs j
SET delivered_at = coalesce(%(now)s::timestamptz, now())
FROM picked
WHERE j.id = picked.id
RETURNING j.id, j.kind, j.state, j.result, j.last_error, j.attempts, j.finished_at,
          j.source_id, j.delivered_at;


-- name: get_result :one
-- The outcome of one job of this source: NULL columns when the job does not exist, is
-- not finished, or belongs to another source; `foreign_job` tells the last case apart
-- (for a warning line) without returning anything of the other source's job, and
-- `pending` says the job is this source's and not finished yet (worth waiting for).
-- All three from one snapshot: read by two statements, a job finishing between them
-- would look neither finished nor pending, and a waiter would give up on it.
SELECT j.id, j.kind, j.state, j.result, j.last_error, j.attempts, j.finished_at,
       j.source_id, j.delivered_at,
       EXISTS (
           SELECT 1 FROM {schema}.jobs o
           WHERE o.id = %(id)s AND o.source_id IS DISTINCT FROM %(source_id)s
       ) AS foreign_job,
       EXISTS (
           SELECT 1 FROM {schema}.jobs p
           WHERE p.id = %(id)s AND p.source_id = %(source_id)s AND p.finished_at IS NULL
       ) AS pending
FROM (VALUES (1)) AS one (x)
LEFT JOIN {schema}.jobs j
       ON j.id = %(id)s AND j.source_id = %(source_id)s AND j.finished_at IS NOT NULL;
