-- Slot liveness: each runtime slot's heartbeat upserts its row; readers derive `stale`.


-- name: slot_beat :one
-- One beat. A slot seen again after it was marked gone, or from another process, starts
-- a new life (started_at, beats reset); otherwise the row is updated in place. Time is
-- Postgres'.
INSERT INTO {schema}.slots AS s
    (slot_id, kinds, host, pid, interval_secs, jobs_in_flight, current_job, error_rate,
     state, reason, started_at, last_seen, beats)
VALUES (%(slot_id)s, %(kinds)s, %(host)s, %(pid)s, %(interval_secs)s, %(jobs_in_flight)s,
        %(current_job)s, %(error_rate)s, %(state)s, %(reason)s,
        coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now()), 1)
ON CONFLICT (slot_id) DO UPDATE
SET kinds = EXCLUDED.kinds,
    host = EXCLUDED.host,
    pid = EXCLUDED.pid,
    interval_secs = EXCLUDED.interval_secs,
    jobs_in_flight = EXCLUDED.jobs_in_flight,
    current_job = EXCLUDED.current_job,
    error_rate = EXCLUDED.error_rate,
    state = EXCLUDED.state,
    reason = EXCLUDED.reason,
    last_seen = EXCLUDED.last_seen,
    started_at = CASE WHEN s.state = 'gone' OR s.pid IS DISTINCT FROM EXCLUDED.pid
                        OR s.host IS DISTINCT FROM EXCLUDED.host
                      THEN EXCLUDED.started_at ELSE s.started_at END,
    beats = CASE WHEN s.state = 'gone' OR s.pid IS DISTINCT FROM EXCLUDED.pid
                   OR s.host IS DISTINCT FROM EXCLUDED.host
                 THEN 1 ELSE s.beats + 1 END
RETURNING s.last_seen;


-- name: slot_gone :exec
-- A slot that stops cleanly says so; a slot that dies goes stale instead.
UPDATE {schema}.slots
SET state = 'gone', reason = %(reason)s, jobs_in_flight = 0, current_job = NULL,
    last_seen = coalesce(%(now)s::timestamptz, now())
WHERE slot_id = %(slot_id)s AND pid IS NOT DISTINCT FROM %(pid)s;


-- name: list_slots :many
-- Every slot with its liveness as readers see it: `stale` when not seen for three of its
-- own intervals (a slot that died without saying so), else its reported state.
SELECT s.slot_id, s.kinds, s.host, s.pid, s.started_at, s.last_seen, s.interval_secs,
       s.jobs_in_flight, s.current_job, s.error_rate, s.reason, s.beats,
       s.state AS reported_state,
       CASE WHEN s.state <> 'gone'
                 AND s.last_seen < coalesce(%(now)s::timestamptz, now())
                                   - make_interval(secs => 3 * s.interval_secs)
            THEN 'stale' ELSE s.state END AS state
FROM {schema}.slots s
ORDER BY s.slot_id;


-- name: prune_slots :one
-- Forget slots gone (or silent) for a day.
WITH gone AS (
    DELETE FROM {schema}.slots
    WHERE last_seen < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than_secs)s)
    RETURNING 1
)
SELECT count(*) AS pruned FROM gone;
