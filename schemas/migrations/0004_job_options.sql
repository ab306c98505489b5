-- depends: 0003_lost_images
-- A job's options (shared/events.py JobOptions: quality, max_width, max_height, format), as the API
-- validated them. NULL for jobs stored before options existed: the processor's defaults.
ALTER TABLE processing_jobs ADD COLUMN options jsonb;
