-- The SQL ceiling of claim + complete: the library's own `claim_jobs` and `complete_jobs`,
-- rendered from sql/queries.sql when the bench runs (so this can never drift from the
-- library), driven by pgbench in prepared mode. Each pgbench transaction is two
-- statements, each its own transaction, exactly as the library's autocommit pool runs
-- them: claim up to :batch jobs, then complete them in one fenced write-back.
--
-- Directives (bench/ceiling.py expands them; pgbench never sees them):
--   `-- @bind NAME = EXPR`  what each %(NAME)s of the named queries becomes: a pgbench
--                           variable (sent as a parameter, like psycopg does) or a literal.
--                           `now` is NULL, as in production; pgbench cannot send a NULL
--                           parameter, so it is a literal. A parameter with no binding
--                           stops the bench with an error instead of guessing.
--   `@fold QUERY COL = AGG, ...`  QUERY with its rows folded into one row of aggregates
--                           (for \gset), by appending one CTE to the query's own WITH list.
--   `@query QUERY`          QUERY as it is.
--
-- pgbench variables come from the command line (-D): kinds, batch, lease.
-- @bind kinds = :kinds
-- @bind limit = :batch
-- @bind slot_id = 'pgbench'
-- @bind lease_secs = :lease
-- @bind now = NULL
-- @bind ids = :ids
-- @bind epochs = :epochs
-- @bind results = :results

-- Ids sorted, as the library sorts a write-back batch (one lock order for all clients);
-- result NULL, as a handler returning None.
@fold claim_jobs ids = array_agg(id ORDER BY id), epochs = array_agg(claim_epoch ORDER BY id), results = array_agg(NULL::text), claimed = count(*)
\gset
@query complete_jobs
;
