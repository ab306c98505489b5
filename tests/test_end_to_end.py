"""Real jobs through the real stack: the three services as processes, Kafka, PostgreSQL,
an image host and a webhook receiver on 127.0.0.1."""
import csv
import io
import time

import httpx
import pytest
from PIL import Image

from tests.support.http_servers import WebhookReceiver
from tests.support.images import jpeg_bytes, png_bytes

JOB_TIMEOUT = 120


@pytest.fixture
def webhooks():
    with WebhookReceiver() as receiver:
        yield receiver


def upload(api: httpx.Client, csv_text: str, webhook_url: str | None) -> str:
    data = {"webhook_url": webhook_url} if webhook_url else {}
    response = api.post("/upload", files={"file": ("job.csv", csv_text, "text/csv")}, data=data)
    assert response.status_code == 202, response.text
    return response.json()["request_id"]


def all_images(api: httpx.Client, request_id: str) -> tuple[dict, list[dict]]:
    images, offset = [], 0
    while offset is not None:
        page = api.get(f"/status/{request_id}", params={"offset": offset}).json()
        images += page["images"]
        offset = page["page"]["next_offset"]
    return page, images


def product_csv(rows: list[tuple[str, list[str]]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for number, (name, urls) in enumerate(rows, start=1):
        writer.writerow([number, name, ", ".join(urls)])
    return out.getvalue()


def test_a_job_of_jpegs_and_pngs_is_compressed_and_reported(running_stack, image_host, webhooks):
    settings, _services, api = running_stack
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

    request_id = upload(api, product_csv(rows), webhooks.url("/done"))
    hook = webhooks.wait_for("/done", JOB_TIMEOUT)

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
    assert [i["output_url"] for i in hook["output_images"]] == [i["output_url"] for i in images]
    time.sleep(2)  # a second webhook would be a bug; give one the time to show up
    assert len(webhooks.posts_to("/done")) == 1


def test_a_job_with_broken_urls_still_completes_and_names_each_failure(running_stack, image_host, webhooks):
    _settings, _services, api = running_stack
    good = [image_host.add(f"/ok{n}.jpg", jpeg_bytes(400, 300, n)) for n in range(3)]
    missing = image_host.base_url + "/nowhere.jpg"
    not_an_image = image_host.add("/fake.jpg", b"<html>this is not an image</html>")
    csv_text = "url\n" + "\n".join([good[0], missing, good[1], not_an_image, good[2]]) + "\n"

    request_id = upload(api, csv_text, webhooks.url("/broken"))
    hook = webhooks.wait_for("/broken", JOB_TIMEOUT)

    status, images = all_images(api, request_id)
    assert status["status"] == "completed"
    assert status["counts"] == {"total": 5, "processed": 3, "failed": 2, "pending": 0}
    by_url = {i["input_url"]: i for i in images}
    assert by_url[missing]["status"] == "failed" and by_url[missing]["error"]["code"] == "http_404"
    assert by_url[not_an_image]["status"] == "failed" and by_url[not_an_image]["error"]["code"] == "not_an_image"
    assert all(by_url[url]["status"] == "processed" for url in good)

    lines = list(csv.reader(io.StringIO(api.get(f"/output_csv/{request_id}").text)))
    assert [line[1] for line in lines[1:]] == [
        by_url[good[0]]["output_url"], "failed:http_404", by_url[good[1]]["output_url"],
        "failed:not_an_image", by_url[good[2]]["output_url"],
    ]
    assert hook["failed_images"] == 2 and hook["processed_images"] == 3


def test_killed_processor_and_notifier_lose_no_image_and_send_one_webhook(running_stack, image_host, webhooks):
    _settings, services, api = running_stack
    image_host.delay = 0.15  # keep images in flight while the services are killed
    urls = [image_host.add(f"/slow{n}.jpg", jpeg_bytes(300, 200, n)) for n in range(40)]
    request_id = upload(api, "url\n" + "\n".join(urls) + "\n", webhooks.url("/crash"))

    deadline = time.monotonic() + JOB_TIMEOUT
    while api.get(f"/status/{request_id}").json()["counts"]["processed"] < 5:
        assert time.monotonic() < deadline, "no progress before the crash"
        time.sleep(0.1)
    for name in ("processor-1", "notifier"):
        services.kill(name)
    time.sleep(1)
    services.restart_exited()

    hook = webhooks.wait_for("/crash", JOB_TIMEOUT)
    status, images = all_images(api, request_id)
    assert status["counts"] == {"total": 40, "processed": 40, "failed": 0, "pending": 0}
    assert {i["input_url"] for i in images} == set(urls)
    assert hook["processed_images"] == 40
    time.sleep(2)
    assert len(webhooks.posts_to("/crash")) == 1
