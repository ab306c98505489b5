"""The API's database work: store a job, report on it, read its output.

A job's rows are committed BEFORE any of its image.requested events is produced (services/api/dispatcher.py
releases them after), so the notifier always finds an image when its result arrives.

`visible_to`: the id of the API key asking, which sees only the jobs it created; None when API keys
are not required (every job is visible).
"""

import json
import tempfile
import uuid
from collections.abc import Mapping
from typing import overload

from psycopg.types.json import Jsonb

from services.api.csv_input import CsvStream, ParsedCsv
from services.api.dispatch_view import dispatch_view
from shared.db import DictPool, signal_release
from shared.events import JobOptions
from shared.outcomes import ImageOutcome

IMAGES_SPOOL_MEMORY_BYTES = 4 * 1024 * 1024  # a larger job's images wait on disk for their COPY
COPY_CHUNK_CHARS = 256 * 1024
COPY_BATCH_ROWS = 1000  # CSV rows handed to COPY at a time (its text format, written here)
# A job created by another key is reported exactly like a job that does not exist.
VISIBLE = "job_id = %(job_id)s AND (%(visible_to)s::uuid IS NULL OR owner_key_id = %(visible_to)s::uuid)"


@overload
def insert_job(
    pool: DictPool,
    parsed: ParsedCsv | CsvStream,
    webhook_url: str | None,
    owner_key_id: uuid.UUID | None = None,
    job_id: None = None,
    options: JobOptions | None = None,
) -> tuple[uuid.UUID, int]: ...
@overload
def insert_job(
    pool: DictPool,
    parsed: ParsedCsv | CsvStream,
    webhook_url: str | None,
    owner_key_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
    options: JobOptions | None = None,
) -> tuple[uuid.UUID, int] | None: ...
def insert_job(
    pool: DictPool,
    parsed: ParsedCsv | CsvStream,
    webhook_url: str | None,
    owner_key_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
    options: JobOptions | None = None,
) -> tuple[uuid.UUID, int] | None:
    """Insert the job, its CSV rows and its images in one transaction, none of them released yet, and
    wake the dispatcher as it commits. Returns (job_id, total_images). The rows are read as they are written
    (a CsvStream's rows raise their CsvError on the way: the transaction is rolled back and nothing is stored), and the images wait
    in a temporary file for their own COPY, so memory stays bounded whatever the size of the CSV.
    job_id: the id a producer chose (jobs over Kafka); None if a job with that id exists already."""
    job_id = job_id or uuid.uuid4()
    with (
        pool.connection() as conn,
        conn.transaction(),
        conn.cursor() as cur,
        tempfile.SpooledTemporaryFile(max_size=IMAGES_SPOOL_MEMORY_BYTES, mode="w+", newline="") as images,
    ):
        # total_images is known once every row is read: 1 meets the CHECK until then (nobody sees it before commit)
        cur.execute(
            "INSERT INTO processing_jobs (job_id, webhook_url, csv_header, url_column, total_images, owner_key_id, options)"
            " VALUES (%s, %s, %s, %s, 1, %s, %s) ON CONFLICT (job_id) DO NOTHING",
            (
                job_id,
                webhook_url,
                Jsonb(parsed.header),
                parsed.url_column,
                owner_key_id,
                Jsonb((options or JobOptions()).model_dump()),
            ),
        )
        if cur.rowcount == 0:
            return None
        total_images = 0
        job = str(job_id)
        with cur.copy("COPY csv_rows (job_id, row_number, cells) FROM STDIN") as copy:
            lines = []
            for row in parsed.rows:
                lines.append(f"{job}\t{row.row_number}\t{_copy_text(json.dumps(row.cells, ensure_ascii=False))}\n")
                for position, url in enumerate(row.urls, start=1):
                    images.write(f"{job}\t{row.row_number}\t{position}\t{_copy_text(url)}\n")
                total_images += len(row.urls)
                if len(lines) == COPY_BATCH_ROWS:
                    copy.write("".join(lines))
                    lines.clear()
            copy.write("".join(lines))
        images.seek(0)
        with cur.copy(
            "COPY images (job_id, row_number, position, input_url) FROM STDIN"
        ) as copy:  # ids: gen_random_uuid()
            while chunk := images.read(COPY_CHUNK_CHARS):
                copy.write(chunk)
        cur.execute("UPDATE processing_jobs SET total_images = %s WHERE job_id = %s", (total_images, job_id))
        signal_release(conn)
    return job_id, total_images


def _copy_text(value: str) -> str:
    """A value in COPY's text format."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def get_job(pool: DictPool, job_id: uuid.UUID, visible_to: uuid.UUID | None) -> dict | None:
    """The job's row with its counts, or None if there is no such job visible to the key."""
    with pool.connection() as conn:
        job = conn.execute(
            "SELECT job_id, status, webhook_url, total_images, processed_images, failed_images, published_at,"
            " created_at, updated_at, completed_at, options, owner_key_id, released_images, first_released_at"
            f" FROM processing_jobs WHERE {VISIBLE}",
            {"job_id": job_id, "visible_to": visible_to},
        ).fetchone()
    return job


def list_jobs(pool: DictPool, statuses: list[str], visible_to: uuid.UUID | None, limit: int) -> list[dict]:
    """The oldest `limit` jobs in these states that the key may see, oldest first."""
    with pool.connection() as conn:
        jobs = conn.execute(
            "SELECT job_id, status, published_at, total_images, processed_images, failed_images, created_at"
            " FROM processing_jobs WHERE status = ANY(%(statuses)s)"
            " AND (%(visible_to)s::uuid IS NULL OR owner_key_id = %(visible_to)s::uuid)"
            " ORDER BY created_at LIMIT %(limit)s",
            {"statuses": statuses, "visible_to": visible_to, "limit": limit},
        ).fetchall()
    return [
        {
            "request_id": str(job["job_id"]),
            "status": job["status"],
            "events": "published" if job["published_at"] else "queued",
            "counts": job_counts(job),
            "created_at": job["created_at"],
        }
        for job in jobs
    ]


def job_counts(job: Mapping) -> dict:
    done = job["processed_images"] + job["failed_images"]
    return {
        "total": job["total_images"],
        "processed": job["processed_images"],
        "failed": job["failed_images"],
        "pending": job["total_images"] - done,
    }


def get_status(pool: DictPool, job_id: uuid.UUID, visible_to: uuid.UUID | None, offset: int, limit: int) -> dict | None:
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
        dispatch = dispatch_view(conn, job)
    next_offset = offset + limit
    return {
        "request_id": str(job_id),
        "status": job["status"],
        "events": "published" if job["published_at"] else "queued",
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "completed_at": job["completed_at"],
        "counts": job_counts(job),
        "dispatch": dispatch,
        "options": job["options"],
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


def get_output_rows(pool: DictPool, job_id: uuid.UUID) -> tuple[list[str], list[dict], list[dict]] | None:
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
