"""Lost events: images that cannot still be on their way are requested again, then fail as lost,
so every job ends; images merely queued are never taken for lost."""

from testbed.images import jpeg_bytes
from tests.support.kafka import read_to_end


def job_of_real_images(jobs, image_host, receiver, count: int):
    job_id, images = jobs.create(count, receiver.url)
    with jobs.pool.connection() as conn:
        for number, image in enumerate(images):
            url = image_host.add(f"/{image['id']}.jpg", jpeg_bytes(64, 48, seed=number))
            conn.execute("UPDATE images SET input_url = %s WHERE id = %s", [url, image["id"]])
    return job_id, images


def test_images_whose_events_were_lost_are_requested_again_and_the_job_completes(
    start_stack, jobs, image_host, receivers
):
    receiver = receivers()
    job_id, images = job_of_real_images(jobs, image_host, receiver, 6)
    jobs.release_without_events(job_id)
    # One processor: a second one joining while the images are in flight takes their partitions over and
    # downloads them again (at least once, as promised), which would blur the count of downloads below.
    start_stack(processors=1, reconcile_interval_seconds=0.3)

    [webhook] = receiver.wait_for(1, timeout=120)

    assert webhook.json()["processed_images"] == 6
    assert [image["requested_again"] for image in jobs.images(job_id)] == [1] * 6
    assert all(image_host.requests[f"/{image['id']}.jpg"] == 1 for image in images)


def test_images_lost_every_time_fail_as_lost_and_the_job_ends(start_stack, jobs, receivers):
    receiver = receivers()
    job_id, _images = jobs.create(3, receiver.url)
    jobs.release_without_events(job_id)
    stack = start_stack(reconcile_interval_seconds=0.3, reconcile_max_requests=0)

    [webhook] = receiver.wait_for(1, timeout=120)

    payload = webhook.json()
    assert payload["failed_images"] == 3
    assert {image["error"]["code"] for image in payload["images"]} == {"lost"}
    response = stack.api.get(f"/output_csv/{job_id}")
    assert response.status_code == 200 and response.text.count("failed:lost") == 3


def test_images_queued_behind_a_slow_host_are_not_taken_for_lost(start_stack, jobs, image_host, receivers):
    """One image at a time from a slow host: the job takes many reconciler passes, and none of its
    images is requested again, since each is still ahead of the processors' committed offsets."""
    image_host.delay = 0.3
    receiver = receivers()
    job_id, _images = job_of_real_images(jobs, image_host, receiver, 8)
    stack = start_stack(processors=1, processor_max_in_flight=1, reconcile_interval_seconds=0.1)  # releases them

    [webhook] = receiver.wait_for(1, timeout=120)

    assert webhook.json()["processed_images"] == 8
    assert [image["requested_again"] for image in jobs.images(job_id)] == [0] * 8
    settings = stack.settings
    assert (
        len(read_to_end(settings, settings.topic_requested) + read_to_end(settings, settings.topic_requested_bulk)) == 8
    )
