-- 0006_serial_claim: serial keys checked by three functions, so the claim stays one
-- statement that plans almost like a claim without serial keys.
--
-- Postgres plans the claim anew on every call (its generic plan, with LIMIT a parameter,
-- is worse than any custom one), so every table reference in the claim costs planning
-- time, also when no job has a key: the head-of-key and key-running checks written as
-- NOT EXISTS subqueries made a keyless claim 1.3x as expensive. Behind a function call
-- the planner sees one expression; PL/pgSQL caches the plans of the queries inside for
-- the session, and the functions run only for jobs that have a key.

-- The keys running a job now, as one jsonb object (key -> true), read once per claim:
-- the claim tests a keyed job against it first (`?` is a binary search over the
-- object's sorted keys), so a busy key's backlog, which the claim's scan must walk past
-- in claim order, costs a lookup per job instead of a function call per job (50,000
-- jobs of a busy key ahead of the work: 6 ms per claim, against 164 ms with
-- serial_job_is_next alone; python -m bench.serialcost).
CREATE FUNCTION {schema}.running_serial_keys() RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_object_agg(k.key, true), '{}'::jsonb)
            FROM {schema}.serial_keys k
            WHERE k.running_job_id IS NOT NULL);
END;
$$;

-- Keys are kept once created, so the table grows with every key ever used; the running
-- ones are few (one per running keyed job) and this index finds them.
CREATE INDEX serial_keys_running_idx ON {schema}.serial_keys (key)
    WHERE running_job_id IS NOT NULL;

-- Is this job its key's next one? No job of the key runs, and no due available job of
-- the key sorts before it. STABLE: it reads the claim's own snapshot. The claim uses it
-- to pick candidates, so that a busy key cannot fill the LIMIT and starve other work;
-- it is not the guard (a snapshot cannot see a claim that committed after it was taken):
-- take_serial_key is.
CREATE FUNCTION {schema}.serial_job_is_next(
    p_key text, p_priority smallint, p_run_at timestamptz, p_id bigint, p_now timestamptz
) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN NOT EXISTS (
               SELECT 1 FROM {schema}.serial_keys k
               WHERE k.key = p_key AND k.running_job_id IS NOT NULL)
       AND NOT EXISTS (
               SELECT 1 FROM {schema}.jobs e
               WHERE e.serial_key = p_key
                 AND e.state = 'available'
                 AND e.run_at <= p_now
                 AND (e.priority, e.run_at, e.id) < (p_priority, p_run_at, p_id));
END;
$$;

-- Marks p_key as running job p_job_id, if the key is free; says whether it did. The key
-- row is locked FOR UPDATE SKIP LOCKED, which reads its newest version: of two slots
-- claiming at once, one takes the key and the other skips the job, without waiting.
-- The claim calls it from its UPDATE's WHERE clause, on the job row it has locked. If
-- that row changed since the statement's snapshot, Postgres re-evaluates the WHERE
-- clause on the newest version (EvalPlanQual) and calls this a second time for the same
-- job: so a key already marked with this job counts as taken by it, not as busy. That
-- answer is safe only because the claim holds the job's row lock (its candidates CTE is
-- FOR UPDATE) before it calls this: no other claim can be taking the same job.
-- COST: the planner orders a scan's filters by cost, so the claim's `id = ANY(...)`
-- always comes first and no row outside the candidates can reach this function.
CREATE FUNCTION {schema}.take_serial_key(p_key text, p_job_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE COST 10000 AS $$
BEGIN
    PERFORM 1 FROM {schema}.serial_keys k
    WHERE k.key = p_key AND (k.running_job_id IS NULL OR k.running_job_id = p_job_id)
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    UPDATE {schema}.serial_keys SET running_job_id = p_job_id WHERE key = p_key;
    RETURN true;
END;
$$;
