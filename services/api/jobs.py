"""The API's database and Kafka work: store a job and announce its images, report on it, read its output.

A job's rows are committed BEFORE its image.requested events are produced, so the notifier always
finds an image when its result arrives. published_at stays NULL until Kafka has acknowledged every
event; republish_unpublished() covers an API crash between the commit and that acknowledgement.
"""
import logging
import uuid
from collections.abc import Mapping, Sequence

from confluent_kafka import KafkaException, Producer
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from services.api.csv_input import ParsedCsv
from shared.events import ImageRequested
from shared.faults import crash_point
from shared.kafka import DeliveryError, produce_and_wait
from shared.settings import Settings

log = logging.getLogger(__name__)


def create_job(
    pool: ConnectionPool, producer: Producer, settings: Settings, parsed: ParsedCsv, webhook_url: str | None
) -> uuid.UUID:
    """Store the job and produce one ImageRequested per image; raise DeliveryError (and keep nothing)
    when Kafka does not acknowledge them."""
    job_id, images = insert_job(pool, parsed, webhook_url)
    crash_point(settings, "api.after_job_commit")
    try:
        publish_images(producer, settings, job_id, images)
    except Exception:  # the client is told the upload failed, so the republisher must not resurrect it
        delete_job(pool, job_id)
        raise
    mark_published(pool, job_id)
    return job_id


def insert_job(pool: ConnectionPool, parsed: ParsedCsv, webhook_url: str | None) -> tuple[uuid.UUID, list[dict]]:
    """Insert the job, its CSV rows and its images in one transaction (published_at NULL)."""
    job_id = uuid.uuid4()
    images = [
        {"id": uuid.uuid4(), "row_number": row.row_number, "position": position, "input_url": url}
        for row in parsed.rows
        for position, url in enumerate(row.urls, start=1)
    ]
    with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        cur.execute(
            "INSERT INTO processing_jobs (job_id, webhook_url, csv_header, url_column, total_images)"
            " VALUES (%s, %s, %s, %s, %s)",
            (job_id, webhook_url, Jsonb(parsed.header), parsed.url_column, len(images)),
        )
        with cur.copy("COPY csv_rows (job_id, row_number, cells) FROM STDIN") as copy:
            for row in parsed.rows:
                copy.write_row((job_id, row.row_number, Jsonb(row.cells)))
        with cur.copy("COPY images (id, job_id, row_number, position, input_url) FROM STDIN") as copy:
            for image in images:
                copy.write_row((image["id"], job_id, image["row_number"], image["position"], image["input_url"]))
    return job_id, images


def publish_images(producer: Producer, settings: Settings, job_id: uuid.UUID, images: Sequence[Mapping]) -> int:
    """Produce one ImageRequested per image, keyed by image id so a job spreads over all partitions,
    on the bulk lane when the job is large; return once all are acknowledged, raise DeliveryError otherwise."""
    topic = settings.topic_requested_bulk if len(images) >= settings.bulk_job_min_images else settings.topic_requested
    messages = (
        (
            str(image["id"]),
            ImageRequested(
                request_id=job_id,
                image_id=image["id"],
                row_number=image["row_number"],
                position=image["position"],
                input_url=image["input_url"],
            )
            .model_dump_json()
            .encode(),
        )
        for image in images
    )
    try:
        return produce_and_wait(producer, topic, messages)
    except KafkaException as exc:  # produce() itself refused, e.g. on a fatal producer error
        raise DeliveryError(str(exc)) from exc


def mark_published(pool: ConnectionPool, job_id: uuid.UUID) -> None:
    with pool.connection() as conn:
        conn.execute("UPDATE processing_jobs SET published_at = now() WHERE job_id = %s", (job_id,))


def delete_job(pool: ConnectionPool, job_id: uuid.UUID) -> None:
    with pool.connection() as conn:
        conn.execute("DELETE FROM processing_jobs WHERE job_id = %s", (job_id,))  # rows and images cascade


def republish_unpublished(pool: ConnectionPool, producer: Producer, settings: Settings, older_than_seconds: float) -> int:
    """Produce again the events of jobs an API crash left unpublished; return how many jobs.

    Only jobs older than the threshold are taken, so uploads still producing are left alone; the
    row lock (SKIP LOCKED) keeps two API instances from republishing the same job."""
    republished = 0
    while True:
        with pool.connection() as conn, conn.transaction():
            job = conn.execute(
                "SELECT job_id FROM processing_jobs"
                " WHERE published_at IS NULL AND created_at < now() - make_interval(secs => %s)"
                " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
                (older_than_seconds,),
            ).fetchone()
            if job is None:
                return republished
            images = conn.execute(
                "SELECT id, row_number, position, input_url FROM images WHERE job_id = %s"
                " ORDER BY row_number, position",
                (job["job_id"],),
            ).fetchall()
            sent = publish_images(producer, settings, job["job_id"], images)
            conn.execute("UPDATE processing_jobs SET published_at = now() WHERE job_id = %s", (job["job_id"],))
        log.info("republished %d image.requested events of job %s", sent, job["job_id"])
        republished += 1


def get_job(pool: ConnectionPool, job_id: uuid.UUID) -> dict | None:
    """The job's row with its counts, or None."""
    with pool.connection() as conn:
        job = conn.execute(
            "SELECT job_id, status, webhook_url, total_images, processed_images, failed_images,"
            " created_at, updated_at, completed_at FROM processing_jobs WHERE job_id = %s",
            (job_id,),
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


def get_status(pool: ConnectionPool, job_id: uuid.UUID, offset: int, limit: int) -> dict | None:
    """The job's progress and one page of its images (ordered by row_number, position), or None."""
    job = get_job(pool, job_id)
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
        "created_at": job["created_at"],
        "updated_at": job["updated_at"],
        "completed_at": job["completed_at"],
        "counts": job_counts(job),
        "webhook": _webhook_view(job["webhook_url"], delivery),
        "images": [_image_view(image) for image in images],
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


def _image_view(image: Mapping) -> dict:
    error = None
    if image["error_code"] is not None:
        error = {"code": image["error_code"], "message": image["error_message"]}
    keys = ("row_number", "position", "input_url", "output_url", "status", "format", "bytes_in", "bytes_out")
    return {**{key: image[key] for key in keys}, "error": error}


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
