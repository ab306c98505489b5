"""The notifier: results applied exactly once in PostgreSQL, and end to end through a real Kafka."""

import base64
import json
import logging
import os
import threading
import uuid

import pytest
from pydantic import SecretStr
from standardwebhooks import Webhook

from services.notifier.consumer import run
from services.notifier.results import ResultBatch, apply_results
from shared.kafka import make_producer, produce_and_wait
from tests.support.jobs import Jobs, expected_payload, result
from tests.support.kafka import read_to_end, wait_until_consumed
from tests.support.threads import ServiceThread

# --- apply_results ------------------------------------------------------------------------------


def apply(pool, results) -> list[uuid.UUID]:
    with pool.connection() as conn:
        return apply_results(conn, ResultBatch(results))


def test_job_completes_exactly_once(pool, jobs):
    job_id, images = jobs.create(3, webhook_url="http://127.0.0.1:9/hook")

    assert apply(pool, [result(job_id, images[0]), result(job_id, images[1])]) == []
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"], job["completed_at"]) == (
        "processing",
        2,
        0,
        None,
    )
    assert jobs.deliveries(job_id) == []

    assert apply(pool, [result(job_id, images[2])]) == [job_id]
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 3, 0)
    assert job["completed_at"] is not None
    [delivery] = jobs.deliveries(job_id)
    assert (delivery["url"], delivery["status"], delivery["attempts"]) == ("http://127.0.0.1:9/hook", "pending", 0)
    assert [i["status"] for i in jobs.images(job_id)] == ["processed"] * 3
    assert [i["output_url"] for i in jobs.images(job_id)] == [f"http://files.test/{i['id']}.jpg" for i in images]

    # Redelivered results, and new events (new event_ids) about the same images, change nothing.
    assert apply(pool, [result(job_id, image) for image in images]) == []
    assert apply(pool, [result(job_id, image, failed=True) for image in images]) == []
    assert jobs.job(job_id) == job
    assert [i["status"] for i in jobs.images(job_id)] == ["processed"] * 3
    assert len(jobs.deliveries(job_id)) == 1


def test_results_for_unknown_images_or_another_job_are_ignored(pool, jobs, caplog):
    job_id, images = jobs.create(2, webhook_url="http://127.0.0.1:9/hook")
    other_job_id, other_images = jobs.create(1, webhook_url="http://127.0.0.1:9/hook")
    unknown_image = {"id": uuid.uuid4(), "row_number": 1, "position": 1, "input_url": "http://images.test/x.jpg"}

    with caplog.at_level(logging.WARNING, logger="services.notifier.results"):
        completed = apply(
            pool,
            [
                result(job_id, unknown_image),
                result(job_id, other_images[0]),  # another job's image under this job's request id
                result(uuid.uuid4(), images[0]),  # this job's image under an unknown request id
            ],
        )
    assert completed == []
    for some_job in (job_id, other_job_id):
        job = jobs.job(some_job)
        assert (job["status"], job["processed_images"], job["failed_images"]) == ("pending", 0, 0)
        assert {i["status"] for i in jobs.images(some_job)} == {"pending"}
    assert "unknown image" in caplog.text
    assert f"belongs to job {other_job_id}" in caplog.text


def test_the_same_image_twice_in_a_batch_counts_once_and_the_first_wins(pool, jobs):
    job_id, images = jobs.create(2)

    assert apply(pool, [result(job_id, images[0]), result(job_id, images[0], failed=True)]) == []
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("processing", 1, 0)
    assert [i["status"] for i in jobs.images(job_id)] == ["processed", "pending"]

    assert apply(pool, [result(job_id, images[1]), result(job_id, images[1])]) == [job_id]
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 2, 0)


def test_failed_images_complete_the_job_with_their_reasons(pool, jobs):
    job_id, images = jobs.create(3, webhook_url="http://127.0.0.1:9/hook")

    assert apply(
        pool,
        [result(job_id, images[0]), result(job_id, images[1], failed=True), result(job_id, images[2], failed=True)],
    ) == [job_id]
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 1, 2)
    stored = jobs.images(job_id)
    assert [(i["status"], i["error_code"], i["output_url"] is None) for i in stored] == [
        ("processed", None, False),
        ("failed", "http_404", True),
        ("failed", "http_404", True),
    ]
    assert stored[1]["error_message"] == "the image URL answered 404"
    assert len(jobs.deliveries(job_id)) == 1


