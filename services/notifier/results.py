"""Record image results in PostgreSQL and complete jobs, exactly once however often a result arrives."""
import logging
import uuid
from collections import Counter

from psycopg import Connection

from shared.events import ImageProcessed

log = logging.getLogger(__name__)

# Writers lock the jobs of their batch in job_id order first, so that concurrent notifiers
# (e.g. during a rebalance) queue up per job instead of deadlocking on images or counters.
LOCK_JOBS = "SELECT job_id FROM processing_jobs WHERE job_id = ANY(%s) ORDER BY job_id FOR UPDATE"

# Only a pending image of the event's own job changes: the first result wins, repeats change nothing.
MARK_IMAGES = """
UPDATE images AS i
SET status = r.status, output_url = r.output_url, error_code = r.error_code,
    error_message = r.error_message, format = r.format, bytes_in = r.bytes_in,
    bytes_out = r.bytes_out, updated_at = now()
FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
            %s::bigint[], %s::bigint[])
     AS r(image_id, job_id, status, output_url, error_code, error_message, format, bytes_in, bytes_out)
WHERE i.id = r.image_id AND i.job_id = r.job_id AND i.status = 'pending'
RETURNING i.id, i.job_id, i.status
"""

# A job is completed once its counts reach total_images; the counts only grow when an image leaves
# 'pending', so the sum crosses total_images in exactly one transaction: the one that returns it here.
ADD_COUNTS = """
UPDATE processing_jobs AS j
SET processed_images = j.processed_images + c.processed,
    failed_images = j.failed_images + c.failed,
    status = CASE WHEN j.processed_images + c.processed + j.failed_images + c.failed >= j.total_images
                  THEN 'completed' ELSE 'processing' END,
    completed_at = CASE WHEN j.processed_images + c.processed + j.failed_images + c.failed >= j.total_images
                        THEN now() ELSE j.completed_at END,
    updated_at = now()
FROM unnest(%s::uuid[], %s::int[], %s::int[]) AS c(job_id, processed, failed)
WHERE j.job_id = c.job_id
RETURNING j.job_id, j.status,
          j.processed_images + j.failed_images - c.processed - c.failed < j.total_images AS was_open
"""

CREATE_DELIVERIES = """
INSERT INTO webhook_deliveries (job_id, url)
SELECT job_id, webhook_url FROM processing_jobs WHERE job_id = ANY(%s) AND webhook_url IS NOT NULL
ON CONFLICT (job_id) DO NOTHING
"""

FIND_KNOWN = "SELECT id, job_id FROM images WHERE id = ANY(%s)"


def apply_results(conn: Connection, results: list[ImageProcessed]) -> list[uuid.UUID]:
    """Apply a batch of results in one transaction (a savepoint if the caller has one open) and
    return the jobs that this call completed; their webhook deliveries are queued in the same transaction."""
    first_by_image: dict[uuid.UUID, ImageProcessed] = {}
    for result in results:
        first_by_image.setdefault(result.image_id, result)
    batch = list(first_by_image.values())
    if not batch:
        return []

    with conn.transaction():
        conn.execute(LOCK_JOBS, [sorted({r.request_id for r in batch})])
        changed = conn.execute(MARK_IMAGES, _image_columns(batch)).fetchall()

        processed = Counter(row["job_id"] for row in changed if row["status"] == "processed")
        failed = Counter(row["job_id"] for row in changed if row["status"] == "failed")
        job_ids = sorted(processed.keys() | failed.keys())
        completed: list[uuid.UUID] = []
        if job_ids:
            jobs = conn.execute(ADD_COUNTS, [job_ids, [processed[j] for j in job_ids], [failed[j] for j in job_ids]])
            completed = sorted(job["job_id"] for job in jobs if job["status"] == "completed" and job["was_open"])
        if completed:
            conn.execute(CREATE_DELIVERIES, [completed])

        if len(changed) < len(batch):
            _log_unknown(conn, batch, {row["id"] for row in changed})
    return completed


def _image_columns(batch: list[ImageProcessed]) -> list[list]:
    return [
        [r.image_id for r in batch],
        [r.request_id for r in batch],
        [r.status.value for r in batch],
        [r.output_url for r in batch],
        [r.error.code if r.error else None for r in batch],
        [r.error.message if r.error else None for r in batch],
        [r.format for r in batch],
        [r.bytes_in for r in batch],
        [r.bytes_out for r in batch],
    ]


def _log_unknown(conn: Connection, batch: list[ImageProcessed], changed_ids: set[uuid.UUID]) -> None:
    """Results that changed nothing are repeats, unless their image is unknown or belongs to another job."""
    unchanged = [r for r in batch if r.image_id not in changed_ids]
    job_of_image = {row["id"]: row["job_id"] for row in conn.execute(FIND_KNOWN, [[r.image_id for r in unchanged]])}
    for result in unchanged:
        known_job = job_of_image.get(result.image_id)
        if known_job is None:
            log.warning("ignoring result %s for unknown image %s (request %s)",
                        result.event_id, result.image_id, result.request_id)
        elif known_job != result.request_id:
            log.warning("ignoring result %s: image %s belongs to job %s, not request %s",
                        result.event_id, result.image_id, known_job, result.request_id)
