-- depends: 0005_image_ids_by_database
-- The dispatcher (services/api/dispatcher.py) releases a job's images into Kafka a few at a time, in
-- CSV order, at the job's fair share; the outbox's lease (publish_due_at, publish_attempts) is gone.
-- A job's release cursor is the (row_number, position) of the last image released: the images up to it
-- are in Kafka, the rest wait here. published_at: the time the last image was released.
ALTER TABLE processing_jobs
    ADD COLUMN released_images   int NOT NULL DEFAULT 0,
    ADD COLUMN release_row       int NOT NULL DEFAULT 0,
    ADD COLUMN release_position  int NOT NULL DEFAULT 0,
    ADD COLUMN first_released_at timestamptz,
    ADD COLUMN last_released_at  timestamptz;

-- Jobs the outbox had published: every image is out already.
UPDATE processing_jobs
SET released_images = total_images, release_row = 2147483647, release_position = 2147483647,
    first_released_at = published_at, last_released_at = published_at
WHERE published_at IS NOT NULL;

ALTER TABLE processing_jobs ADD CONSTRAINT released_within_total CHECK (released_images <= total_images);

DROP INDEX processing_jobs_publish_due;
ALTER TABLE processing_jobs DROP COLUMN publish_due_at, DROP COLUMN publish_attempts;

-- What the dispatcher reads on every round: the jobs not completed yet.
CREATE INDEX processing_jobs_active ON processing_jobs (created_at) WHERE status <> 'completed';

-- A key's share of the processors against other keys' (jobs without a key count as one client of weight 1).
ALTER TABLE api_keys ADD COLUMN weight real NOT NULL DEFAULT 1 CHECK (weight > 0 AND weight <= 1000);

-- What the dispatcher holding the lead last measured, for the estimates of GET /status: one row.
CREATE TABLE dispatcher_state (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    window_images        int  NOT NULL,
    images_per_second    real NOT NULL,
    released_not_finished int NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now()
);
