-- The named queries of substrate-db: the only SQL the library runs besides migrations.
--
-- Each query starts with a header `-- name: <name> :<returns>` where <returns> is
--   :one    one row or none
--   :many   any number of rows
--   :exec   no rows (the row count is returned)
-- `{schema}` is replaced by the quoted, validated schema identifier when the queries are
-- loaded; every value is a bound parameter (%(name)s). A literal percent sign is written %%.
-- Time comes from Postgres: `coalesce(%(now)s::timestamptz, now())` lets tests move the
-- clock through a parameter; in production `now` is NULL.


-- name: enqueue_jobs :many
-- Inserts jobs given as parallel arrays, in one round trip for any number of jobs.
-- Returns one row per input, in input order: the job's id, and whether it was inserted.
-- A job whose dedupe_key is held by an unfinished job is not inserted; that job's id is
-- returned instead. The conflict arm is DO UPDATE, not DO NOTHING, because DO UPDATE
-- returns the existing row even when a concurrent transaction committed it after this
-- statement's snapshot; duplicate keys inside one call are folded to their first
-- occurrence first, as DO UPDATE may touch a row only once per statement.
-- Ids are drawn in input order (before the window function reorders rows), so a batch
-- is claimed in the order it was given.
WITH numbered AS MATERIALIZED (
    SELECT t.ord, t.kind, t.payload, t.priority, t.run_at, t.max_attempts, t.dedupe_key,
           t.source_id, t.serial_key, nextval('{schema}.jobs_id_seq') AS new_id
    FROM unnest(%(kinds)s::text[], %(payloads)s::text[], %(priorities)s::smallint[],
                %(run_ats)s::timestamptz[], %(max_attempts)s::integer[], %(dedupe_keys)s::text[],
                %(source_ids)s::text[], %(serial_keys)s::text[])
         WITH ORDINALITY AS t(kind, payload, priority, run_at, max_attempts, dedupe_key,
                              source_id, serial_key, ord)
),
input AS MATERIALIZED (
    SELECT n.*, row_number() OVER (PARTITION BY n.dedupe_key ORDER BY n.ord) AS key_rank
    FROM numbered n
),
-- A serial key's row must exist before any claim can lock it.
keys AS (
    INSERT INTO {schema}.serial_keys (key)
    SELECT DISTINCT i.serial_key FROM input i WHERE i.serial_key IS NOT NULL
    ON CONFLICT (key) DO NOTHING
),
ins AS (
    INSERT INTO {schema}.jobs AS j
        (id, kind, payload, priority, run_at, max_attempts, dedupe_key, source_id, serial_key,
         created_at, updated_at)
    SELECT i.new_id, i.kind, i.payload::jsonb, i.priority,
           coalesce(i.run_at, %(now)s::timestamptz, now()), i.max_attempts, i.dedupe_key,
           i.source_id, i.serial_key,
           coalesce(%(now)s::timestamptz, now()), coalesce(%(now)s::timestamptz, now())
    FROM input i
    WHERE i.dedupe_key IS NULL OR i.key_rank = 1
    ORDER BY i.ord
    ON CONFLICT (dedupe_key) WHERE state IN ('available', 'running') AND dedupe_key IS NOT NULL
    DO UPDATE SET dedupe_key = EXCLUDED.dedupe_key
    RETURNING j.id, j.dedupe_key
)
SELECT input.ord,
       coalesce(by_key.id, by_id.id) AS id,
       coalesce(by_key.id, by_id.id) = input.new_id AS inserted
FROM input
LEFT JOIN ins AS by_id ON by_id.id = input.new_id
LEFT JOIN ins AS by_key ON input.dedupe_key IS NOT NULL AND by_key.dedupe_key = input.dedupe_key
ORDER BY input.ord;


