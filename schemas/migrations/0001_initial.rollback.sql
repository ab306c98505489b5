DROP TABLE webhook_deliveries;
DROP TABLE images;
DROP TABLE csv_rows;
DROP TABLE processing_jobs;
