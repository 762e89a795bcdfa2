-- Both proposals together: proposal_claim_plain.sql's claim, then
-- proposal_complete_plain.sql's completion. `python -m bench.proposals`.
WITH picked AS MATERIALIZED (
    SELECT c.id
    FROM unnest(:kinds::text[]) AS k (kind)
    CROSS JOIN LATERAL (
        SELECT j.id, j.priority, j.run_at
        FROM {schema}.jobs j
        WHERE j.state = 'available' AND j.kind = k.kind AND j.run_at <= now()
        ORDER BY j.priority, j.run_at, j.id
        LIMIT :batch
        FOR UPDATE OF j SKIP LOCKED
    ) AS c
    ORDER BY c.priority, c.run_at, c.id
    LIMIT :batch
),
claimed AS (
    UPDATE {schema}.jobs j
    SET state = 'running',
        claim_epoch = j.claim_epoch + 1,
        attempts = j.attempts + 1,
        claimed_by = 'pgbench',
        lease_expires_at = now() + make_interval(secs => :lease),
        updated_at = now()
    WHERE j.id = ANY(ARRAY(SELECT id FROM picked))
    RETURNING j.id, j.kind, j.payload, j.priority, j.run_at, j.attempts, j.max_attempts,
              j.claim_epoch, j.claimed_by, j.lease_expires_at, j.dedupe_key, j.created_at,
              j.source_id, j.serial_key
)
SELECT coalesce(array_agg(id ORDER BY id), '{}') AS ids,
       coalesce(array_agg(claim_epoch ORDER BY id), '{}') AS epochs,
       coalesce(array_agg(NULL::text), '{}') AS results, count(*) AS claimed
FROM claimed
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