-- name: claim_jobs :many
-- Claims up to %(limit)s available jobs of the given kinds whose run_at has come, in
-- claim order (priority, run_at, id). The MATERIALIZED fence makes the LIMIT bind the
-- locked rows: without it the planner may join the subquery into the UPDATE and lock or
-- update more rows than asked. SKIP LOCKED lets concurrent claimers pass each other;
-- FOR UPDATE re-checks the WHERE clause on the newest row version, so a row claimed by
-- another slot meanwhile is never taken twice. Rows come back in no particular order.
--
-- Kinds are scanned one by one (a LATERAL per kind), so each scan walks the partial
-- index (kind, priority, run_at, id) in claim order and stops after LIMIT rows; a single
-- `kind = ANY(...)` scan cannot be ordered by that index and sorts the whole backlog.
-- With several kinds, up to LIMIT rows per kind are locked for the statement's duration
-- and the best LIMIT of them claimed; the rest are released at commit.
--
-- Serial keys (migration 0006): a job with a key is a candidate only when, in this
-- snapshot, its key runs nothing (running_serial_keys, read once, and only if a keyed
-- job is met) and it is its key's next job (serial_job_is_next), so a busy key cannot
-- fill the LIMIT; the UPDATE then claims it only if take_serial_key marks its key as
-- running it, under the key row's lock. Candidates are heads of distinct keys, so a
-- batch takes at most one job per key. For a job without a key, none of this runs: a
-- keyless claim plans and runs like a claim that knows nothing of serial keys.
-- take_serial_key's "already taken by this job" answer is safe only because the
-- candidates CTE holds each job's row lock before the UPDATE reaches it: keep the
-- FOR UPDATE, and keep the UPDATE to the candidates' ids.
WITH candidates AS MATERIALIZED (
    SELECT c.id
    FROM unnest(%(kinds)s::text[]) AS k (kind)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs j
        WHERE j.state = 'available'
          AND j.kind = k.kind
          AND j.run_at <= coalesce(%(now)s::timestamptz, now())
          AND (j.serial_key IS NULL
               OR (NOT ((SELECT {schema}.running_serial_keys()) ? j.serial_key)
                   AND {schema}.serial_job_is_next(j.serial_key, j.priority, j.run_at, j.id,
                                                   coalesce(%(now)s::timestamptz, now()))))
        ORDER BY j.priority, j.run_at, j.id
        LIMIT %(limit)s
        FOR UPDATE OF j SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT %(limit)s
)
UPDATE {schema}.jobs j
SET state = 'running',
    claim_epoch = j.claim_epoch + 1,
    attempts = j.attempts + 1,
    claimed_by = %(slot_id)s,
    lease_expires_at = coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_secs)s),
    updated_at = coalesce(%(now)s::timestamptz, now())
-- `= ANY(ARRAY(...))`, not a join with candidates: the join's generic plan is a hash
-- join over the whole table, so Postgres would never consider caching this plan.
-- CASE, not OR: it fixes the order, so the key is taken only for a job that has one.
WHERE j.id = ANY(ARRAY(SELECT c.id FROM candidates c))
  AND CASE WHEN j.serial_key IS NULL THEN true
           ELSE {schema}.take_serial_key(j.serial_key, j.id) END
RETURNING j.id, j.kind, j.payload, j.priority, j.run_at, j.attempts, j.max_attempts,
          j.claim_epoch, j.claimed_by, j.lease_expires_at, j.dedupe_key, j.created_at,
          j.source_id, j.serial_key;


-- name: set_claim_timeouts :one
-- Bounds the claim that follows in the same transaction (SET LOCAL: nothing outlives the
-- transaction, so it is safe behind PgBouncer in transaction mode). A NULL leaves that
-- setting as it is.
SELECT set_config('lock_timeout',
                  coalesce(%(lock_timeout)s::text, current_setting('lock_timeout')), true)
           AS lock_timeout,
       set_config('statement_timeout',
                  coalesce(%(statement_timeout)s::text, current_setting('statement_timeout')), true)
           AS statement_timeout;


