-- depends: 0004_job_options
-- Image ids are made by PostgreSQL as a job's images are copied in: os.urandom per image was a
-- fifth of the API's time on a 100,000-row upload.
ALTER TABLE images ALTER COLUMN id SET DEFAULT gen_random_uuid();
