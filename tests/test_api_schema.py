"""The API against its own OpenAPI schema (schemathesis), and CSVs kept whole through the API (hypothesis).

The real app (create_app) is served by uvicorn on 127.0.0.1 on the session's Kafka and a PostgreSQL database
of this module's own. Generated requests use the schema's parameters and bodies, with the request ids of
real jobs (pending and completed) mixed in, so that /status and /output_csv are reached past their 404, and
valid CSVs with URL-like webhook URLs, so that /upload is reached past its 422. Private addresses are allowed:
the webhook address rule would otherwise send generated host names to the system's DNS resolver.
"""

import csv
import gc
import io
import threading
from collections.abc import Collection
from dataclasses import dataclass

import httpx
import psycopg
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from deploy.local.probe import free_port
from deploy.local.stack import wait_for_api
from services.api.app import create_app
from services.api.output_csv import FAILED_PREFIX, OUTPUT_COLUMN
from tests.support.csv_tables import csv_texts, tables
from tests.support.settings import make_test_settings, own_names

OPERATIONS = [
    ("POST", "/upload"),
    ("GET", "/status/{request_id}"),
    ("GET", "/output_csv/{request_id}"),
    ("GET", "/healthz"),
]
# Operations with parameters or a body that a request can get wrong (the others take only a string path id).
NEGATABLE = [("POST", "/upload"), ("GET", "/status/{request_id}")]
MAX_CSV_BYTES = 20_000
MAX_IMAGES = 50
EXAMPLES_PER_OPERATION = 40


@dataclass
class RunningApi:
    base_url: str
    database_url: str
    schema: schemathesis.BaseSchema
    known_request_ids: list[str]  # a pending job and a completed one


def upload(base_url: str, body: bytes, webhook_url: str = "") -> httpx.Response:
    files = {"file": ("job.csv", body, "text/csv")}
    return httpx.post(f"{base_url}/upload", files=files, data={"webhook_url": webhook_url}, timeout=30)


def complete_job(
    database_url: str, request_id: str, failed_positions: Collection[tuple[int, int]] = frozenset()
) -> None:
    """Record every image of the job as the notifier would: processed, or failed at failed_positions."""
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        conn.execute(
            "UPDATE images SET status = 'processed',"
            " output_url = 'https://out.example/' || row_number || '/' || position || '.jpg' WHERE job_id = %s",
            (request_id,),
        )
        for row_number, position in failed_positions:
            conn.execute(
                "UPDATE images SET status = 'failed', output_url = NULL, error_code = 'http_404', error_message = 'x'"
                " WHERE job_id = %s AND row_number = %s AND position = %s",
                (request_id, row_number, position),
            )
        conn.execute(
            "UPDATE processing_jobs SET status = 'completed', completed_at = now(),"
            " failed_images = %s, processed_images = total_images - %s WHERE job_id = %s",
            (len(failed_positions), len(failed_positions), request_id),
        )