def test_job_without_webhook_completes_without_delivery(pool, jobs):
    job_id, images = jobs.create(1)

    assert apply(pool, [result(job_id, images[0])]) == [job_id]
    assert jobs.job(job_id)["status"] == "completed"
    assert jobs.deliveries(job_id) == []


def test_one_batch_completes_several_jobs(pool, jobs):
    created = [jobs.create(2, webhook_url="http://127.0.0.1:9/hook") for _ in range(3)]
    batch = [result(job_id, image) for job_id, images in created[:2] for image in images]
    batch.append(result(created[2][0], created[2][1][0]))

    assert apply(pool, batch) == sorted(job_id for job_id, _ in created[:2])
    assert [jobs.job(job_id)["status"] for job_id, _ in created] == ["completed", "completed", "processing"]


def test_concurrent_writers_complete_each_job_once(pool, jobs):
    """Writers apply the same results in different orders (as two notifiers might during a rebalance):
    no deadlock, every job completes exactly once, every count is exact."""
    created = [jobs.create(4, webhook_url="http://127.0.0.1:9/hook") for _ in range(40)]
    results = [result(job_id, image) for job_id, images in created for image in images]
    orders = [results, results[::-1], results[1::2] + results[::2], results[::2][::-1] + results[1::2][::-1]]
    completed: list[uuid.UUID] = []
    errors: list[Exception] = []

    def write(order):
        try:
            for start in range(0, len(order), 40):
                completed.extend(apply(pool, order[start : start + 40]))
        except Exception as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(order,)) for order in orders]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()

    assert errors == []
    assert sorted(completed) == sorted(job_id for job_id, _ in created)
    for job_id, _ in created:
        job = jobs.job(job_id)
        assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 4, 0)
        assert len(jobs.deliveries(job_id)) == 1


# --- end to end through Kafka -------------------------------------------------------------------


@pytest.fixture
def notifier_settings(make_settings, own_database):
    """A results topic, consumer group and database of the test's own, so that no other test's
    results or deliveries reach its notifier."""
    return make_settings(
        database_url=own_database,
        public_base_url="http://imgpipe.test",
        webhook_secret=SecretStr("whsec_" + base64.b64encode(os.urandom(24)).decode()),
        webhook_backoff_seconds=0.2,
    )


@pytest.fixture
def notifiers():
    """notifiers(settings) runs a notifier in a thread; all are stopped after the test, and a
    notifier that crashed fails the test."""
    started: list[ServiceThread] = []

    def start(settings) -> ServiceThread:
        started.append(ServiceThread(run, settings))
        return started[-1]

    yield start
    errors = []
    for notifier in started:
        try:
            notifier.stop()
        except AssertionError as exc:
            errors.append(exc)
    assert not errors, errors


def produce(settings, messages) -> None:
    """Send events (or raw (key, bytes) pairs) keyed by request id to the results topic, as the processor does."""
    producer = make_producer(settings)
    produce_and_wait(
        producer,
        settings.topic_processed,
        [(str(m.request_id), m.model_dump_json().encode()) if not isinstance(m, tuple) else m for m in messages],
    )


def wait_until_settled(settings, jobs: Jobs, job_id) -> dict:
    """Every result on the topic applied and the job's webhook delivered: nothing more can be sent
    for it (a delivery is posted only while pending). Returns the delivery row."""
    wait_until_consumed(settings.kafka_bootstrap_servers, settings.notifier_group, [settings.topic_processed])
    [delivery] = jobs.deliveries(job_id)
    assert delivery["status"] == "delivered", delivery
    return delivery


def twice_interleaved(job_id, images, failed_ids=()):
    """Each image's result twice (the repeat with a new event_id), repeats trailing by one image."""
    events = []
    for n, image in enumerate(images):
        events.append(result(job_id, image, failed=image["id"] in failed_ids))
        if n:
            events.append(result(job_id, images[n - 1], failed=images[n - 1]["id"] in failed_ids))
    events.append(result(job_id, images[-1], failed=images[-1]["id"] in failed_ids))
    return events


