"""Real jobs through the real stack: the three services as processes, Kafka, PostgreSQL,
an image host and a webhook receiver on 127.0.0.1; and what survives each service's crash."""

import csv
import io
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psycopg
from PIL import Image

from deploy.local.stack import wait_for_api
from services.processor import fast_jpeg
from testbed.images import jpeg_bytes, png_bytes
from tests.support.kafka import committed_offsets, read_to_end
from tests.support.stack import (
    CRASH_TEST_SETTINGS,
    JOB_TIMEOUT,
    KILLED,
    all_images,
    assert_settled_with_one_webhook,
    upload,
    url_csv,
    wait_for_status,
)


def children_of(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            children.add(int(stat.parent.name))
    return children


def wait_for_children(pid: int, count: int, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(children := children_of(pid)) < count:
        assert time.monotonic() < deadline, f"process {pid} has {len(children)} children, not {count}"
        time.sleep(0.1)
    return children


def wait_for_exit(pids: set[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while alive := {pid for pid in pids if Path(f"/proc/{pid}").exists()}:
        assert time.monotonic() < deadline, f"processes {alive} still run"
        time.sleep(0.1)


def product_csv(rows: list[tuple[str, list[str]]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for number, (name, urls) in enumerate(rows, start=1):
        writer.writerow([number, name, ", ".join(urls)])
    return out.getvalue()


def test_a_job_of_jpegs_and_pngs_is_compressed_and_reported(running_stack, image_host, receivers):
    api, webhooks = running_stack.api, receivers()
    sources: dict[str, bytes] = {}
    rows = []
    for row in range(6):
        urls = []
        for position in range(row % 3 + 3):  # 3, 4 or 5 URLs a row: 24 images
            seed = row * 10 + position
            if position % 3 == 2:
                body, name = png_bytes(320 + seed, 200, seed, mode="RGBA" if seed % 2 else "RGB"), f"/p{seed}.png"
            else:
                body, name = jpeg_bytes(640 + seed, 480, seed), f"/j{seed}.jpg"
            urls.append(image_host.add(name, body))
            sources[urls[-1]] = body
        rows.append((f"Product {row}", urls))
    assert len(sources) >= 20

    request_id = upload(api, product_csv(rows), webhooks.url)
    hook = webhooks.wait_for(1, JOB_TIMEOUT)[0].json()

    status, images = all_images(api, request_id)
    assert status["status"] == "completed"
    assert status["counts"] == {"total": 24, "processed": 24, "failed": 0, "pending": 0}
    assert [(i["row_number"], i["position"]) for i in images] == [
        (r + 1, p + 1) for r, (_, urls) in enumerate(rows) for p in range(len(urls))
    ]
    for image in images:
        source = sources[image["input_url"]]
        output = httpx.get(image["output_url"]).content
        before, after = Image.open(io.BytesIO(source)), Image.open(io.BytesIO(output))
        after.load()
        assert (after.format, after.size, after.mode) == (before.format, before.size, before.mode)
        assert len(output) <= len(source)
        if before.format == "JPEG":
            assert len(output) < 0.8 * len(source), image["input_url"]
            assert output == fast_jpeg.reencode(source, quality=50, max_pixels=10**8)  # the fast path's output
        assert image["bytes_in"] == len(source) and image["bytes_out"] == len(output)

    output_csv = api.get(f"/output_csv/{request_id}")
    assert output_csv.status_code == 200 and output_csv.headers["content-type"].startswith("text/csv")
    lines = list(csv.reader(io.StringIO(output_csv.text)))
    assert lines[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    output_by_input = {i["input_url"]: i["output_url"] for i in images}
    for line, (number, (name, urls)) in zip(lines[1:], enumerate(rows, start=1), strict=True):
        assert line[:3] == [str(number), name, ", ".join(urls)]
        assert line[3].split(",") == [output_by_input[url] for url in urls]

    assert hook["request_id"] == request_id and hook["status"] == "completed"
    assert hook["failed_images"] == 0
    assert hook["output_images"] == [i["output_url"] for i in images]  # URL strings, in input order
    assert hook["images"] == images  # the same outcome, field for field, as the status answer's
    assert_settled_with_one_webhook(running_stack, request_id, webhooks)


def test_a_job_with_broken_urls_still_completes_and_names_each_failure(running_stack, image_host, receivers):
    api, webhooks = running_stack.api, receivers()
    good = [image_host.add(f"/ok{n}.jpg", jpeg_bytes(400, 300, n)) for n in range(3)]
    missing = image_host.base_url + "/nowhere.jpg"
    not_an_image = image_host.add("/fake.jpg", b"<html>this is not an image</html>")
    csv_text = "url\n" + "\n".join([good[0], missing, good[1], not_an_image, good[2]]) + "\n"

    request_id = upload(api, csv_text, webhooks.url)
    hook = webhooks.wait_for(1, JOB_TIMEOUT)[0].json()

    status, images = all_images(api, request_id)
    assert status["status"] == "completed"
    assert status["counts"] == {"total": 5, "processed": 3, "failed": 2, "pending": 0}
    by_url = {i["input_url"]: i for i in images}
    assert by_url[missing]["status"] == "failed" and by_url[missing]["error"]["code"] == "http_404"
    assert by_url[not_an_image]["status"] == "failed" and by_url[not_an_image]["error"]["code"] == "not_an_image"
    assert all(by_url[url]["status"] == "processed" for url in good)

    lines = list(csv.reader(io.StringIO(api.get(f"/output_csv/{request_id}").text)))
    assert [line[1] for line in lines[1:]] == [
        by_url[good[0]]["output_url"],
        "failed:http_404",
        by_url[good[1]]["output_url"],
        "failed:not_an_image",
        by_url[good[2]]["output_url"],
    ]
    assert hook["failed_images"] == 2 and hook["processed_images"] == 3
    # output_images holds URL strings only: the processed images' outputs, in input order; failures are in images
    assert hook["output_images"] == [by_url[url]["output_url"] for url in good]
    assert [(i["input_url"], i["status"]) for i in hook["images"]] == [
        (good[0], "processed"),
        (missing, "failed"),
        (good[1], "processed"),
        (not_an_image, "failed"),
        (good[2], "processed"),
    ]


def test_private_addresses_are_refused_by_default(start_stack, image_host, receivers):
    """As shipped: a webhook on a private address is refused at upload; an image on one fails unfetched."""
    stack = start_stack(allow_private_addresses=False)
    receiver = receivers()
    url = image_host.add("/local.jpg", jpeg_bytes(300, 200, 1))

    refused = stack.api.post(
        "/upload", files={"file": ("images.csv", url_csv([url]))}, data={"webhook_url": receiver.url}
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_webhook_url"
    request_id = upload(stack.api, url_csv([url]), None)
    status = wait_for_status(stack.api, request_id, lambda s: s["status"] == "completed")

    assert status["counts"] == {"total": 1, "processed": 0, "failed": 1, "pending": 0}
    assert status["images"][0]["error"]["code"] == "forbidden_address"
    assert image_host.requests == {} and receiver.posts_to() == []


def test_a_processor_killed_after_processing_and_before_acknowledging_loses_no_image(
    start_stack, image_host, receivers
):
    stack = start_stack(
        processors=1,
        **CRASH_TEST_SETTINGS,
        env_overrides={"processor-1": {"IMGPIPE_CRASH_AT": "processor.after_process:5"}},
    )
    receiver = receivers()
    image_host.delay = 0.05  # many images in flight when it dies
    urls = [image_host.add(f"/p{n}.jpg", jpeg_bytes(300, 200, n)) for n in range(30)]
    compress_workers = wait_for_children(stack.services.processes["processor-1"].pid, count=2)

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    assert stack.services.wait_exit("processor-1", JOB_TIMEOUT) == KILLED
    wait_for_exit(compress_workers)  # the killed processor's compression workers do not linger
    stack.services.env_overrides.pop("processor-1")
    stack.services.restart_exited()
    receiver.wait_for(1, JOB_TIMEOUT)

    assert_settled_with_one_webhook(stack, request_id, receiver)
    status, images = all_images(stack.api, request_id)
    assert status["counts"] == {"total": 30, "processed": 30, "failed": 0, "pending": 0}
    assert {i["input_url"] for i in images} == set(urls)
    # Work the killed processor had done but not acknowledged was not committed: it was done again.
    assert sum(image_host.requests.values()) > len(urls)


def test_a_notifier_killed_after_completing_a_job_and_before_storing_offsets_sends_one_webhook(
    start_stack, image_host, receivers
):
    stack = start_stack(
        **CRASH_TEST_SETTINGS, env_overrides={"notifier": {"IMGPIPE_CRASH_AT": "notifier.after_completing_commit"}}
    )
    settings, receiver = stack.settings, receivers()
    urls = [image_host.add(f"/n{n}.jpg", jpeg_bytes(300, 200, n)) for n in range(10)]

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    assert stack.services.wait_exit("notifier", JOB_TIMEOUT) == KILLED
    status = stack.api.get(f"/status/{request_id}").json()
    assert status["status"] == "completed"  # committed to PostgreSQL ...
    assert (status["webhook"]["status"], status["webhook"]["attempts"]) == ("pending", 0)  # ... not yet sent
    # The result that completed the job is the last image's first result; the offsets of its batch
    # were not stored, so the group's committed offset on that partition is not past it.
    first_results: dict[str, Any] = {}  # confluent_kafka Messages (untyped)
    for message in read_to_end(settings.kafka_bootstrap_servers, settings.topic_processed):
        first_results.setdefault(json.loads(message.value())["image_id"], message)
    completing = max(first_results.values(), key=lambda m: m.offset())
    assert (
        committed_offsets(settings, settings.notifier_group, settings.topic_processed)[completing.partition()]
        <= completing.offset()
    )

    stack.services.env_overrides.pop("notifier")
    stack.services.restart_exited()
    receiver.wait_for(1, JOB_TIMEOUT)

    assert_settled_with_one_webhook(stack, request_id, receiver)
    assert all_images(stack.api, request_id)[0]["counts"] == {"total": 10, "processed": 10, "failed": 0, "pending": 0}


def test_a_dispatcher_killed_after_producing_and_before_moving_its_cursors_loses_no_image(
    start_stack, image_host, receivers
):
    """The API dies in its second release round, between Kafka's acknowledgement and the cursors' move:
    the restarted API releases that round's images again (duplicates), every image is processed once
    in the database, and the webhook is sent once."""
    stack = start_stack(
        processors=1,
        dispatch_window_min_images=4,
        dispatch_window_max_images=4,
        env_overrides={"api": {"IMGPIPE_CRASH_AT": "dispatcher.after_produce:2"}},
    )
    settings, receiver = stack.settings, receivers()
    urls = [image_host.add(f"/d{n}.jpg", jpeg_bytes(300, 200, n)) for n in range(12)]
    upload_workers = wait_for_children(stack.services.processes["api"].pid, count=settings.max_concurrent_uploads)

    request_id = upload(stack.api, url_csv(urls), receiver.url)
    assert stack.services.wait_exit("api", JOB_TIMEOUT) == KILLED
    wait_for_exit(upload_workers)  # the killed API's upload workers do not linger
    with psycopg.connect(settings.database_url) as conn:
        [(released,)] = conn.execute("SELECT released_images FROM processing_jobs").fetchall()
    assert released == 5  # the first round's (the window and the job's first image beyond it); not the second's

    stack.services.env_overrides.pop("api")
    stack.services.restart_exited()
    wait_for_api(settings.public_base_url)
    receiver.wait_for(1, JOB_TIMEOUT)

    assert_settled_with_one_webhook(stack, request_id, receiver)
    assert all_images(stack.api, request_id)[0]["counts"] == {"total": 12, "processed": 12, "failed": 0, "pending": 0}
    events = read_to_end(settings, settings.topic_requested) + read_to_end(settings, settings.topic_requested_bulk)
    per_image = Counter(json.loads(message.value())["image_id"] for message in events)
    assert len(per_image) == 12 and set(per_image.values()) == {1, 2}  # the second round's images released twice
