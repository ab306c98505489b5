"""Webhook delivery against real HTTP receivers on 127.0.0.1 and a real PostgreSQL."""
import base64
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from services.notifier.results import apply_results
from services.notifier.webhook import MAX_BACKOFF_SECONDS, deliver_due, make_webhook_client
from shared.db import make_pool
from shared.events import ImageError, ImageProcessed, ImageStatus
from shared.settings import Settings

# --- helpers shared with test_notifier.py -------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver on 127.0.0.1 that records every request and answers with `statuses` in turn,
    then `default_status`; each answer waits `delay` seconds first."""

    def __init__(self, statuses=(), default_status=200, delay=0.0, location=None):
        self.requests: list[Received] = []
        self._statuses = list(statuses)
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    status = receiver._statuses.pop(0) if receiver._statuses else default_status
                time.sleep(delay)
                try:
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up waiting (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def wait_for(self, count: int, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.requests) >= count, f"expected {count} requests within {timeout}s, got {len(self.requests)}"
        return self.requests

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def settings(infra) -> Settings:
    """Settings for tests that need only the database (no topics of their own)."""
    return Settings(kafka_bootstrap_servers=infra.kafka_bootstrap_servers, database_url=infra.database_url,
                    public_base_url="http://imgpipe.test", webhook_timeout=5.0)


@pytest.fixture(scope="session")
def pool(infra):
    pool = make_pool(infra.database_url)
    yield pool
    pool.close()


class Jobs:
    """Creates jobs with pending images the way the API does, and deletes them after the test."""

    def __init__(self, pool):
        self.pool = pool
        self.created: list[uuid.UUID] = []

    def create(self, image_count: int, webhook_url: str | None = None) -> tuple[uuid.UUID, list[dict]]:
        """Two URLs per CSV row: image i is at row i // 2 + 1, position i % 2 + 1."""
        job_id = uuid.uuid4()
        images = [
            {"id": uuid.uuid4(), "row_number": i // 2 + 1, "position": i % 2 + 1,
             "input_url": f"http://images.test/{job_id}/{i}.jpg"}
            for i in range(image_count)
        ]
        rows = sorted({image["row_number"] for image in images})
        with self.pool.connection() as conn:
            conn.execute(
                "INSERT INTO processing_jobs (job_id, webhook_url, csv_header, url_column, total_images)"
                " VALUES (%s, %s, '[\"S. No.\", \"Product Name\", \"Input Image Urls\"]', 2, %s)",
                [job_id, webhook_url, image_count],
            )
            for row in rows:
                urls = ",".join(image["input_url"] for image in images if image["row_number"] == row)
                conn.execute(
                    "INSERT INTO csv_rows (job_id, row_number, cells) VALUES (%s, %s, jsonb_build_array(%s::text, 'x', %s::text))",
                    [job_id, row, str(row), urls],
                )
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO images (id, job_id, row_number, position, input_url) VALUES (%s, %s, %s, %s, %s)",
                    [[i["id"], job_id, i["row_number"], i["position"], i["input_url"]] for i in images],
                )
        self.created.append(job_id)
        return job_id, images

    def job(self, job_id: uuid.UUID) -> dict:
        with self.pool.connection() as conn:
            return conn.execute("SELECT * FROM processing_jobs WHERE job_id = %s", [job_id]).fetchone()

    def images(self, job_id: uuid.UUID) -> list[dict]:
        with self.pool.connection() as conn:
            return conn.execute(
                "SELECT * FROM images WHERE job_id = %s ORDER BY row_number, position", [job_id]
            ).fetchall()

    def deliveries(self, job_id: uuid.UUID) -> list[dict]:
        with self.pool.connection() as conn:
            return conn.execute("SELECT * FROM webhook_deliveries WHERE job_id = %s", [job_id]).fetchall()


@pytest.fixture
def jobs(pool):
    jobs = Jobs(pool)
    yield jobs
    with pool.connection() as conn:
        conn.execute("DELETE FROM processing_jobs WHERE job_id = ANY(%s)", [jobs.created])


