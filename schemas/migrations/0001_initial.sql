-- The jobs, their input CSV rows, their images, and one webhook delivery per finished job.

CREATE TABLE processing_jobs (
    job_id           uuid PRIMARY KEY,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'processing', 'completed')),
    webhook_url      text,
    csv_header       jsonb NOT NULL,
    url_column       int NOT NULL,
    total_images     int NOT NULL CHECK (total_images > 0),
    processed_images int NOT NULL DEFAULT 0,
    failed_images    int NOT NULL DEFAULT 0,
    published_at     timestamptz,
    completed_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (processed_images + failed_images <= total_images)
);

-- Jobs whose image.requested events are not yet known to be in Kafka (see the API's republisher).
CREATE INDEX processing_jobs_unpublished ON processing_jobs (created_at) WHERE published_at IS NULL;

CREATE TABLE csv_rows (
    job_id     uuid NOT NULL REFERENCES processing_jobs (job_id) ON DELETE CASCADE,
    row_number int  NOT NULL,
    cells      jsonb NOT NULL,
    PRIMARY KEY (job_id, row_number)
);

CREATE TABLE images (
    id            uuid PRIMARY KEY,
    job_id        uuid NOT NULL REFERENCES processing_jobs (job_id) ON DELETE CASCADE,
    row_number    int  NOT NULL,
    position      int  NOT NULL,
    input_url     text NOT NULL,
    output_url    text,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'processed', 'failed')),
    error_code    text,
    error_message text,
    format        text,
    bytes_in      bigint,
    bytes_out     bigint,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, row_number, position)
);

CREATE TABLE webhook_deliveries (
    job_id          uuid PRIMARY KEY REFERENCES processing_jobs (job_id) ON DELETE CASCADE,
    url             text NOT NULL,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        int  NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
