"""Send each finished job's webhook (Standard Webhooks headers), retrying with exponential backoff."""

import json
import logging
import threading
import uuid
from datetime import UTC, datetime

import httpx
from psycopg import Connection
from psycopg.rows import DictRow
from standardwebhooks import Webhook

from services.notifier import metrics
from shared.addresses import AddressRule
from shared.db import DictPool
from shared.outbound import CheckedBackend, address_checked_client, total_deadline
from shared.outcomes import ImageOutcome, JobCompleted
from shared.runtime import log_context
from shared.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 600.0

# The row lock is held while the POST is in flight, so no two notifiers ever send the same delivery at once.
CLAIM_DUE = """
SELECT job_id, url, attempts FROM webhook_deliveries
WHERE status = 'pending' AND next_attempt_at <= now() AND job_id <> ALL(%s::uuid[])
ORDER BY next_attempt_at
FOR UPDATE SKIP LOCKED
LIMIT 1
"""

MARK_DELIVERED = """
UPDATE webhook_deliveries
SET status = 'delivered', attempts = attempts + 1, last_error = NULL,
    delivered_at = clock_timestamp(), updated_at = clock_timestamp()
WHERE job_id = %s
"""

MARK_FAILED_ATTEMPT = """
UPDATE webhook_deliveries
SET status = %s, attempts = %s, last_error = %s,
    next_attempt_at = clock_timestamp() + make_interval(secs => %s), updated_at = clock_timestamp()
WHERE job_id = %s
"""

JOB = "SELECT job_id, total_images, processed_images, failed_images FROM processing_jobs WHERE job_id = %s"

IMAGES = """
SELECT row_number, position, input_url, output_url, status, format, bytes_in, bytes_out, error_code, error_message
FROM images WHERE job_id = %s ORDER BY row_number, position
"""


def build_payload(conn: Connection[DictRow], job_id: uuid.UUID, public_base_url: str) -> dict:
    job = conn.execute(JOB, [job_id]).fetchone()
    assert job is not None  # a delivery's job (its foreign key)
    images = [ImageOutcome.from_row(image) for image in conn.execute(IMAGES, [job_id])]
    return JobCompleted(
        request_id=str(job["job_id"]),
        total_images=job["total_images"],
        processed_images=job["processed_images"],
        failed_images=job["failed_images"],
        output_csv_url=f"{public_base_url}/output_csv/{job['job_id']}",
        output_images=[image.output_url for image in images if image.status == "processed"],
        images=images,
    ).model_dump(mode="json")


def deliver_due(pool: DictPool, client: httpx.Client, settings: Settings, stop: threading.Event | None = None) -> int:
    """Attempt every delivery that is due, each at most once per call, one per transaction;
    return how many were attempted. Stops early once `stop` is set."""
    attempted: list[uuid.UUID] = []
    while stop is None or not stop.is_set():
        with pool.connection() as conn, conn.transaction():
            delivery = conn.execute(CLAIM_DUE, [attempted]).fetchone()
            if delivery is None:
                break
            job_id = delivery["job_id"]
            payload = build_payload(conn, job_id, settings.public_base_url)
            with log_context(request_id=job_id):
                error = _post(client, delivery["url"], job_id, payload, settings)
            attempts = delivery["attempts"] + 1
            if error is None:
                conn.execute(MARK_DELIVERED, [job_id])
                log.info(
                    "webhook for job %s delivered (attempt %d)", job_id, attempts, extra={"request_id": str(job_id)}
                )
                metrics.WEBHOOK_ATTEMPTS.labels(outcome="delivered").inc()
            else:
                gave_up = attempts >= settings.webhook_max_attempts
                delay = min(settings.webhook_backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
                conn.execute(MARK_FAILED_ATTEMPT, ["failed" if gave_up else "pending", attempts, error, delay, job_id])
                log.warning(
                    "webhook for job %s attempt %d failed: %s%s",
                    job_id,
                    attempts,
                    error,
                    "; giving up" if gave_up else f"; retrying in {delay:g}s",
                    extra={"request_id": str(job_id)},
                )
                metrics.WEBHOOK_ATTEMPTS.labels(outcome="gave_up" if gave_up else "retrying").inc()
        attempted.append(job_id)
    return len(attempted)


def make_webhook_client(settings: Settings) -> httpx.Client:
    return address_checked_client(
        CheckedBackend(AddressRule(settings.allow_private_addresses, settings.allowed_private_hosts))
    )


def _post(client: httpx.Client, url: str, job_id: uuid.UUID, payload: dict, settings: Settings) -> str | None:
    """POST the payload; return None on a 2xx answer, else what went wrong."""
    body = json.dumps(payload, separators=(",", ":"))
    sent_at = datetime.now(UTC)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": str(job_id),  # the same on every retry, so receivers can de-duplicate
        "webhook-timestamp": str(int(sent_at.timestamp())),
    }
    if settings.webhook_secret is not None:
        signer = Webhook(settings.webhook_secret.get_secret_value())
        headers["webhook-signature"] = signer.sign(str(job_id), sent_at, body)
    try:
        # Streamed so that the receiver's answer body is never read: only its status matters.
        # webhook_timeout bounds the whole request: a receiver trickling its answer cannot hold the sender.
        with (
            total_deadline(settings.webhook_timeout),
            client.stream(
                "POST",
                url,
                content=body.encode(),
                headers=headers,
                timeout=settings.webhook_timeout,
                follow_redirects=False,
            ) as response,
        ):
            status_code = response.status_code
    except httpx.TimeoutException:
        return "timeout"
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if 200 <= status_code < 300 else f"HTTP {status_code}"
