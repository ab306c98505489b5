"""Webhook delivery against real HTTP receivers on 127.0.0.1 and a real PostgreSQL."""

import base64
import json
import os
import socket
import threading
import time

import httpx
import jsonschema
import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook, WebhookVerificationError

from deploy.local.probe import free_port
from services.notifier.results import ResultBatch, apply_results
from services.notifier.webhook import MAX_BACKOFF_SECONDS, deliver_due, make_webhook_client
from shared.schemas import schema_path
from shared.settings import Settings
from tests.support.jobs import Jobs, expected_payload, result
from tests.support.settings import make_test_settings


@pytest.fixture
def settings(infra, own_database) -> Settings:
    return make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=own_database,
        public_base_url="http://imgpipe.test",
        webhook_timeout=5.0,
    )


def completed_job(jobs: Jobs, webhook_url: str, image_count: int = 3, failed_count: int = 0):
    job_id, images = jobs.create(image_count, webhook_url)
    failed_ids = {image["id"] for image in images[:failed_count]}
    with jobs.pool.connection() as conn:
        assert apply_results(conn, ResultBatch([result(job_id, i, failed=i["id"] in failed_ids) for i in images])) == [
            job_id
        ]
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
        assert deliver_due(pool, client, settings) == 1
        deliver_due(pool, client, settings)  # a delivered webhook is not sent again

    [request] = receiver.requests
    assert request.path == "/hook"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["webhook-id"] == str(job_id)
    payload = Webhook(secret).verify(request.body, request.headers)
    assert payload == expected_payload(job_id, images, failed_ids)
    jsonschema.validate(payload, json.loads(schema_path("job.completed").read_text()))  # the published contract
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
            assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == (
                "pending",
                attempts,
                "HTTP 500",
            )
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
        assert deliver_due(pool, client, settings) == 1
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

    with httpx.Client() as client:
        deliver_due(pool, client, settings)
    assert len(receiver.requests) == 1
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", 1, "timeout")


def test_unreachable_receiver_is_a_failed_attempt_with_capped_backoff(pool, settings, jobs):
    settings = settings.model_copy(update={"webhook_backoff_seconds": 100_000.0})
    job_id, _, _ = completed_job(jobs, f"http://127.0.0.1:{free_port()}/hook")

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
        assert deliver_due(pool, client, settings) == 1

    assert receiver.requests == []
    [delivery] = jobs.deliveries(job_id)
    assert delivery["status"] == "failed"
    assert delivery["last_error"].startswith("ForbiddenAddress: 127.0.0.1 resolves to 127.0.0.1")


def test_a_receiver_trickling_its_answer_is_cut_off_at_the_webhook_timeout(pool, settings, jobs):
    """Each header byte comes well within the read timeout; the attempt still ends at webhook_timeout,
    long before the receiver is done (it counts what it managed to send)."""
    settings = settings.model_copy(update={"webhook_timeout": 0.5, "allow_private_addresses": True})
    sent = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def trickle():
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    for _ in range(200):  # 10 s in all
                        conn.sendall(b"x")
                        sent.append(1)
                        time.sleep(0.05)
                except OSError:  # the sender hung up
                    pass

        receiver = threading.Thread(target=trickle, daemon=True)
        receiver.start()
        job_id, _, _ = completed_job(jobs, f"http://127.0.0.1:{listener.getsockname()[1]}/hook")
        with make_webhook_client(settings) as client:
            deliver_due(pool, client, settings)
        [delivery] = jobs.deliveries(job_id)
        assert (delivery["status"], delivery["attempts"], delivery["last_error"]) == ("pending", 1, "timeout")
        assert len(sent) < 100
