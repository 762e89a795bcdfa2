-- 0002_notify: wake idle workers when jobs are inserted.
--
-- One notification per INSERT statement, not per row: a bulk enqueue of 10,000 jobs
-- sends one message, and Postgres' per-transaction de-duplication of notifications stays
-- cheap. The payload lists the distinct kinds inserted (cut to stay under the 8000-byte
-- NOTIFY limit), so a worker can ignore kinds it does not handle. Listeners are a
-- latency optimisation only: workers still poll, so a lost notification (or a PgBouncer
-- in transaction mode, where LISTEN does not work) costs latency, never a job.

CREATE FUNCTION {schema}.notify_jobs_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    kinds text;
BEGIN
    SELECT string_agg(DISTINCT kind, ',') INTO kinds FROM inserted_rows;
    IF kinds IS NOT NULL THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '_jobs', left(kinds, 7900));
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_inserted
    AFTER INSERT ON {schema}.jobs
    REFERENCING NEW TABLE AS inserted_rows
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_jobs_inserted();
