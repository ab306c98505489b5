DROP TABLE dispatcher_state;
ALTER TABLE api_keys DROP COLUMN weight;
DROP INDEX processing_jobs_active;
ALTER TABLE processing_jobs
    ADD COLUMN publish_due_at   timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN publish_attempts int NOT NULL DEFAULT 0;
CREATE INDEX processing_jobs_publish_due ON processing_jobs (publish_due_at) WHERE published_at IS NULL;
ALTER TABLE processing_jobs DROP CONSTRAINT released_within_total;
ALTER TABLE processing_jobs
    DROP COLUMN released_images, DROP COLUMN release_row, DROP COLUMN release_position,
    DROP COLUMN first_released_at, DROP COLUMN last_released_at;