@pytest.fixture
def receivers():
    """Start receivers with receivers(...); all are stopped after the test."""
    started: list[Receiver] = []

    def start(**kwargs) -> Receiver:
        started.append(Receiver(**kwargs))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def result(job_id: uuid.UUID, image: dict, failed: bool = False) -> ImageProcessed:
    """A fresh result event (new event_id each call) for one image."""
    common = dict(request_id=job_id, image_id=image["id"], row_number=image["row_number"],
                  position=image["position"], input_url=image["input_url"])
    if failed:
        return ImageProcessed(**common, status=ImageStatus.failed,
                              error=ImageError(code="http_404", message="the image URL answered 404"))
    return ImageProcessed(**common, status=ImageStatus.processed, output_url=f"http://files.test/{image['id']}.jpg",
                          format="JPEG", bytes_in=1000, bytes_out=200)


def expected_payload(job_id: uuid.UUID, images: list[dict], failed_ids=(), base_url="http://imgpipe.test") -> dict:
    return {
        "request_id": str(job_id),
        "status": "completed",
        "total_images": len(images),
        "processed_images": len(images) - len(failed_ids),
        "failed_images": len(failed_ids),
        "output_csv_url": f"{base_url}/output_csv/{job_id}",
        "output_images": [
            {
                "row_number": image["row_number"],
                "position": image["position"],
                "input_url": image["input_url"],
                "output_url": None if image["id"] in failed_ids else f"http://files.test/{image['id']}.jpg",
                "status": "failed" if image["id"] in failed_ids else "processed",
                "error": {"code": "http_404", "message": "the image URL answered 404"} if image["id"] in failed_ids else None,
            }
            for image in sorted(images, key=lambda i: (i["row_number"], i["position"]))
        ],
    }


# --- webhook tests ------------------------------------------------------------------------------


def completed_job(jobs: Jobs, webhook_url: str, image_count: int = 3, failed_count: int = 0):
    job_id, images = jobs.create(image_count, webhook_url)
    failed_ids = {image["id"] for image in images[:failed_count]}
    with jobs.pool.connection() as conn:
        assert apply_results(conn, [result(job_id, i, failed=i["id"] in failed_ids) for i in images]) == [job_id]
    return job_id, images, failed_ids


def deliver_until_settled(pool, settings, job_id, jobs: Jobs, timeout: float = 15) -> dict:
    """Call deliver_due until the job's delivery is no longer pending; return the delivery row."""
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            deliver_due(pool, client, settings)
            delivery = jobs.deliveries(job_id)[0]
            if delivery["status"] != "pending":
                return delivery
            time.sleep(0.01)
    pytest.fail(f"delivery for {job_id} still pending after {timeout}s")


def test_delivery_is_signed_and_carries_the_job_result(pool, settings, jobs, receivers):
    secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    settings = settings.model_copy(update={"webhook_secret": SecretStr(secret)})
    receiver = receivers()
    job_id, images, failed_ids = completed_job(jobs, receiver.url, image_count=3, failed_count=1)

    with httpx.Client() as client:
        assert deliver_due(pool, client, settings) >= 1
        deliver_due(pool, client, settings)  # a delivered webhook is not sent again

    [request] = receiver.requests
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["webhook-id"] == str(job_id)
    assert Webhook(secret).verify(request.body, request.headers) == expected_payload(job_id, images, failed_ids)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode()).verify(request.body, request.headers)
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("delivered", 1, None)
    assert delivery["delivered_at"] is not None


def test_failed_attempts_are_retried_with_backoff_and_the_same_webhook_id(pool, settings, jobs, receivers):
    settings = settings.model_copy(update={"webhook_backoff_seconds": 0.05})
    receiver = receivers(statuses=[500, 500, 500])
    job_id, _, _ = completed_job(jobs, receiver.url)

    retry_delays = []
    with httpx.Client() as client:
        for attempts in (1, 2, 3):
            deadline = time.monotonic() + 5
            while len(receiver.requests) < attempts and time.monotonic() < deadline:
                deliver_due(pool, client, settings)
                time.sleep(0.005)
            [delivery] = jobs.deliveries(job_id)
            assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", attempts, "HTTP 500")
            retry_delays.append((delivery["next_attempt_at"] - delivery["updated_at"]).total_seconds())
    assert retry_delays == pytest.approx([0.05, 0.1, 0.2], abs=0.001)

    delivery = deliver_until_settled(pool, settings, job_id, jobs)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("delivered", 4, None)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [str(job_id)] * 4
    assert {r.body for r in receiver.requests} == {receiver.requests[0].body}


