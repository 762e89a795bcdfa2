-- 0003_idempotency: the execution-side idempotency store used by handlers (substrate_db.intake).
--
-- The claim fence protects the job's state, not the job's effect: a job whose lease
-- expired mid-flight can run twice. A handler records a key here in the same transaction
-- as its effect; the primary key makes a second execution with the same key wait for the
-- first one's transaction and then read its result instead of repeating the effect.
--
-- `{schema}` is replaced by the quoted, validated schema identifier before this runs.
-- Append-only once released: change the schema in a new migration, never here.

CREATE TABLE {schema}.idempotency_keys (
    -- `substrate-<job id>-e<claim epoch>` (ClaimedJob.idempotency_key) or a key the
    -- handler chose, e.g. one per external side effect of a job.
    key        text        PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 200),
    -- The effect's result as JSON; SQL NULL only inside the transaction that claimed
    -- the key, before the effect returned (no other session ever sees that).
    result     jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Pruning reads keys by age.
CREATE INDEX idempotency_keys_created_idx ON {schema}.idempotency_keys (created_at);
