-- depends: 0002_outbox_and_api_keys
-- The reconciler (services/notifier/reconciler.py): how often an image's event was produced again
-- because it was lost, and when it last was. Pending images are found through a partial index.
ALTER TABLE images
    ADD COLUMN requested_again    int NOT NULL DEFAULT 0,
    ADD COLUMN requested_again_at timestamptz;

CREATE INDEX images_pending ON images (job_id) WHERE status = 'pending';
