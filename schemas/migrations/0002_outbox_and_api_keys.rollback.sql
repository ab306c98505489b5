ALTER TABLE processing_jobs DROP COLUMN owner_key_id;
DROP TABLE api_keys;
DROP INDEX processing_jobs_publish_due;
CREATE INDEX processing_jobs_unpublished ON processing_jobs (created_at) WHERE published_at IS NULL;
ALTER TABLE processing_jobs DROP COLUMN publish_attempts, DROP COLUMN publish_due_at;
