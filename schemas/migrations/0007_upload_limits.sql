-- depends: 0006_fair_release
-- A key's own limits (services/api/limits.py); NULL: the settings' (IMGPIPE_UPLOADS_PER_MINUTE,
-- IMGPIPE_MAX_WAITING_IMAGES).
ALTER TABLE api_keys
    ADD COLUMN uploads_per_minute int CHECK (uploads_per_minute > 0),
    ADD COLUMN max_waiting_images int CHECK (max_waiting_images > 0);

-- A key's jobs of the last minute, for its uploads-per-minute limit.
CREATE INDEX processing_jobs_owner_created ON processing_jobs (owner_key_id, created_at);
