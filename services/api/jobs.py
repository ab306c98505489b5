"""The API's database work: store a job, report on it, read its output.

A job's rows are committed BEFORE its image.requested events are produced (services/api/outbox.py),
so the notifier always finds an image when its result arrives.

`visible_to`: the id of the API key asking, which sees only the jobs it created; None when API keys
are not required (every job is visible).
"""
import uuid
from collections.abc import Mapping

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from services.api.csv_input import ParsedCsv
from shared.outcomes import ImageOutcome

# A job created by another key is reported exactly like a job that does not exist.
VISIBLE = "job_id = %(job_id)s AND (%(visible_to)s::uuid IS NULL OR owner_key_id = %(visible_to)s::uuid)"


def insert_job(
    pool: ConnectionPool, parsed: ParsedCsv, webhook_url: str | None, owner_key_id: uuid.UUID | None = None,
    publish_lease_seconds: float = 0, job_id: uuid.UUID | None = None,
) -> tuple[uuid.UUID, list[dict]] | None:
    """Insert the job, its CSV rows and its images in one transaction, unpublished: the outbox relay
    publishes its events after publish_lease_seconds unless the caller's attempt succeeds first.
    job_id: the id a producer chose (jobs over Kafka); None if a job with that id exists already."""
    job_id = job_id or uuid.uuid4()
    images = [
        {"id": uuid.uuid4(), "row_number": row.row_number, "position": position, "input_url": url}
        for row in parsed.rows
        for position, url in enumerate(row.urls, start=1)
    ]
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO processing_jobs (job_id, webhook_url, csv_header, url_column, total_images, owner_key_id,"
            " publish_attempts, publish_due_at) VALUES (%s, %s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (job_id) DO NOTHING",
            (job_id, webhook_url, Jsonb(parsed.header), parsed.url_column, len(images), owner_key_id,
             1 if publish_lease_seconds else 0, publish_lease_seconds),
        )
        if cur.rowcount == 0:
            return None
        with cur.copy("COPY csv_rows (job_id, row_number, cells) FROM STDIN") as copy:
            for row in parsed.rows:
                copy.write_row((job_id, row.row_number, Jsonb(row.cells)))
        with cur.copy("COPY images (id, job_id, row_number, position, input_url) FROM STDIN") as copy:
            for image in images:
                copy.write_row((image["id"], job_id, image["row_number"], image["position"], image["input_url"]))
    return job_id, images


def get_job(pool: ConnectionPool, job_id: uuid.UUID, visible_to: uuid.UUID | None) -> dict | None:
    """The job's row with its counts, or None if there is no such job visible to the key."""
    with pool.connection() as conn:
        job = conn.execute(
            "SELECT job_id, status, webhook_url, total_images, processed_images, failed_images, published_at,"
            f" created_at, updated_at, completed_at FROM processing_jobs WHERE {VISIBLE}",
            {"job_id": job_id, "visible_to": visible_to},
        ).fetchone()
    return job


def job_counts(job: Mapping) -> dict:
    done = job["processed_images"] + job["failed_images"]
    return {
        "total": job["total_images"],
        "processed": job["processed_images"],
        "failed": job["failed_images"],
        "pending": job["total_images"] - done,
    }


def get_status(
    pool: ConnectionPool, job_id: uuid.UUID, visible_to: uuid.UUID | None, offset: int, limit: int
) -> dict | None:
    """The job's progress and one page of its images (ordered by row_number, position), or None."""
    job = get_job(pool, job_id, visible_to)
    if job is None:
        return None
    with pool.connection() as conn:
        delivery = conn.execute(
            "SELECT url, status, attempts, last_error FROM webhook_deliveries WHERE job_id = %s", (job_id,)
        ).fetchone()
        images = conn.execute(
            "SELECT row_number, position, input_url, output_url, status, format, bytes_in, bytes_out,"
            " error_code, error_message FROM images WHERE job_id = %s"
            " ORDER BY row_number, position OFFSET %s LIMIT %s",
            (job_id, offset, limit),
        ).fetchall()
    next_offset = offset + limit
    return {
        "request_id": str(job_id),
        "status": job["status"],
        "events": "published" if job["published_at"] else "queued",
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "completed_at": job["completed_at"],
        "counts": job_counts(job),
        "webhook": _webhook_view(job["webhook_url"], delivery),
        "images": [ImageOutcome.from_row(image) for image in images],
        "page": {
            "offset": offset,
            "limit": limit,
            "next_offset": next_offset if next_offset < job["total_images"] else None,
        },
    }


def _webhook_view(webhook_url: str | None, delivery: Mapping | None) -> dict | None:
    if webhook_url is None:
        return None
    if delivery is None:  # the notifier creates the delivery when the job completes
        return {"url": webhook_url, "status": "waiting", "attempts": 0, "last_error": None}
    return {key: delivery[key] for key in ("url", "status", "attempts", "last_error")}


def get_output_rows(pool: ConnectionPool, job_id: uuid.UUID) -> tuple[list[str], list[dict], list[dict]] | None:
    """(header, rows, images) of the job, as render_output_csv takes them, or None."""
    with pool.connection() as conn:
        job = conn.execute("SELECT csv_header FROM processing_jobs WHERE job_id = %s", (job_id,)).fetchone()
        if job is None:
            return None
        rows = conn.execute(
            "SELECT row_number, cells FROM csv_rows WHERE job_id = %s ORDER BY row_number", (job_id,)
        ).fetchall()
        images = conn.execute(
            "SELECT row_number, position, status, output_url, error_code FROM images WHERE job_id = %s"
            " ORDER BY row_number, position",
            (job_id,),
        ).fetchall()
    return job["csv_header"], rows, images