-- name: complete_jobs :many
-- Fenced completion of a batch: a job is completed only while it is still running under
-- the presented epoch. The UPDATE re-checks its WHERE clause on the newest version of a
-- row another transaction changed meanwhile (READ COMMITTED), so a job reclaimed,
-- finished or cancelled concurrently is never overwritten. Rows are found through
-- `id = ANY(ids)`, an index scan even in a generic plan, and locked in one order by
-- every batch, so two batches cannot deadlock. Returns the applied rows only; the caller
-- reads the refused ones afterwards (`writeback_status`) to say why.
WITH input AS (
    SELECT t.ord, t.id, t.epoch, t.result
    FROM unnest(%(ids)s::bigint[], %(epochs)s::bigint[], %(results)s::text[])
         WITH ORDINALITY AS t(id, epoch, result, ord)
)
UPDATE {schema}.jobs j
SET state = 'completed',
    result = input.result::jsonb,
    lease_expires_at = NULL,
    finished_at = coalesce(%(now)s::timestamptz, now()),
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM input
WHERE j.id = ANY(%(ids)s::bigint[])
  AND j.id = input.id
  AND input.epoch > 0
  AND j.state = 'running'
  AND j.claim_epoch = input.epoch
RETURNING input.ord, j.id, j.state, j.claim_epoch, j.lease_expires_at;


-- name: fail_jobs :many
-- Fenced failure of a batch, found and fenced like complete_jobs. A retryable failure
-- with attempts left goes back to `available`, its run_at moved by retry_in seconds or,
-- when retry_in is NULL, by the backoff 15 s + attempts^4 s (attempts capped at 10) with
-- +-10%% jitter so a burst of failures does not return as a burst. Otherwise the job ends
-- `failed`. Returns the applied rows only.
WITH input AS (
    SELECT t.ord, t.id, t.epoch, t.error, t.retryable, t.retry_in
    FROM unnest(%(ids)s::bigint[], %(epochs)s::bigint[], %(errors)s::text[],
                %(retryables)s::boolean[], %(retry_ins)s::double precision[])
         WITH ORDINALITY AS t(id, epoch, error, retryable, retry_in, ord)
)
UPDATE {schema}.jobs j
SET state = CASE WHEN input.retryable AND j.attempts < j.max_attempts
                 THEN 'available' ELSE 'failed' END,
    run_at = CASE WHEN input.retryable AND j.attempts < j.max_attempts
                  THEN coalesce(%(now)s::timestamptz, now()) + make_interval(secs =>
                       coalesce(input.retry_in,
                                (15 + power(least(j.attempts, 10), 4)) * (0.9 + 0.2 * random())))
                  ELSE j.run_at END,
    claimed_by = CASE WHEN input.retryable AND j.attempts < j.max_attempts
                      THEN NULL ELSE j.claimed_by END,
    last_error = input.error,
    lease_expires_at = NULL,
    finished_at = CASE WHEN input.retryable AND j.attempts < j.max_attempts
                       THEN NULL ELSE coalesce(%(now)s::timestamptz, now()) END,
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM input
WHERE j.id = ANY(%(ids)s::bigint[])
  AND j.id = input.id
  AND input.epoch > 0
  AND j.state = 'running'
  AND j.claim_epoch = input.epoch
RETURNING input.ord, j.id, j.state, j.claim_epoch, j.lease_expires_at;


-- name: extend_leases :many
-- The heartbeat: fenced like every write-back. The lease itself is not part of the
-- fence, so a lease that expired but was not yet reclaimed can still be extended.
-- Returns the applied rows only.
WITH input AS (
    SELECT t.ord, t.id, t.epoch
    FROM unnest(%(ids)s::bigint[], %(epochs)s::bigint[]) WITH ORDINALITY AS t(id, epoch, ord)
)
UPDATE {schema}.jobs j
SET lease_expires_at = coalesce(%(now)s::timestamptz, now()) + make_interval(secs => %(lease_secs)s),
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM input
WHERE j.id = ANY(%(ids)s::bigint[])
  AND j.id = input.id
  AND input.epoch > 0
  AND j.state = 'running'
  AND j.claim_epoch = input.epoch
RETURNING input.ord, j.id, j.state, j.claim_epoch, j.lease_expires_at;


