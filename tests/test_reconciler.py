"""Lost events: images that cannot still be on their way are requested again, then fail as lost,
so every job ends; images merely queued are never taken for lost."""
from shared.events import RequestedEvents
from shared.kafka import make_producer, produce_and_wait
from tests.support.images import jpeg_bytes
from tests.support.kafka import read_to_end


def publish_without_events(pool, job_id) -> None:
    """As if Kafka had acknowledged the job's events and then lost them."""
    with pool.connection() as conn:
        conn.execute("UPDATE processing_jobs SET published_at = now() WHERE job_id = %s", [job_id])


def job_of_real_images(jobs, image_host, receiver, count: int):
    job_id, images = jobs.create(count, receiver.url)
    with jobs.pool.connection() as conn:
        for number, image in enumerate(images):
            url = image_host.add(f"/{image['id']}.jpg", jpeg_bytes(64, 48, seed=number))
            conn.execute("UPDATE images SET input_url = %s WHERE id = %s", [url, image["id"]])
    return job_id, images


def test_images_whose_events_were_lost_are_requested_again_and_the_job_completes(start_stack, jobs, image_host, receivers):
    start_stack(reconcile_interval_seconds=0.3)
    receiver = receivers()
    job_id, images = job_of_real_images(jobs, image_host, receiver, 6)
    publish_without_events(jobs.pool, job_id)

    [webhook] = receiver.wait_for(1, timeout=120)

    assert webhook.json()["processed_images"] == 6
    assert [image["requested_again"] for image in jobs.images(job_id)] == [1] * 6
    assert all(image_host.requests[f"/{image['id']}.jpg"] == 1 for image in images)


def test_images_lost_every_time_fail_as_lost_and_the_job_ends(start_stack, jobs, receivers):
    stack = start_stack(reconcile_interval_seconds=0.3, reconcile_max_requests=0)
    receiver = receivers()
    job_id, _images = jobs.create(3, receiver.url)
    publish_without_events(jobs.pool, job_id)

    [webhook] = receiver.wait_for(1, timeout=120)

    payload = webhook.json()
    assert payload["failed_images"] == 3
    assert {image["error"]["code"] for image in payload["images"]} == {"lost"}
    response = stack.api.get(f"/output_csv/{job_id}")
    assert response.status_code == 200 and response.text.count("failed:lost") == 3


def test_images_queued_behind_a_slow_host_are_not_taken_for_lost(start_stack, jobs, image_host, receivers):
    """One image at a time from a slow host: the job takes many reconciler passes, and none of its
    images is requested again, since each is still ahead of the processors' committed offsets."""
    stack = start_stack(processors=1, processor_max_in_flight=1, reconcile_interval_seconds=0.1)
    image_host.delay = 0.3
    receiver = receivers()
    job_id, _images = job_of_real_images(jobs, image_host, receiver, 8)
    images = jobs.images(job_id)
    events = RequestedEvents(job_id).encode((i["id"], i["row_number"], i["position"], i["input_url"]) for i in images)
    events = [(str(image["id"]), event) for image, event in zip(images, events)]
    produce_and_wait(make_producer(stack.settings), stack.settings.topic_requested, events)
    publish_without_events(jobs.pool, job_id)

    [webhook] = receiver.wait_for(1, timeout=120)

    assert webhook.json()["processed_images"] == 8
    assert [image["requested_again"] for image in jobs.images(job_id)] == [0] * 8
    requested = read_to_end(stack.settings.kafka_bootstrap_servers, stack.settings.topic_requested)
    assert len(requested) == 8
