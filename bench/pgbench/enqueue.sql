-- The SQL ceiling of enqueue: the library's own `enqueue_jobs`, rendered from
-- sql/queries.sql when the bench runs, one statement (one transaction) per pgbench
-- transaction, inserting as many jobs as the arrays given on the command line hold
-- (-D kinds=..., payloads=..., and so on: 1 for one by one, 1000 for bulk).
-- Directives as in claim_complete.sql.
-- @bind kinds = :kinds
-- @bind payloads = :payloads
-- @bind priorities = :priorities
-- @bind run_ats = :run_ats
-- @bind max_attempts = :max_attempts
-- @bind dedupe_keys = :dedupe_keys
-- @bind source_ids = :source_ids
-- @bind serial_keys = :serial_keys
-- @bind now = NULL

@query enqueue_jobs
;
