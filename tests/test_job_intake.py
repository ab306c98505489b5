"""Jobs from other services over Kafka: a job.requested event produced straight to Kafka, with no
API call, is stored, processed and reported like an upload; what cannot be read goes to a dead-letter
topic with the reason, for jobs (the API) and for results (the notifier)."""

import csv
import io
import json
import uuid

import psycopg

from shared.events import JobRequested
from testbed.images import jpeg_bytes
from tests.support.kafka import produce_as_another_service, read_to_end, wait_until_consumed
from tests.support.stack import JOB_TIMEOUT, wait_for_status


def test_a_job_produced_to_kafka_is_processed_and_its_webhook_sent_once(start_stack, image_host, receivers):
    stack = start_stack()
    receiver = receivers()
    urls = [image_host.add(f"/k{n}.jpg", jpeg_bytes(200, 150, n)) for n in range(3)] + [
        image_host.base_url + "/gone.jpg"
    ]
    job = JobRequested(request_id=uuid.uuid4(), image_urls=urls, webhook_url=receiver.url)

    for _ in range(2):  # a producer's retry: the same job twice
        produce_as_another_service(
            stack.settings,
            stack.settings.topic_job_requested,
            str(job.request_id).encode(),
            job.model_dump_json().encode(),
        )

    [webhook] = receiver.wait_for(1, JOB_TIMEOUT)
    payload = webhook.json()
    assert payload["request_id"] == str(job.request_id)
    assert (payload["processed_images"], payload["failed_images"]) == (3, 1)
    assert [image["input_url"] for image in payload["images"]] == urls
    status = wait_for_status(stack.api, str(job.request_id), lambda s: s["webhook"]["status"] == "delivered")
    assert status["counts"] == {"total": 4, "processed": 3, "failed": 1, "pending": 0}
    rows = list(csv.reader(io.StringIO(stack.api.get(f"/output_csv/{job.request_id}").text)))
    assert rows[0] == ["url", "Output Image Urls"]
    assert [row[0] for row in rows[1:]] == urls
    assert rows[-1][1] == "failed:http_404"
    wait_until_consumed(stack.settings, stack.settings.intake_group, [stack.settings.topic_job_requested])
    assert len(receiver.posts_to()) == 1
    assert image_host.requests["/k0.jpg"] == 1  # the repeated event created nothing new


def test_events_that_cannot_become_jobs_go_to_the_dead_letter_topic_with_the_reason(start_stack):
    stack = start_stack(processors=0)
    settings = stack.settings
    valid = dict(request_id=str(uuid.uuid4()), image_urls=["https://img.example.com/a.jpg"])
    broken = {
        b"not-json": b"{this is not json",
        b"no-images": json.dumps({**valid, "image_urls": []}).encode(),
        b"bad-url": json.dumps({**valid, "request_id": str(uuid.uuid4()), "image_urls": ["ftp://h/a.jpg"]}).encode(),
        b"no-id": json.dumps({"image_urls": ["https://img.example.com/a.jpg"]}).encode(),
    }
    for key, value in broken.items():
        produce_as_another_service(settings, settings.topic_job_requested, key, value)

    wait_until_consumed(settings, settings.intake_group, [settings.topic_job_requested])
    letters = {m.key(): m for m in read_to_end(settings, settings.topic_job_dead_letter)}
    assert set(letters) == set(broken)
    for key, letter in letters.items():
        assert letter.value() == broken[key]  # passed on unchanged
        headers = dict(letter.headers())
        assert headers["source_topic"].decode() == settings.topic_job_requested
        assert headers["error"]
    assert b"image_urls[0] is not an absolute http(s) URL" in dict(letters[b"bad-url"].headers())["error"]
    assert b"image_urls" in dict(letters[b"no-images"].headers())["error"]
    assert stack.api.get(f"/status/{valid['request_id']}").status_code == 404  # nothing stored


def test_an_event_the_database_keeps_refusing_goes_to_the_dead_letter_topic_and_the_next_is_taken(start_stack):
    stack = start_stack(processors=0)
    settings = stack.settings
    refused, following = (
        JobRequested(request_id=uuid.uuid4(), image_urls=["https://img.example.com/a.jpg"]) for _ in range(2)
    )
    with psycopg.connect(settings.database_url, autocommit=True) as conn:  # the test's own database
        conn.execute(f"""CREATE FUNCTION refuse_one_job() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.job_id = '{refused.request_id}' THEN RAISE EXCEPTION 'refused by the test''s trigger'; END IF;
                RETURN NEW;
            END $$""")
        conn.execute(
            "CREATE TRIGGER refuse_one_job BEFORE INSERT ON processing_jobs FOR EACH ROW EXECUTE FUNCTION refuse_one_job()"
        )
    for job in (refused, following):  # one key: one partition, the refused event first
        produce_as_another_service(
            settings, settings.topic_job_requested, b"same-producer", job.model_dump_json().encode()
        )

    wait_until_consumed(settings, settings.intake_group, [settings.topic_job_requested])
    [letter] = read_to_end(settings, settings.topic_job_dead_letter)
    assert letter.value() == refused.model_dump_json().encode()
    error = dict(letter.headers())["error"].decode()
    assert error.startswith("could not be stored in 3 tries") and "refused by the test's trigger" in error
    assert stack.api.get(f"/status/{refused.request_id}").status_code == 404
    assert stack.api.get(f"/status/{following.request_id}").status_code == 200


def test_results_the_notifier_cannot_read_go_to_its_dead_letter_topic_and_it_moves_on(start_stack):
    stack = start_stack(processors=0)
    settings = stack.settings
    produce_as_another_service(
        settings, settings.topic_processed, b"x", b'{"event_type": "image.processed", "status": "maybe"}'
    )

    wait_until_consumed(settings, settings.notifier_group, [settings.topic_processed])
    [letter] = read_to_end(settings, settings.topic_processed_dead_letter)
    assert letter.value() == b'{"event_type": "image.processed", "status": "maybe"}'
    error = dict(letter.headers())["error"]
    assert (
        error.startswith(b"not a valid image.processed event: ")
        and b"status: Input should be 'processed' or 'failed'" in error
    )
