-- Proposal (not the library's statement): the library's own claim_jobs, then a fenced
-- completion without the FOR UPDATE pre-lock: one UPDATE matched on (id, claim_epoch,
-- state = 'running'), returning the ids it applied. The client would classify the ids
-- not returned (stale_epoch, not_running, not_found) with a read, only when there are
-- any: a lost race is rare, and the fence itself is unchanged.
-- Compare with claim_complete.sql: `python -m bench.proposals`.
-- @bind kinds = :kinds
-- @bind limit = :batch
-- @bind slot_id = 'pgbench'
-- @bind lease_secs = :lease
-- @bind now = NULL
@fold claim_jobs ids = array_agg(id ORDER BY id), epochs = array_agg(claim_epoch ORDER BY id), results = array_agg(NULL::text), claimed = count(*)
\gset
UPDATE {schema}.jobs j
SET state = 'completed',
    result = u.result::jsonb,
    lease_expires_at = NULL,
    finished_at = now(),
    updated_at = now()
FROM unnest(:ids::bigint[], :epochs::bigint[], :results::text[]) AS u (id, epoch, result)
WHERE j.id = u.id AND u.epoch > 0 AND j.state = 'running' AND j.claim_epoch = u.epoch
RETURNING j.id
;
