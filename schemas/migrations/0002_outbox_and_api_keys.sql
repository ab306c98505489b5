-- depends: 0001_initial
-- PostgreSQL is the outbox of image.requested events, and API keys own the jobs they create.

-- When the API's relay should (re)publish a job's events if Kafka has not acknowledged them by then:
-- a lease while one API is publishing them, "now" once an attempt has failed.
ALTER TABLE processing_jobs
    ADD COLUMN publish_due_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN publish_attempts int NOT NULL DEFAULT 0;

DROP INDEX processing_jobs_unpublished;
CREATE INDEX processing_jobs_publish_due ON processing_jobs (publish_due_at) WHERE published_at IS NULL;

-- Keys are long random tokens (256 bits), so a plain SHA-256 cannot be reversed by guessing: a slow,
-- salted password hash would only add cost to every request. The raw key is never stored.
CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE,
    key_sha256 bytea NOT NULL UNIQUE CHECK (length(key_sha256) = 32),
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- The key that created the job (NULL when keys were not required); only that key can see the job.
ALTER TABLE processing_jobs ADD COLUMN owner_key_id uuid REFERENCES api_keys (id);
