"""Large CSVs through the real API (in-process, TestClient) on real PostgreSQL and Kafka: read as a stream,
stored whole and in order with COPY, every event released in rounds, and a bad row late in the file
stores nothing."""

import csv
import io
import json
import time
import uuid

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from tests.support.kafka import read_to_end

ROWS = 20_000


@pytest.fixture
def settings(make_settings, own_database):
    # A window larger than the job, so that the dispatcher releases all of it (in rounds of at most 20,000)
    # although nothing processes it here.
    return make_settings(
        database_url=own_database,
        max_images_per_job=2 * ROWS,
        dispatch_window_min_images=2 * ROWS,
        dispatch_window_max_images=2 * ROWS,
    )


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def catalogue(rows: int, token: str) -> list[list[str]]:
    """Rows of the usual layout; every third row has two URLs, some cells need quoting."""
    table = []
    for n in range(1, rows + 1):
        urls = [f"https://img.example/{token}/{n}/a.jpg"] + (
            [f"https://img.example/{token}/{n}/b.png"] if n % 3 == 0 else []
        )
        table.append([str(n), f'Product "{n}", size {n % 7}', ", ".join(urls)])
    return table


def as_csv(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


HEADER = ["S. No.", "Product Name", "Input Image Urls"]


def test_a_large_upload_is_stored_whole_and_in_order_and_every_event_reaches_kafka(client, settings, db):
    rows = catalogue(ROWS, uuid.uuid4().hex)
    expected_images = [
        (n, position, url.strip())
        for n, row in enumerate(rows, start=1)
        for position, url in enumerate(row[2].split(","), start=1)
    ]

    response = client.post("/upload", files={"file": ("big.csv", as_csv(HEADER, rows), "text/csv")})

    assert response.status_code == 202, response.text
    answer = response.json()
    job_id = answer["request_id"]
    assert answer["total_images"] == len(expected_images)
    stored_rows = db.execute(
        "SELECT row_number, cells FROM csv_rows WHERE job_id = %s ORDER BY row_number", (job_id,)
    ).fetchall()
    assert [(r["row_number"], r["cells"]) for r in stored_rows] == list(enumerate(rows, start=1))
    images = db.execute(
        "SELECT id, row_number, position, input_url FROM images WHERE job_id = %s ORDER BY row_number, position",
        (job_id,),
    ).fetchall()
    assert [(i["row_number"], i["position"], i["input_url"]) for i in images] == expected_images

    deadline = time.monotonic() + 60
    while (
        db.execute("SELECT published_at FROM processing_jobs WHERE job_id = %s", (job_id,)).fetchone()["published_at"]
        is None
    ):
        assert time.monotonic() < deadline, "the job's events were never all acknowledged"
        time.sleep(0.1)
    events = [json.loads(m.value()) for m in read_to_end(settings, settings.topic_requested_bulk, timeout=60)]
    mine = sorted(
        (e["row_number"], e["position"], e["input_url"], e["image_id"]) for e in events if e["request_id"] == job_id
    )
    assert mine == [(i["row_number"], i["position"], i["input_url"], str(i["id"])) for i in images]


def test_a_bad_row_at_the_end_of_a_large_upload_stores_nothing(client, db):
    token = uuid.uuid4().hex
    rows = catalogue(ROWS, token)
    rows[-1][2] = "ftp://img.example/not-http.jpg"

    response = client.post("/upload", files={"file": ("big.csv", as_csv(HEADER, rows), "text/csv")})

    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_csv"
    assert response.json()["error"]["row"] == ROWS
    assert db.execute("SELECT count(*) AS n FROM processing_jobs").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM images WHERE input_url LIKE %s", (f"%{token}%",)).fetchone()["n"] == 0
