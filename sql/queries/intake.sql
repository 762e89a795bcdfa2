-- The named queries of the intake adapter (substrate_db.intake): the idempotency store.
-- Same conventions as queries.sql: a `-- name: <name> :one|:many|:exec` header per query,
-- `{schema}` for the schema, every value a bound parameter.


-- name: idempotency_claim :one
-- Records a key before its effect runs, inside the caller's transaction. While that
-- transaction is open, a concurrent claim of the same key waits on the primary key; once
-- it commits the waiter gets no row (the key is taken: read the stored result), and once
-- it rolls back the waiter inserts the key and runs the effect itself.
INSERT INTO {schema}.idempotency_keys (key, created_at)
VALUES (%(key)s, coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (key) DO NOTHING
RETURNING key;


-- name: idempotency_store :exec
-- Stores the result of the effect under the key this transaction claimed.
UPDATE {schema}.idempotency_keys SET result = %(result)s::jsonb WHERE key = %(key)s;


-- name: idempotency_get :one
SELECT key, result, created_at FROM {schema}.idempotency_keys WHERE key = %(key)s;


-- name: idempotency_prune :exec
-- Deletes up to %(limit)s keys created before %(before)s, oldest first, in one short
-- statement; call it again while it returns %(limit)s.
DELETE FROM {schema}.idempotency_keys
WHERE key IN (
    SELECT key FROM {schema}.idempotency_keys
    WHERE created_at < %(before)s::timestamptz
    ORDER BY created_at
    LIMIT %(limit)s
);
