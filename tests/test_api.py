"""The API in-process (TestClient runs the real app and its lifespan) on real PostgreSQL and Kafka."""

import json
import uuid

import jsonschema
import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from shared.schemas import schema_path
from tests.support.kafka import requested_events
from tests.support.settings import make_test_settings, own_names

MAX_CSV_BYTES = 10_000
MAX_IMAGES = 8


@pytest.fixture(scope="module")
def settings(infra, module_database, tmp_path_factory):
    return make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=module_database,
        **own_names("api"),
        topic_partitions=4,
        storage_dir=tmp_path_factory.mktemp("images"),
        max_csv_bytes=MAX_CSV_BYTES,
        max_images_per_job=MAX_IMAGES,
        status_page_size=2,
        allowed_private_hosts=["127.0.0.1"],  # the tests' webhook URLs; other private hosts are refused
    )


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def job_rows_with_token(db, token: str) -> int:
    """How many jobs or images mention token (every bad upload below carries its own)."""
    return db.execute(
        "SELECT (SELECT count(*) FROM processing_jobs WHERE webhook_url LIKE %(like)s)"
        " + (SELECT count(*) FROM images WHERE input_url LIKE %(like)s) AS n",
        {"like": f"%{token}%"},
    ).fetchone()["n"]


def post_csv(client, body: bytes, webhook_url: str | None = None):
    data = {"webhook_url": webhook_url} if webhook_url is not None else {}
    return client.post("/upload", files={"file": ("job.csv", body, "text/csv")}, data=data)


def assert_error(response, status_code: int, code: str) -> dict:
    assert response.status_code == status_code, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    return error


