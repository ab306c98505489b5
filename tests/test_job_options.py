"""Per-job options (quality, max_width, max_height, format): validated at POST /upload and in job.requested,
stored with the job, shown by GET /status, carried in every image.requested event, applied by the processor."""

import io
import json
import time
import uuid

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from psycopg.rows import dict_row

from services.api.app import create_app
from services.api.intake import InvalidJob, read_job
from shared.events import ImageRequested, JobOptions, JobRequested
from shared.kafka import make_producer, produce_and_wait
from testbed.images import jpeg_bytes, png_bytes
from tests.support.kafka import requested_events
from tests.support.settings import make_test_settings, own_names
from tests.support.stack import all_images, url_csv, wait_for_status

DEFAULT_QUALITY = 60  # not the built-in 50: a job that names no quality must get the setting's
DEFAULTS = {"quality": DEFAULT_QUALITY, "max_width": None, "max_height": None, "format": "keep"}


@pytest.fixture(scope="module")
def settings(infra, module_database, tmp_path_factory):
    return make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=module_database,
        **own_names("options"),
        topic_partitions=2,
        storage_dir=tmp_path_factory.mktemp("images"),
        default_quality=DEFAULT_QUALITY,
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post(client, token: str, **fields):
    csv_text = url_csv([f"https://img.example.com/{token}/a.jpg", f"https://img.example.com/{token}/b.png"])
    return client.post("/upload", files={"file": ("job.csv", csv_text, "text/csv")}, data=fields)


def requested_options(settings, request_id: str, images: int = 2) -> list[dict | None]:
    return [json.loads(m.value()).get("options") for m in requested_events(settings, request_id, images)]


def test_options_are_stored_shown_and_sent_with_every_image(client, settings):
    response = post(client, uuid.uuid4().hex, quality="30", max_width="100", max_height=" 80 ", format="WebP")
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    expected = {"quality": 30, "max_width": 100, "max_height": 80, "format": "webp"}
    assert client.get(f"/status/{request_id}").json()["options"] == expected
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        stored = conn.execute("SELECT options FROM processing_jobs WHERE job_id = %s", (request_id,)).fetchone()
    assert stored is not None  # the job was stored when accepted
    assert stored["options"] == expected
    assert requested_options(settings, request_id) == [expected, expected]


def test_no_options_or_empty_fields_mean_the_defaults(client, settings):
    for fields in ({}, {"quality": "", "max_width": "", "max_height": "", "format": ""}):
        response = post(client, uuid.uuid4().hex, **fields)
        assert response.status_code == 202, response.text
        request_id = response.json()["request_id"]
        assert client.get(f"/status/{request_id}").json()["options"] == DEFAULTS
        assert requested_options(settings, request_id) == [DEFAULTS, DEFAULTS]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("quality", "0"),
        ("quality", "96"),
        ("quality", "high"),
        ("quality", "50.5"),
        ("max_width", "0"),
        ("max_width", "-3"),
        ("max_width", "wide"),
        ("max_height", "0"),
        ("max_height", "70000"),
        ("format", "png"),
        ("format", "gif"),
    ],
)
def test_invalid_options_are_refused_naming_the_field_and_store_nothing(client, settings, field, value):
    token = uuid.uuid4().hex
    response = post(client, token, **{field: value})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_options" and error["field"] == field
    assert error["message"].startswith(f"{field}: ")
    with psycopg.connect(settings.database_url, row_factory=dict_row) as conn:
        stored = conn.execute("SELECT count(*) AS n FROM images WHERE input_url LIKE %s", (f"%{token}%",)).fetchone()
    assert stored is not None  # count(*) always answers one row
    assert stored["n"] == 0


def test_a_job_over_kafka_takes_its_options_and_refuses_bad_ones(settings):
    job = JobRequested(request_id=uuid.uuid4(), image_urls=["https://img.example.com/a.jpg"])
    taken, _ = read_job(job.model_dump_json().encode(), settings)
    assert taken.options is None  # stored as the defaults (jobs.insert_job)
    with_options = {**json.loads(job.model_dump_json()), "options": {"quality": 70, "format": "jpeg"}}
    taken, _ = read_job(json.dumps(with_options).encode(), settings)
    assert taken.options == JobOptions(quality=70, format="jpeg")
    bad = {**with_options, "options": {"max_width": 0}}
    with pytest.raises(InvalidJob, match="options.max_width"):
        read_job(json.dumps(bad).encode(), settings)


