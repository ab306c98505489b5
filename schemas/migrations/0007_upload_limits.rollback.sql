DROP INDEX processing_jobs_owner_created;
ALTER TABLE api_keys DROP COLUMN uploads_per_minute, DROP COLUMN max_waiting_images;
