"""The notifier: results applied exactly once in PostgreSQL, and end to end through a real Kafka."""
import base64
import logging
import os
import threading
import time
import uuid

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from pydantic import SecretStr
from standardwebhooks import Webhook

from services.notifier.consumer import run
from services.notifier.results import apply_results
from shared.kafka import make_producer, produce_and_wait
from tests.test_webhook import Jobs, expected_payload, jobs, pool, receivers, result  # noqa: F401

# --- apply_results ------------------------------------------------------------------------------


def apply(pool, results) -> list[uuid.UUID]:
    with pool.connection() as conn:
        return apply_results(conn, results)


def test_job_completes_exactly_once(pool, jobs):
    job_id, images = jobs.create(3, webhook_url="http://127.0.0.1:9/hook")

    assert apply(pool, [result(job_id, images[0]), result(job_id, images[1])]) == []
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"], job["completed_at"]) == ("processing", 2, 0, None)
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
        completed = apply(pool, [
            result(job_id, unknown_image),
            result(job_id, other_images[0]),  # another job's image under this job's request id
            result(uuid.uuid4(), images[0]),  # this job's image under an unknown request id
        ])
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

    assert apply(pool, [result(job_id, images[0]), result(job_id, images[1], failed=True),
                        result(job_id, images[2], failed=True)]) == [job_id]
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 1, 2)
    stored = jobs.images(job_id)
    assert [(i["status"], i["error_code"], i["output_url"] is None) for i in stored] == [
        ("processed", None, False), ("failed", "http_404", True), ("failed", "http_404", True)]
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
                completed.extend(apply(pool, order[start:start + 40]))
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
def notifier_settings(make_settings):
    """A results topic and consumer group of the test's own, so that no other test's results reach it."""
    return make_settings(
        public_base_url="http://imgpipe.test",
        webhook_secret=SecretStr("whsec_" + base64.b64encode(os.urandom(24)).decode()),
        webhook_backoff_seconds=0.2,
    )


class NotifierThread:
    def __init__(self, settings):
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(settings,), daemon=True)
        self.thread.start()

    def _run(self, settings):
        try:
            run(settings, self.stop_event)
        except BaseException as exc:
            self.error = exc

    def stop(self):
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the notifier did not stop within 30s"
        assert self.error is None, f"the notifier crashed: {self.error!r}"


@pytest.fixture
def notifiers():
    started: list[NotifierThread] = []

    def start(settings) -> NotifierThread:
        started.append(NotifierThread(settings))
        return started[-1]

    yield start
    for notifier in started:
        if notifier.thread.is_alive():
            notifier.stop()


def produce(settings, messages) -> None:
    """Send events (or raw bytes) keyed by request id to the results topic, as the processor does."""
    producer = make_producer(settings)
    produce_and_wait(producer, settings.topic_processed, [
        (str(m.request_id), m.model_dump_json().encode()) if not isinstance(m, tuple) else m for m in messages
    ])


def wait_until_consumed(settings, timeout: float = 30) -> None:
    """Wait until the group's committed offsets reach the end of every partition of the topic: every
    result was applied (offsets are stored only after the database commit)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap_servers})
    partitions = admin.list_topics(settings.topic_processed, timeout=10).topics[settings.topic_processed].partitions
    latest = admin.list_offsets({TopicPartition(settings.topic_processed, p): OffsetSpec.latest() for p in partitions})
    ends = {tp.partition: future.result(10).offset for tp, future in latest.items()}
    partitions = [p for p in partitions if ends[p] > 0]  # nothing to commit on an empty partition
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        request = ConsumerGroupTopicPartitions(settings.notifier_group,
                                               [TopicPartition(settings.topic_processed, p) for p in partitions])
        committed = admin.list_consumer_group_offsets([request])[settings.notifier_group].result(10)
        if all(tp.offset >= ends[tp.partition] for tp in committed.topic_partitions):
            return
        time.sleep(0.2)
    pytest.fail(f"group {settings.notifier_group} did not consume {settings.topic_processed} within {timeout}s")


def wait_for_results(jobs: Jobs, job_id, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (job := jobs.job(job_id))["processed_images"] + job["failed_images"] < count:
        assert time.monotonic() < deadline, f"job {job_id} did not reach {count} results within {timeout}s"
        time.sleep(0.05)


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
    [request] = receiver.wait_for(1, timeout=30)
    secret = notifier_settings.webhook_secret.get_secret_value()
    assert Webhook(secret).verify(request.body, request.headers) == expected_payload(job_id, images, failed_ids)
    assert request.headers["webhook-id"] == str(job_id)

    produce(notifier_settings, [result(job_id, image) for image in images])  # late repeats
    wait_until_consumed(notifier_settings)
    time.sleep(1.5)  # longer than the sender's one-second round
    assert len(receiver.requests) == 1
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 3, 1)
    assert jobs.deliveries(job_id)[0]["status"] == "delivered"


def test_restarted_notifier_loses_no_result(notifier_settings, jobs, receivers, notifiers):
    receiver = receivers()
    job_id, images = jobs.create(4, webhook_url=receiver.url)

    first = notifiers(notifier_settings)
    produce(notifier_settings, twice_interleaved(job_id, images[:2]))
    wait_for_results(jobs, job_id, count=2)
    first.stop()
    assert jobs.job(job_id)["status"] == "processing"

    produce(notifier_settings, twice_interleaved(job_id, images[2:]))
    time.sleep(0.5)
    assert jobs.job(job_id)["processed_images"] == 2  # nobody consumes while the notifier is down
    notifiers(notifier_settings)
    [request] = receiver.wait_for(1, timeout=30)
    assert request.headers["webhook-id"] == str(job_id)
    wait_until_consumed(notifier_settings)
    time.sleep(1.5)
    assert len(receiver.requests) == 1
    job = jobs.job(job_id)
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", 4, 0)