@pytest.mark.parametrize(
    "options, expected",
    [
        (
            JobOptions(quality=70, max_height=300, format="jpeg"),
            {"quality": 70, "max_width": None, "max_height": 300, "format": "jpeg"},
        ),
        (JobOptions(max_width=200), {**DEFAULTS, "max_width": 200}),  # no quality: the setting's
        (None, DEFAULTS),
    ],
)
def test_a_job_over_kafka_stores_its_options(client, settings, options, expected):
    job = JobRequested(request_id=uuid.uuid4(), image_urls=["https://img.example.com/k.jpg"], options=options)
    produce_and_wait(
        make_producer(settings),
        settings.topic_job_requested,
        [(str(job.request_id), job.model_dump_json(exclude_none=True).encode())],
    )
    deadline = time.monotonic() + 60
    # Taken once stored; its images are released after that, by the dispatcher: wait for "published".
    while (status := client.get(f"/status/{job.request_id}")).status_code == 404 or status.json()[
        "events"
    ] != "published":
        assert time.monotonic() < deadline, f"the job event was never taken and published: {status.text}"
        time.sleep(0.1)
    assert status.json()["options"] == expected
    assert requested_options(settings, str(job.request_id), 1) == [expected]


def test_an_image_event_without_options_is_still_read():
    """Events from producers that know nothing of options: the processor's defaults apply."""
    event = {
        "request_id": str(uuid.uuid4()),
        "image_id": str(uuid.uuid4()),
        "row_number": 1,
        "position": 1,
        "input_url": "https://img.example.com/a.jpg",
    }
    assert ImageRequested.model_validate(event).options is None


def test_a_job_with_options_is_processed_to_them_through_the_stack(running_stack, image_host):
    api = running_stack.api
    sources = [jpeg_bytes(640, 480, 1, quality=90), png_bytes(300, 200, 2, mode="RGBA"), jpeg_bytes(80, 60, 3)]
    urls = [image_host.add(f"/opt{n}", body) for n, body in enumerate(sources)]
    response = api.post(
        "/upload",
        files={"file": ("job.csv", url_csv(urls), "text/csv")},
        data={"quality": "30", "max_width": "100", "format": "webp"},
    )
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    wait_for_status(api, request_id, lambda status: status["status"] == "completed")
    status, images = all_images(api, request_id)
    assert status["options"] == {"quality": 30, "max_width": 100, "max_height": None, "format": "webp"}
    assert status["counts"]["processed"] == 3
    sizes = []
    for image in images:
        assert image["format"] == "WEBP" and image["output_url"].endswith(".webp")
        stored = httpx.get(image["output_url"])
        assert stored.headers["content-type"] == "image/webp"
        output = Image.open(io.BytesIO(stored.content))
        assert output.format == "WEBP"
        sizes.append(output.size)
    assert sizes == [(100, 75), (100, 67), (80, 60)]  # scaled down keeping the aspect ratio, never enlarged


def test_images_requested_again_by_the_reconciler_keep_the_jobs_options(start_stack, jobs, image_host, receivers):
    receiver = receivers()
    job_id, images = jobs.create(2, receiver.url)
    with jobs.pool.connection() as conn:
        for number, image in enumerate(images):
            url = image_host.add(f"/again{number}.jpg", jpeg_bytes(200, 100, seed=number))
            conn.execute("UPDATE images SET input_url = %s WHERE id = %s", [url, image["id"]])
        options = JobOptions(max_width=50, format="webp").model_dump_json()
        conn.execute("UPDATE processing_jobs SET options = %s WHERE job_id = %s", [options, job_id])
    jobs.release_without_events(job_id)
    start_stack(reconcile_interval_seconds=0.3)

    [webhook] = receiver.wait_for(1, timeout=120)

    outputs = webhook.json()["images"]
    assert [image["format"] for image in outputs] == ["WEBP", "WEBP"]
    assert [Image.open(io.BytesIO(httpx.get(image["output_url"]).content)).size for image in outputs] == [(50, 25)] * 2