def test_duplicated_results_through_kafka_send_one_webhook(notifier_settings, jobs, receivers, notifiers):
    receiver = receivers()
    job_id, images = jobs.create(4, webhook_url=receiver.url)
    failed_ids = {images[1]["id"]}
    notifiers(notifier_settings)

    produce(notifier_settings, [(str(job_id), b"this is not an event")] + twice_interleaved(job_id, images, failed_ids))
    [request] = receiver.wait_for(1)
    secret = notifier_settings.webhook_secret.get_secret_value()
    assert Webhook(secret).verify(request.body, request.headers) == expected_payload(job_id, images, failed_ids)
    assert request.headers["webhook-id"] == str(job_id)

    produce(notifier_settings, [result(job_id, image) for image in images])  # late repeats
    delivery = wait_until_settled(notifier_settings, jobs, job_id)
    assert delivery["attempts"] == 1 and len(receiver.requests) == 1
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 3, 1)


def test_restarted_notifier_loses_no_result(notifier_settings, jobs, receivers, notifiers):
    receiver = receivers()
    job_id, images = jobs.create(4, webhook_url=receiver.url)

    first = notifiers(notifier_settings)
    produce(notifier_settings, twice_interleaved(job_id, images[:2]))
    wait_until_consumed(
        notifier_settings.kafka_bootstrap_servers, notifier_settings.notifier_group, [notifier_settings.topic_processed]
    )
    first.stop()
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"]) == ("processing", 2)

    produce(notifier_settings, twice_interleaved(job_id, images[2:]))  # while no notifier runs
    notifiers(notifier_settings)
    [request] = receiver.wait_for(1)
    assert request.headers["webhook-id"] == str(job_id)
    delivery = wait_until_settled(notifier_settings, jobs, job_id)
    assert delivery["attempts"] == 1 and len(receiver.requests) == 1
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 4, 0)


def test_results_with_fields_it_does_not_know_are_applied(notifier_settings, jobs, receivers, notifiers):
    """A newer processor may add fields anywhere, nested ones included; this notifier must still count them."""
    receiver = receivers()
    job_id, images = jobs.create(2, webhook_url=receiver.url)
    newer = []
    for event in (result(job_id, images[0]), result(job_id, images[1], failed=True)):
        document = json.loads(event.model_dump_json())
        document["trace_id"] = "abc"
        if document["error"]:
            document["error"]["retryable"] = False
        newer.append((str(job_id), json.dumps(document).encode()))
    notifiers(notifier_settings)

    produce(notifier_settings, newer)
    wait_until_settled(notifier_settings, jobs, job_id)
    assert [(i["status"], i["error_code"]) for i in jobs.images(job_id)] == [
        ("processed", None),
        ("failed", "http_404"),
    ]
    assert len(receiver.requests) == 1


def test_a_result_the_database_refuses_goes_to_the_dead_letter_topic_and_the_others_are_applied(
    notifier_settings, jobs, receivers, notifiers
):
    """A poison result (valid JSON, but text PostgreSQL cannot store) must not stall the notifier."""
    receiver = receivers()
    job_id, images = jobs.create(2, webhook_url=receiver.url)
    poison = result(job_id, images[0], failed=True)
    assert poison.error is not None  # a failed result
    poison.error.message = "NUL \x00 is no character PostgreSQL can store"
    notifiers(notifier_settings)

    produce(notifier_settings, [poison, result(job_id, images[1])])
    wait_until_consumed(
        notifier_settings.kafka_bootstrap_servers, notifier_settings.notifier_group, [notifier_settings.topic_processed]
    )
    [letter] = read_to_end(notifier_settings, notifier_settings.topic_processed_dead_letter)
    assert letter.value() == poison.model_dump_json().encode()  # passed on unchanged
    assert dict(letter.headers())["error"].startswith(
        f"the database refused image.processed {poison.event_id}".encode()
    )
    assert [i["status"] for i in jobs.images(job_id)] == ["pending", "processed"]

    produce(notifier_settings, [result(job_id, images[0])])  # the image's result sent again, repaired
    [request] = receiver.wait_for(1)
    assert request.headers["webhook-id"] == str(job_id)
    assert jobs.job(job_id)["processed_images"] == 2
