ALTER TABLE processing_jobs DROP COLUMN options;