def test_upload_stores_the_job_and_the_dispatcher_releases_one_event_per_image(client, settings, db):
    token = uuid.uuid4().hex
    body = (
        "S. No.,Product Name,Input Image Urls\n"
        f'1,SKU1,"http://127.0.0.1:9/{token}/a.jpg, http://127.0.0.1:9/{token}/b.jpg"\n'
        f"2,SKU2,http://127.0.0.1:9/{token}/c.png\n"
        f'3,"Name, with comma",http://127.0.0.1:9/{token}/a.jpg\n'
    ).encode()
    response = post_csv(client, body, webhook_url=f"http://127.0.0.1:9/hook/{token}")
    assert response.status_code == 202, response.text
    reply = response.json()
    request_id = reply["request_id"]
    assert uuid.UUID(request_id).version == 4
    assert reply == {
        "request_id": request_id,
        "total_images": 4,
        "events": "queued",
        "status_url": f"/status/{request_id}",
        "output_csv_url": f"/output_csv/{request_id}",
    }

    job = db.execute("SELECT * FROM processing_jobs WHERE job_id = %s", (request_id,)).fetchone()
    assert job["status"] == "pending"
    assert job["csv_header"] == ["S. No.", "Product Name", "Input Image Urls"]
    assert job["url_column"] == 2
    assert job["total_images"] == 4
    assert job["webhook_url"] == f"http://127.0.0.1:9/hook/{token}"
    rows = db.execute(
        "SELECT row_number, cells FROM csv_rows WHERE job_id = %s ORDER BY row_number", (request_id,)
    ).fetchall()
    assert [(row["row_number"], row["cells"][:2]) for row in rows] == [
        (1, ["1", "SKU1"]),
        (2, ["2", "SKU2"]),
        (3, ["3", "Name, with comma"]),
    ]
    images = db.execute(
        "SELECT id, row_number, position, input_url, status FROM images WHERE job_id = %s"
        " ORDER BY row_number, position",
        (request_id,),
    ).fetchall()
    base = f"http://127.0.0.1:9/{token}"
    assert [(i["row_number"], i["position"], i["input_url"], i["status"]) for i in images] == [
        (1, 1, f"{base}/a.jpg", "pending"),
        (1, 2, f"{base}/b.jpg", "pending"),
        (2, 1, f"{base}/c.png", "pending"),
        (3, 1, f"{base}/a.jpg", "pending"),
    ]

    messages = requested_events(settings, request_id, 4)
    assert [message.key().decode() for message in messages] == [json.loads(m.value())["image_id"] for m in messages]
    events = [json.loads(message.value()) for message in messages]
    assert len(events) == 4
    job = db.execute("SELECT * FROM processing_jobs WHERE job_id = %s", (request_id,)).fetchone()
    assert (job["released_images"], job["release_row"], job["release_position"]) == (4, 3, 1)
    assert job["published_at"] is not None
    validator = jsonschema.Draft202012Validator(
        json.loads(schema_path("image.requested").read_text()),
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    for event in events:
        validator.validate(event)
    assert sorted((e["image_id"], e["row_number"], e["position"], e["input_url"]) for e in events) == sorted(
        (str(i["id"]), i["row_number"], i["position"], i["input_url"]) for i in images
    )


def test_status_of_a_fresh_job_pages_its_images(client, settings):
    token = uuid.uuid4().hex
    urls = [f"https://127.0.0.1:9/{token}/{n}.jpg" for n in range(3)]
    request_id = post_csv(client, ("url\n" + "\n".join(urls) + "\n").encode()).json()["request_id"]

    requested_events(settings, request_id, 3)
    first = client.get(f"/status/{request_id}")  # status_page_size is 2 in these settings
    assert first.status_code == 200
    report = first.json()
    assert report["request_id"] == request_id
    assert report["status"] == "pending"
    assert report["events"] == "published"
    assert report["counts"] == {"total": 3, "processed": 0, "failed": 0, "pending": 3}
    dispatch = report["dispatch"]
    assert (dispatch["released"], dispatch["waiting"]) == (3, 0) and dispatch["started_at"] is not None
    assert 0 < dispatch["share"] <= 1  # the module's other jobs, never processed here, share with it
    assert report["webhook"] is None
    assert report["created_at"] and report["updated_at"] and report["completed_at"] is None
    assert report["page"] == {"offset": 0, "limit": 2, "next_offset": 2}
    assert report["images"] == [
        {
            "row_number": n + 1,
            "position": 1,
            "input_url": urls[n],
            "output_url": None,
            "status": "pending",
            "format": None,
            "bytes_in": None,
            "bytes_out": None,
            "error": None,
        }
        for n in (0, 1)
    ]
    last = client.get(f"/status/{request_id}", params={"offset": 2, "limit": 5}).json()
    assert last["page"] == {"offset": 2, "limit": 5, "next_offset": None}
    assert [image["input_url"] for image in last["images"]] == [urls[2]]

    assert_error(client.get(f"/status/{request_id}", params={"limit": 0}), 422, "invalid_request")
    assert_error(client.get(f"/status/{request_id}", params={"limit": 1001}), 422, "invalid_request")
    assert_error(client.get(f"/status/{request_id}", params={"offset": -1}), 422, "invalid_request")


def test_status_shows_the_webhook_waiting_then_its_delivery(client, db):
    hook = f"https://127.0.0.1:9/hook/{uuid.uuid4().hex}"
    request_id = post_csv(client, b"url\nhttps://127.0.0.1:9/x.jpg\n", webhook_url=f"  {hook} ").json()["request_id"]
    assert client.get(f"/status/{request_id}").json()["webhook"] == {
        "url": hook,
        "status": "waiting",
        "attempts": 0,
        "last_error": None,
    }
    db.execute(  # what the notifier records after a failed attempt
        "INSERT INTO webhook_deliveries (job_id, url, attempts, last_error) VALUES (%s, %s, 1, 'http_500')",
        (request_id, hook),
    )
    assert client.get(f"/status/{request_id}").json()["webhook"] == {
        "url": hook,
        "status": "pending",
        "attempts": 1,
        "last_error": "http_500",
    }


def test_output_csv_is_refused_before_completion_and_served_after(client, db):
    token = uuid.uuid4().hex
    body = f'n,Input Image Urls,extra\n1,"https://127.0.0.1:9/{token}/a.jpg,https://127.0.0.1:9/{token}/b.jpg",x\n'
    request_id = post_csv(client, body.encode()).json()["request_id"]

    error = assert_error(client.get(f"/output_csv/{request_id}"), 409, "job_not_completed")
    assert error["status"] == "pending"
    assert error["counts"] == {"total": 2, "processed": 0, "failed": 0, "pending": 2}

    # complete the job the way the notifier records results
    db.execute(
        "UPDATE images SET status = 'processed', output_url = 'https://out/a.jpg' WHERE job_id = %s AND position = 1",
        (request_id,),
    )
    db.execute(
        "UPDATE images SET status = 'failed', error_code = 'http_404', error_message = 'Not Found'"
        " WHERE job_id = %s AND position = 2",
        (request_id,),
    )
    db.execute(
        "UPDATE processing_jobs SET status = 'completed', processed_images = 1, failed_images = 1,"
        " completed_at = now() WHERE job_id = %s",
        (request_id,),
    )
    response = client.get(f"/output_csv/{request_id}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == f'attachment; filename="{request_id}.csv"'
    assert response.text.splitlines() == [
        "n,Input Image Urls,extra,Output Image Urls",
        f'1,"https://127.0.0.1:9/{token}/a.jpg,https://127.0.0.1:9/{token}/b.jpg",x,'
        '"https://out/a.jpg,failed:http_404"',
    ]
    report = client.get(f"/status/{request_id}").json()
    assert report["status"] == "completed" and report["completed_at"]
    assert report["images"][1]["error"] == {"code": "http_404", "message": "Not Found"}


@pytest.mark.parametrize("path", ["/status", "/output_csv"])
@pytest.mark.parametrize("request_id", [str(uuid.uuid4()), "not-a-uuid", "1234", "%20"])
def test_unknown_or_malformed_request_id_is_404(client, path, request_id):
    error = assert_error(client.get(f"{path}/{request_id}"), 404, "job_not_found")
    assert "request_id" in error["message"]


def test_unknown_route_and_wrong_method_keep_the_json_shape(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    assert_error(client.get("/upload"), 405, "method_not_allowed")


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_stored_files_are_served(client, settings):
    folder = settings.storage_dir / str(uuid.uuid4())
    folder.mkdir()
    (folder / "img.jpg").write_bytes(b"\xff\xd8jpeg bytes")
    response = client.get(f"/files/{folder.name}/img.jpg")
    assert response.status_code == 200
    assert response.content == b"\xff\xd8jpeg bytes"
    assert_error(client.get(f"/files/{folder.name}/missing.jpg"), 404, "not_found")


def url_csv(token: str, count: int) -> bytes:
    return ("url\n" + "".join(f"https://127.0.0.1:9/{token}/{n}.jpg\n" for n in range(count))).encode()


BAD_UPLOADS = {
    # name: (token -> CSV body, or None to send no file field; webhook_url template or None for a valid one;
    #        expected status, error code, and row when the error names one)
    "empty_file": (lambda t: b"", None, 422, "invalid_csv", None),
    "header_only": (lambda t: b"url\n", None, 422, "invalid_csv", None),
    "no_url_column": (lambda t: f"id,link\n1,https://127.0.0.1:9/{t}.jpg\n".encode(), None, 422, "invalid_csv", None),
    "two_url_columns": (
        lambda t: f"url,URL\nhttps://h/{t}.jpg,https://h/{t}.jpg\n".encode(),
        None,
        422,
        "invalid_csv",
        None,
    ),
    "bad_url_in_row_2": (
        lambda t: f"url\nhttps://127.0.0.1:9/{t}.jpg\nftp://127.0.0.1/{t}.jpg\n".encode(),
        None,
        422,
        "invalid_csv",
        2,
    ),
    "cell_count_row_3": (
        lambda t: f"url,a\nhttps://h/{t}1.jpg,x\nhttps://h/{t}2.jpg,y\nhttps://h/{t}3.jpg\n".encode(),
        None,
        422,
        "invalid_csv",
        3,
    ),
    "no_url_in_row_1": (lambda t: f"url,a\n,{t}\n".encode(), None, 422, "invalid_csv", 1),
    "not_utf8": (lambda t: f"url,a\nhttps://h/{t}.jpg,caf\u00e9\n".encode("latin-1"), None, 422, "invalid_csv", None),
    "too_many_images": (lambda t: url_csv(t, MAX_IMAGES + 1), None, 422, "too_many_images", None),
    "too_large": (lambda t: url_csv(t, 1) + b"#" * MAX_CSV_BYTES, None, 413, "csv_too_large", None),
    "no_file_field": (None, None, 422, "invalid_request", None),
    "webhook_not_http": (lambda t: url_csv(t, 1), "ftp://127.0.0.1/{t}", 422, "invalid_webhook_url", None),
    "webhook_relative": (lambda t: url_csv(t, 1), "/hook/{t}", 422, "invalid_webhook_url", None),
    "webhook_no_host": (lambda t: url_csv(t, 1), "http:///{t}", 422, "invalid_webhook_url", None),
    "webhook_too_long": (lambda t: url_csv(t, 1), "http://h/{t}" + "a" * 2048, 422, "invalid_webhook_url", None),
    # Private addresses are refused at upload as the notifier would refuse them when sending (nothing is sent here).
    "webhook_metadata": (
        lambda t: url_csv(t, 1),
        "http://169.254.169.254/latest/{t}",
        422,
        "invalid_webhook_url",
        None,
    ),
    "webhook_localhost": (lambda t: url_csv(t, 1), "http://localhost:9/{t}", 422, "invalid_webhook_url", None),
    "webhook_nat64": (lambda t: url_csv(t, 1), "http://[64:ff9b::a9fe:a9fe]/{t}", 422, "invalid_webhook_url", None),
    "webhook_private": (lambda t: url_csv(t, 1), "https://10.0.0.1:8443/{t}", 422, "invalid_webhook_url", None),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_is_refused_and_stores_nothing(client, db, case):
    make_body, webhook, status_code, code, row = BAD_UPLOADS[case]
    token = uuid.uuid4().hex
    # a valid webhook carrying the token lets us find any job stored by mistake
    webhook_url = (webhook or "http://127.0.0.1:9/hook/{t}").format(t=token)
    if make_body is None:
        response = client.post("/upload", data={"webhook_url": webhook_url})
    else:
        response = post_csv(client, make_body(token), webhook_url=webhook_url)
    error = assert_error(response, status_code, code)
    if row is not None:
        assert error["row"] == row
        assert f"row {row}" in error["message"]
    assert job_rows_with_token(db, token) == 0


def test_empty_webhook_url_means_none(client, db):
    request_id = post_csv(client, url_csv(uuid.uuid4().hex, 1), webhook_url="").json()["request_id"]
    assert db.execute("SELECT webhook_url FROM processing_jobs WHERE job_id = %s", (request_id,)).fetchone() == {
        "webhook_url": None
    }
