DROP INDEX images_pending;
ALTER TABLE images DROP COLUMN requested_again, DROP COLUMN requested_again_at;