-- name: writeback_status :many
-- Why write-backs were refused: the state and epoch of those jobs now. A statement of
-- its own, so it sees what committed after the refused UPDATE began (a job that does not
-- exist has no row).
SELECT j.id, j.state, j.claim_epoch
FROM {schema}.jobs j
WHERE j.id = ANY(%(ids)s::bigint[]);


-- name: release_expired_leases :many
-- Lease recovery, one page: running jobs whose lease has passed go back to `available`
-- with run_at unchanged (claimable at once), or end `failed` when their attempts are spent.
-- Fenced like a write-back: the page is locked with FOR UPDATE SKIP LOCKED, which re-reads
-- the newest row version, and the UPDATE matches (id, claim_epoch, state = 'running'), so a
-- job completed or reclaimed between the scan and the update is never touched.
WITH expired AS MATERIALIZED (
    SELECT j.id, j.claim_epoch
    FROM {schema}.jobs j
    WHERE j.state = 'running'
      AND j.lease_expires_at <= coalesce(%(now)s::timestamptz, now())
    ORDER BY j.lease_expires_at, j.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE {schema}.jobs j
SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'failed' ELSE 'available' END,
    last_error = format('lease expired: slot %%s stopped renewing epoch %%s', j.claimed_by, j.claim_epoch),
    claimed_by = NULL,
    lease_expires_at = NULL,
    finished_at = CASE WHEN j.attempts >= j.max_attempts
                       THEN coalesce(%(now)s::timestamptz, now()) END,
    updated_at = coalesce(%(now)s::timestamptz, now())
FROM expired
WHERE j.id = expired.id
  AND j.claim_epoch = expired.claim_epoch
  AND j.state = 'running'
RETURNING j.id, j.state;


-- name: try_recovery_lock :one
-- One lease-recovery owner at a time, per schema. Transaction-scoped, so it needs no
-- session state and works behind PgBouncer in transaction mode.
SELECT pg_try_advisory_xact_lock(hashtextextended('substrate-recovery:' || %(schema)s, 0)) AS got;


-- name: db_now :one
-- The clock every lease, run_at and backoff is measured by.
SELECT now() AS now;


-- name: get_job :one
SELECT * FROM {schema}.jobs WHERE id = %(id)s;


-- name: list_jobs :many
-- Newest first. NULL filters match everything.
SELECT * FROM {schema}.jobs
WHERE (%(kind)s::text IS NULL OR kind = %(kind)s::text)
  AND (%(state)s::text IS NULL OR state = %(state)s::text)
ORDER BY id DESC
LIMIT %(limit)s;


-- name: cancel_job :one
-- Only an unfinished job can be cancelled. A running job's executor learns it at its
-- next write-back or heartbeat (reason not_running).
UPDATE {schema}.jobs
SET state = 'cancelled',
    lease_expires_at = NULL,
    finished_at = coalesce(%(now)s::timestamptz, now()),
    updated_at = coalesce(%(now)s::timestamptz, now())
WHERE id = %(id)s AND state IN ('available', 'running')
RETURNING id;


-- name: migrate_lock :one
-- Serialises migrations of one schema; held until the migration's transaction ends.
SELECT pg_advisory_xact_lock(hashtextextended('substrate-migrate:' || %(schema)s, 0)) AS locked;


-- name: migrate_bootstrap :exec
-- Creates the schema only when it is missing: CREATE SCHEMA IF NOT EXISTS is checked
-- against the database's CREATE privilege even when the schema exists, and an owner may
-- have been handed a pre-created schema and nothing more.
DO $bootstrap$
BEGIN
    IF to_regnamespace('{schema}') IS NULL THEN
        CREATE SCHEMA {schema};
    END IF;
END
$bootstrap$;
CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);


-- name: migrations_applied :many
SELECT version, name, checksum, applied_at
FROM {schema}.schema_migrations
ORDER BY version;


-- name: migration_record :exec
INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES (%(version)s, %(name)s, %(checksum)s);


-- name: migrations_table_exists :one
-- Lets `migration_status` answer for a database that was never migrated, without creating anything.
SELECT to_regclass(%(table)s) IS NOT NULL AS present;
