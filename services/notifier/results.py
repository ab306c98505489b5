"""Record image results in PostgreSQL and complete jobs, exactly once however often a result arrives."""

import json
import logging
import uuid

from psycopg import Connection
from psycopg.rows import DictRow

from shared.db import signal_release
from shared.events import ImageProcessed

log = logging.getLogger(__name__)

# Writers lock the jobs of their batch in job_id order first, so that concurrent notifiers
# (e.g. during a rebalance) queue up per job instead of deadlocking on images or counters.
LOCK_JOBS = "SELECT job_id FROM processing_jobs WHERE job_id = ANY(%s) ORDER BY job_id FOR UPDATE"

# Only a pending image of the event's own job changes: the first result wins, repeats change nothing.
# Answers how many images of each job changed, per outcome. The batch travels as one JSON array
# (ResultBatch.json): psycopg dumps nine Python lists several times slower.
MARK_IMAGES = """
WITH changed AS (
    UPDATE images AS i
    SET status = r.status, output_url = r.output_url, error_code = r.error_code, error_message = r.error_message,
        format = r.format, bytes_in = r.bytes_in, bytes_out = r.bytes_out, updated_at = now()
    FROM json_to_recordset(%s::json) AS r(image_id uuid, job_id uuid, status text, output_url text, error_code text,
                                          error_message text, format text, bytes_in bigint, bytes_out bigint)
    WHERE i.id = r.image_id AND i.job_id = r.job_id AND i.status = 'pending'
    RETURNING i.job_id, i.status
)
SELECT job_id, count(*) FILTER (WHERE status = 'processed') AS processed,
       count(*) FILTER (WHERE status = 'failed') AS failed
FROM changed GROUP BY job_id ORDER BY job_id
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


class ResultBatch:
    """Results ready to apply: the first one per image, and their JSON for MARK_IMAGES (made on the
    consuming thread, while the batch before is being applied)."""

    def __init__(self, results: list[ImageProcessed]):
        first_by_image: dict[uuid.UUID, ImageProcessed] = {}
        for result in results:
            first_by_image.setdefault(result.image_id, result)
        self.results = list(first_by_image.values())
        self.json = json.dumps(
            [
                {
                    "image_id": str(r.image_id),
                    "job_id": str(r.request_id),
                    "status": r.status.value,
                    "output_url": r.output_url,
                    "error_code": r.error.code if r.error else None,
                    "error_message": r.error.message if r.error else None,
                    "format": r.format,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                }
                for r in self.results
            ]
        )


def apply_results(conn: Connection[DictRow], batch: ResultBatch) -> list[uuid.UUID]:
    """Apply a batch of results in one transaction (a savepoint if the caller has one open) and
    return the jobs that this call completed; their webhook deliveries are queued in the same transaction."""
    if not batch.results:
        return []

    with conn.transaction():
        conn.execute(LOCK_JOBS, [sorted({r.request_id for r in batch.results})])
        changed = conn.execute(MARK_IMAGES, [batch.json]).fetchall()
        completed: list[uuid.UUID] = []
        if changed:
            jobs = conn.execute(
                ADD_COUNTS,
                [[c["job_id"] for c in changed], [c["processed"] for c in changed], [c["failed"] for c in changed]],
            )
            completed = sorted(job["job_id"] for job in jobs if job["status"] == "completed" and job["was_open"])
        if completed:
            conn.execute(CREATE_DELIVERIES, [completed])
        if changed:  # finished images free places in the window: the dispatcher may release more
            signal_release(conn)

        if sum(c["processed"] + c["failed"] for c in changed) < len(batch.results):
            _log_unknown(conn, batch.results)
    return completed


def _log_unknown(conn: Connection[DictRow], batch: list[ImageProcessed]) -> None:
    """Results that changed nothing are repeats, unless their image is unknown or belongs to another job."""
    job_of_image = {row["id"]: row["job_id"] for row in conn.execute(FIND_KNOWN, [[r.image_id for r in batch]])}
    for result in batch:
        known_job = job_of_image.get(result.image_id)
        if known_job is None:
            log.warning(
                "ignoring result %s for unknown image %s (request %s)",
                result.event_id,
                result.image_id,
                result.request_id,
            )
        elif known_job != result.request_id:
            log.warning(
                "ignoring result %s: image %s belongs to job %s, not request %s",
                result.event_id,
                result.image_id,
                known_job,
                result.request_id,
            )