@pytest.fixture(scope="module")
def api(infra, tmp_path_factory):
    database_url = infra.new_database()
    app_settings = make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=database_url,
        **own_names("schema"),
        topic_partitions=2,
        storage_dir=tmp_path_factory.mktemp("images"),
        max_csv_bytes=MAX_CSV_BYTES,
        max_images_per_job=MAX_IMAGES,
        allow_private_addresses=True,
    )
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(app_settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_api(base_url)
        pending = upload(base_url, b"url\nhttps://img.example.com/pending.jpg\n").json()["request_id"]
        two_images = b'n,Input Image Urls\n1,"https://img.example.com/a.jpg,https://img.example.com/b.jpg"\n'
        completed = upload(base_url, two_images).json()["request_id"]
        complete_job(database_url, completed, failed_positions={(1, 2)})
        schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
        yield RunningApi(base_url, database_url, schema, [pending, completed])
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the API did not stop within 30 s"
        del server
        gc.collect()  # the app's Kafka producer goes now, not after the session has stopped Kafka (log noise)
        infra.drop_database(database_url)


BIGINT_MAX = 2**63 - 1


# Never called (no notifier runs here) nor resolved (private addresses are allowed, so no address check).
hosts = st.text(max_size=8) | st.text(st.characters(codec="utf-8", min_codepoint=0x80), min_size=1, max_size=3)
webhook_urls = st.sampled_from(["", "https://127.0.0.1:9/hook"]) | st.builds(
    "{}://{}/{}".format, st.sampled_from(["http", "https"]), hosts, st.text(max_size=4)
)


def run_operation(api: RunningApi, method: str, path: str, mode: GenerationMode, checks: list) -> None:
    """Call the operation with up to EXAMPLES_PER_OPERATION generated requests and run checks on each answer."""
    operation = api.schema[path][method]

    @settings(max_examples=EXAMPLES_PER_OPERATION, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def call(case, data):
        if "request_id" in case.path_parameters:
            generated = case.path_parameters["request_id"]
            case.path_parameters["request_id"] = data.draw(st.sampled_from([generated, *api.known_request_ids]))
        if path == "/upload" and mode == GenerationMode.POSITIVE and data.draw(st.booleans()):
            # A generated body is never a valid CSV and its webhook_url hardly ever looks like a URL: half the
            # uploads carry a valid CSV and a URL-like webhook_url, so that 202 and the URL checks are reached.
            header, _, rows, _ = data.draw(tables())
            case.body = {"file": data.draw(csv_texts([header, *rows])).encode(), "webhook_url": data.draw(webhook_urls)}
        case.call_and_validate(checks=checks, timeout=30)

    call()


@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_operation_answers_5xx_and_requests_outside_the_schema_are_refused(api, method, path):
    run_operation(api, method, path, GenerationMode.POSITIVE, [not_a_server_error])
    if (method, path) in NEGATABLE:
        run_operation(api, method, path, GenerationMode.NEGATIVE, [not_a_server_error, negative_data_rejection])


def conformance_cases() -> list:
    cases = []
    for method, path in OPERATIONS:
        for check in (status_code_conformance, content_type_conformance, response_schema_conformance):
            cases.append(pytest.param(method, path, check, id=f"{method}-{path}-{check.__name__}"))
    return cases


@pytest.mark.parametrize("method, path, check", conformance_cases())
def test_every_answer_is_the_one_the_schema_documents(api, method, path, check):
    """Status code, content type and body as documented: every answer, errors included, has its model."""
    run_operation(api, method, path, GenerationMode.POSITIVE, [check])


def test_status_offset_beyond_bigint_is_refused_not_a_server_error(api):
    """Found by schemathesis: PostgreSQL's OFFSET is a bigint, so a larger offset once gave 500."""
    completed = api.known_request_ids[1]
    response = httpx.get(f"{api.base_url}/status/{completed}", params={"offset": BIGINT_MAX + 1}, timeout=30)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"


@settings(max_examples=25)
@given(table=tables(), data=st.data())
def test_an_accepted_csv_comes_back_whole_from_output_csv(api, table, data):
    """Through PostgreSQL and back: header, rows in order, cells unchanged, each URL paired with its output."""
    header, _, rows, row_urls = table
    response = upload(api.base_url, data.draw(csv_texts([header, *rows])).encode())
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    slots = [(row, position) for row, found in enumerate(row_urls, start=1) for position in range(1, len(found) + 1)]
    failed = set(data.draw(st.lists(st.sampled_from(slots), unique=True)))
    complete_job(api.database_url, request_id, failed)

    output = httpx.get(f"{api.base_url}/output_csv/{request_id}", timeout=30)

    assert output.status_code == 200, output.text
    records = list(csv.reader(io.StringIO(output.text, newline="")))
    assert records[0] == [*header, OUTPUT_COLUMN]
    assert [record[:-1] for record in records[1:]] == rows
    for row, (found, record) in enumerate(zip(row_urls, records[1:], strict=True), start=1):
        assert record[-1].split(",") == [
            f"{FAILED_PREFIX}http_404" if (row, position) in failed else f"https://out.example/{row}/{position}.jpg"
            for position in range(1, len(found) + 1)
        ]
    status = httpx.get(f"{api.base_url}/status/{request_id}", params={"limit": 1000}, timeout=30).json()
    assert [image["input_url"] for image in status["images"]] == [url for found in row_urls for url in found]