def test_one_call_attempts_each_due_delivery_once(pool, settings, jobs, receivers):
    settings = settings.model_copy(update={"webhook_backoff_seconds": 0.000001})  # due again at once
    receiver = receivers(default_status=500)
    job_id, _, _ = completed_job(jobs, receiver.url)

    with httpx.Client() as client:
        assert deliver_due(pool, client, settings) >= 1
    assert len(receiver.requests) == 1
    assert jobs.deliveries(job_id)[0]["attempts"] == 1


def test_delivery_fails_after_max_attempts(pool, settings, jobs, receivers):
    settings = settings.model_copy(update={"webhook_backoff_seconds": 0.001, "webhook_max_attempts": 2})
    receiver = receivers(default_status=500)
    job_id, _, _ = completed_job(jobs, receiver.url)

    delivery = deliver_until_settled(pool, settings, job_id, jobs)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("failed", 2, "HTTP 500")
    with httpx.Client() as client:
        time.sleep(0.01)
        deliver_due(pool, client, settings)
    assert len(receiver.requests) == 2


def test_receiver_slower_than_the_timeout_is_a_failed_attempt(pool, settings, jobs, receivers):
    settings = settings.model_copy(update={"webhook_timeout": 0.3})
    receiver = receivers(delay=3)
    job_id, _, _ = completed_job(jobs, receiver.url)

    started = time.monotonic()
    with httpx.Client() as client:
        deliver_due(pool, client, settings)
    assert time.monotonic() - started < 2
    assert len(receiver.requests) == 1
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", 1, "timeout")


def test_unreachable_receiver_is_a_failed_attempt_with_capped_backoff(pool, settings, jobs):
    settings = settings.model_copy(update={"webhook_backoff_seconds": 100_000.0})
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job_id, _, _ = completed_job(jobs, f"http://127.0.0.1:{port}/hook")

    with httpx.Client() as client:
        deliver_due(pool, client, settings)
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"]) == ("pending", 1)
    assert delivery["last_error"].startswith("ConnectError")
    assert (delivery["next_attempt_at"] - delivery["updated_at"]).total_seconds() == pytest.approx(MAX_BACKOFF_SECONDS)


def test_redirects_are_not_followed(pool, settings, jobs, receivers):
    elsewhere = receivers()
    receiver = receivers(default_status=307, location=elsewhere.url)
    job_id, _, _ = completed_job(jobs, receiver.url)

    with httpx.Client() as client:
        deliver_due(pool, client, settings)
    assert len(receiver.requests) == 1
    assert elsewhere.requests == []
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", 1, "HTTP 307")


def test_concurrent_senders_send_a_delivery_once(pool, settings, jobs, receivers):
    receiver = receivers(delay=0.5)
    job_id, _, _ = completed_job(jobs, receiver.url)

    def send():
        with httpx.Client() as client:
            deliver_due(pool, client, settings)

    senders = [threading.Thread(target=send) for _ in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(receiver.requests) == 1
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)


def test_webhook_to_a_private_address_is_refused_without_sending(pool, settings, jobs, receivers):
    settings = settings.model_copy(update={"allow_private_addresses": False, "webhook_max_attempts": 1})
    receiver = receivers()
    job_id, _images, _failed = completed_job(jobs, receiver.url)

    with make_webhook_client(settings) as client:
        assert deliver_due(pool, client, settings) >= 1

    assert receiver.requests == []
    [delivery] = jobs.deliveries(job_id)
    assert delivery["status"] == "failed"
    assert delivery["last_error"].startswith("ForbiddenAddress: 127.0.0.1 resolves to 127.0.0.1")
