"""An upload needs PostgreSQL only: with Kafka down it is still accepted, its images wait in PostgreSQL,
and the dispatcher releases them once Kafka is back; only PostgreSQL down refuses an upload (503). Real
processes throughout: a Kafka broker of the test's own, stopped and started again; a PostgreSQL of the
test's own, likewise."""

import shutil
import time
import uuid

import httpx
import psycopg
import pytest

from deploy.local.kafka import KafkaBroker
from deploy.local.postgres import LocalPostgres, database_url
from deploy.local.probe import free_port
from services.api.app import create_app
from shared.events import ImageRequested
from shared.kafka import make_producer, produce_and_wait
from testbed.images import jpeg_bytes
from tests.support.api_server import ApiServer
from tests.support.kafka import wait_until_consumed
from tests.support.settings import make_test_settings, own_names
from tests.support.stack import exits_at_start, service_logs

JOB_TIMEOUT = 120


@pytest.fixture
def own_broker(tmp_path):
    broker = KafkaBroker(tmp_path / "kafka", port=free_port(), controller_port=free_port(), partitions=4)
    broker.start()
    yield broker
    broker.stop()


def upload(api: httpx.Client, urls: list[str], webhook_url: str) -> dict:
    response = api.post(
        "/upload",
        files={"file": ("job.csv", "url\n" + "\n".join(urls) + "\n", "text/csv")},
        data={"webhook_url": webhook_url},
    )
    assert response.status_code == 202, response.text
    return response.json()


def job_row(database_url: str, request_id: str) -> dict | None:
    with psycopg.connect(database_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute("SELECT * FROM processing_jobs WHERE job_id = %s", (request_id,)).fetchone()


def test_kafka_down_while_images_wait_loses_nothing_and_the_release_resumes(
    start_stack, own_broker, image_host, receivers
):
    stack = start_stack(
        processors=1,
        kafka_bootstrap_servers=own_broker.bootstrap_servers,
        topic_partitions=4,
        publish_attempt_seconds=1,  # each round gives up after 1 s: several fail while Kafka is down
    )
    settings, receiver = stack.settings, receivers()
    urls = [image_host.add(f"/outage/{n}.jpg", jpeg_bytes(120, 80, n)) for n in range(6)]

    own_broker.stop()
    reply = upload(stack.api, urls, receiver.url)
    assert reply["events"] == "queued"
    request_id = reply["request_id"]
    # The dispatcher tries, Kafka does not acknowledge, and the images stay where they are.
    deadline = time.monotonic() + 60
    while stack.services.log_tail("api", 400).count("Kafka did not acknowledge") < 2:
        assert time.monotonic() < deadline, "the dispatcher did not try to release the images"
        time.sleep(0.1)
    job = job_row(settings.database_url, request_id)
    assert job is not None  # the job was stored when accepted
    assert (job["released_images"], job["published_at"]) == (0, None)
    status = stack.api.get(f"/status/{request_id}").json()
    assert (status["status"], status["events"]) == ("pending", "queued")

    own_broker.start()
    [webhook] = receiver.wait_for(1, JOB_TIMEOUT)
    assert webhook.json()["request_id"] == request_id
    assert [image["status"] for image in webhook.json()["images"]] == ["processed"] * len(urls)
    job = job_row(settings.database_url, request_id)
    assert job is not None  # the job was stored when accepted
    assert job["published_at"] is not None
    assert (job["status"], job["processed_images"], job["failed_images"]) == ("completed", len(urls), 0)
    assert stack.api.get(f"/status/{request_id}").json()["events"] == "published"

    # Releasing again is harmless: every event of the job once more, as a dispatcher that died before
    # moving its cursors would send it. The processor does the work again into the same files; the notifier
    # ignores the second result of each image; no second webhook.
    outputs = {image["input_url"]: image["output_url"] for image in webhook.json()["images"]}
    stored = sorted((settings.storage_dir / request_id).iterdir())
    with psycopg.connect(settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        images = conn.execute("SELECT * FROM images WHERE job_id = %s", (request_id,)).fetchall()
    events = [
        (
            str(image["id"]),
            ImageRequested(
                request_id=request_id,
                image_id=image["id"],
                row_number=image["row_number"],
                position=image["position"],
                input_url=image["input_url"],
            ).model_dump_json(),
        )
        for image in images
    ]
    producer = make_producer(settings)
    produce_and_wait(producer, settings.topic_requested, events)
    wait_until_consumed(settings, settings.processor_group, [settings.topic_requested], JOB_TIMEOUT)
    wait_until_consumed(settings, settings.notifier_group, [settings.topic_processed], JOB_TIMEOUT)
    assert len(receiver.posts_to()) == 1
    after = stack.api.get(f"/status/{request_id}").json()
    assert after["counts"] == {"total": len(urls), "processed": len(urls), "failed": 0, "pending": 0}
    assert {image["input_url"]: image["output_url"] for image in after["images"]} == outputs
    assert sorted((settings.storage_dir / request_id).iterdir()) == stored


@pytest.fixture
def own_postgres(tmp_path):
    postgres = LocalPostgres(tmp_path / "postgres", port=free_port(), fast_unsafe=True)
    postgres.start()
    postgres.create_database("imgpipe")
    yield postgres
    postgres.stop()
    shutil.rmtree(postgres.home, ignore_errors=True)


def test_postgres_down_at_upload_answers_503_and_stores_nothing(infra, own_postgres, tmp_path):
    database_url = own_postgres.url("imgpipe")
    settings = make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=database_url,
        **own_names("pgdown"),
        topic_partitions=1,
        storage_dir=tmp_path / "images",
    )
    body = {"file": ("job.csv", "url\nhttps://127.0.0.1:9/a.jpg\n", "text/csv")}
    with ApiServer(create_app(settings)) as server, httpx.Client(base_url=server.base_url, timeout=60) as api:
        own_postgres.stop()
        response = api.post("/upload", files=body)
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "database_unavailable"
        assert int(response.headers["Retry-After"]) >= 1
        assert api.get(f"/status/{uuid.uuid4()}").json()["error"]["code"] == "database_unavailable"

        own_postgres.start()
        with psycopg.connect(database_url) as conn:
            jobs = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()
            assert jobs is not None and jobs[0] == 0  # count(*) always answers one row
            images = conn.execute("SELECT count(*) FROM images").fetchone()
            assert images is not None and images[0] == 0
        deadline = time.monotonic() + 60
        while (response := api.post("/upload", files=body)).status_code == 503:  # the pool reconnects
            assert time.monotonic() < deadline, response.text
        assert response.status_code == 202, response.text


def test_postgresql_refusing_at_start_stops_the_api_and_the_notifier_with_one_line(make_settings, infra, tmp_path):
    missing = database_url(infra.server_url, "imgpipe_no_such_database")  # refused at once (3D000), not waited for
    settings = make_settings(database_url=missing, api_port=free_port())

    exits = exits_at_start(settings, tmp_path / "logs", processors=0)  # the processor has no database

    assert exits == {"api": 1, "notifier": 1}
    logs = service_logs(tmp_path / "logs")
    for name in ("api", "notifier"):
        assert "cannot start: PostgreSQL at " in logs[name] and "refused the connection" in logs[name], logs[name]
        assert "Traceback" not in logs[name], logs[name]
