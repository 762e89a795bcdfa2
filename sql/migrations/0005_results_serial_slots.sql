-- 0005_results_serial_slots: results back to the enqueuer, serial keys, slot liveness.
--
-- Adding nullable columns without defaults is a catalog-only change: no table rewrite.

ALTER TABLE {schema}.jobs
    ADD COLUMN source_id    text CHECK (source_id IS NULL OR length(source_id) BETWEEN 1 AND 200),
    ADD COLUMN serial_key   text CHECK (serial_key IS NULL OR length(serial_key) BETWEEN 1 AND 200),
    ADD COLUMN delivered_at timestamptz;

-- ---------------------------------------------------------------------------------
-- Results back to the enqueuer.

-- Lookups by source, and the delivery scan: finished, undelivered outcomes of one
-- source, oldest first.
CREATE INDEX jobs_source_idx ON {schema}.jobs (source_id) WHERE source_id IS NOT NULL;
CREATE INDEX jobs_undelivered_idx ON {schema}.jobs (source_id, finished_at, id)
    WHERE source_id IS NOT NULL AND finished_at IS NOT NULL AND delivered_at IS NULL;

-- Waiters learn that a job with a source finished: one notification per finished job,
-- payload the job id. Jobs without a source send nothing.
CREATE FUNCTION {schema}.notify_job_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_results', NEW.id::text);
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_notify_finished
    AFTER UPDATE OF state ON {schema}.jobs
    FOR EACH ROW
    WHEN (NEW.source_id IS NOT NULL AND OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL)
    EXECUTE FUNCTION {schema}.notify_job_finished();

-- ---------------------------------------------------------------------------------
-- Serial keys: jobs sharing a key run one at a time, in claim order.
--
-- A key row says which job of the key is running. The claim locks the key row with
-- FOR UPDATE SKIP LOCKED, which re-reads its newest version, so two slots claiming at
-- once can never both see the key free; a snapshot check alone could (a job claimed
-- by a transaction that committed after the claimer's snapshot is invisible to it).
CREATE TABLE {schema}.serial_keys (
    key            text PRIMARY KEY,
    running_job_id bigint
);

-- The head-of-key check: is there an available job of this key that sorts earlier?
CREATE INDEX jobs_serial_idx ON {schema}.jobs (serial_key, priority, run_at, id)
    WHERE state = 'available' AND serial_key IS NOT NULL;

-- A job of a key leaving `running` (complete, fail, retry, recovery, cancel) frees the
-- key, whichever statement moved it: one rule, in one place.
CREATE FUNCTION {schema}.free_serial_key() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE {schema}.serial_keys SET running_job_id = NULL
    WHERE key = NEW.serial_key AND running_job_id = NEW.id;
    RETURN NULL;
END;
$$;

CREATE TRIGGER jobs_free_serial_key
    AFTER UPDATE OF state ON {schema}.jobs
    FOR EACH ROW
    WHEN (OLD.serial_key IS NOT NULL AND OLD.state = 'running' AND NEW.state <> 'running')
    EXECUTE FUNCTION {schema}.free_serial_key();

-- ---------------------------------------------------------------------------------
-- Slot liveness: one row per runtime slot, written by its heartbeat.

CREATE TABLE {schema}.slots (
    slot_id        text PRIMARY KEY CHECK (length(slot_id) BETWEEN 1 AND 200),
    kinds          text[] NOT NULL DEFAULT '{}',
    host           text,
    pid            integer,
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_seen      timestamptz NOT NULL DEFAULT now(),
    interval_secs  integer NOT NULL DEFAULT 30 CHECK (interval_secs > 0),
    jobs_in_flight integer NOT NULL DEFAULT 0,
    current_job    bigint,
    error_rate     double precision NOT NULL DEFAULT 0,
    state          text NOT NULL DEFAULT 'healthy'
                   CHECK (state IN ('healthy', 'wedged', 'draining', 'gone')),
    reason         text,
    beats          bigint NOT NULL DEFAULT 0
);
