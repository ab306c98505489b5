"""The API under load stays honest: reads have connections of their own, a pool that is merely full
answers `busy` (not `database_unavailable`), uploads beyond the bound are refused before their body is
read, and per-key limits refuse with Retry-After, naming the limit, storing nothing, until they reset.
Against the API in a real uvicorn server on 127.0.0.1, on real PostgreSQL and Kafka."""

import socket
import threading
import time
import uuid

import httpx
import psycopg
import pytest

from services.api import keys
from services.api.app import create_app
from services.api.limits import REFUSAL_KEPT_SECONDS
from tests.support.api_server import ApiServer
from tests.support.scrape import scrape
from tests.support.settings import make_test_settings, own_names
from tests.support.stack import url_csv

WAIT_SECONDS = 1  # api_connection_wait_seconds here: how long a request waits for a connection


@pytest.fixture
def start_api(infra, own_database, tmp_path):
    with ExitStackOfServers() as servers:

        def start(**overrides) -> tuple[ApiServer, object]:
            settings = make_test_settings(
                kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
                database_url=own_database,
                **own_names("capacity"),
                topic_partitions=1,
                storage_dir=tmp_path / "images",
                api_connection_wait_seconds=WAIT_SECONDS,
                **overrides,
            )
            app = create_app(settings)
            return servers.enter(ApiServer(app)), app

        yield start


class ExitStackOfServers:
    def __init__(self):
        self.servers = []

    def enter(self, server: ApiServer) -> ApiServer:
        self.servers.append(server.__enter__())
        return server

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for server in reversed(self.servers):
            server.__exit__(*exc)


def upload(base_url: str, urls: int = 1, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    csv_text = url_csv([f"https://img.example/{uuid.uuid4().hex}/{n}.jpg" for n in range(urls)])
    return httpx.post(
        f"{base_url}/upload", files={"file": ("job.csv", csv_text, "text/csv")}, headers=headers, timeout=30
    )


def jobs_stored(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()
        assert row is not None  # count(*) gives one row
        return row[0]


def test_reads_are_answered_while_the_upload_capacity_is_taken_and_a_full_read_pool_is_busy(start_api, own_database):
    server, app = start_api(max_concurrent_uploads=1)
    job = upload(server.base_url).json()["request_id"]
    body = multipart_csv(url_csv([f"https://img.example/{n}.jpg" for n in range(1000)]))
    holding = raw_upload_headers(server, len(body))  # the one upload slot, its body coming slowly
    try:
        holding.sendall(body[:1000])
        refused = upload(server.base_url)
        reads = [httpx.get(f"{server.base_url}/status/{job}", timeout=30).status_code for _ in range(20)]
        holding.sendall(body[1000:])
        status, _headers, answer = read_answer(holding)
    finally:
        holding.close()
    assert (refused.status_code, refused.json()["error"]["code"]) == (429, "too_many_uploads"), refused.text
    assert set(reads) == {200}
    assert status == 202, answer
    assert jobs_stored(own_database) == 2

    held = [app.state.pool.getconn() for _ in range(app.state.pool.max_size)]  # every read connection in use
    try:
        busy = httpx.get(f"{server.base_url}/status/{job}", timeout=30)
    finally:
        for conn in held:
            app.state.pool.putconn(conn)
    assert (busy.status_code, busy.json()["error"]["code"]) == (503, "busy"), busy.text  # the server answers
    assert int(busy.headers["Retry-After"]) >= 1
    assert httpx.get(f"{server.base_url}/status/{job}", timeout=30).status_code == 200


def multipart_csv(csv_text: str) -> bytes:
    return (
        f'--b\r\nContent-Disposition: form-data; name="file"; filename="job.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n{csv_text}\r\n--b--\r\n"
    ).encode()


def raw_upload_headers(server: ApiServer, content_length: int, key: str | None = None) -> socket.socket:
    """An upload's request line and headers, and no body yet."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall(
        (
            f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {content_length}\r\n\r\n"
        ).encode()
    )
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed without an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_an_upload_beyond_the_bound_is_refused_before_its_body_is_sent(start_api, own_database):
    server, _app = start_api(max_concurrent_uploads=1)
    first = raw_upload_headers(server, 1_000_000)  # takes the one slot, its body still to come
    try:
        threading.Event().wait(0.5)  # the first upload reaches the API
        second = raw_upload_headers(server, 1_000)
        status, headers, body = read_answer(second)  # answered although not one byte of its body was sent
        second.close()
    finally:
        first.close()
    assert status == 429 and b'"too_many_uploads"' in body, body
    assert int(headers["retry-after"]) >= 1
    assert headers["connection"] == "close"
    assert jobs_stored(own_database) == 0
    # The slot is given back when the first one ends (its client hung up: the API notices it soon).
    answers = [upload(server.base_url).status_code for _ in range(50)]
    assert 202 in answers and set(answers[answers.index(202) :]) == {202}


def test_per_key_limits_refuse_with_retry_after_name_the_limit_store_nothing_and_reset(start_api, own_database):
    server, _app = start_api(api_keys_required=True)
    with psycopg.connect(own_database, autocommit=True, row_factory=psycopg.rows.dict_row) as conn:
        limited_id, limited = keys.create_key(conn, "limited")
        _, other = keys.create_key(conn, "other")
        assert keys.set_limits(conn, "limited", uploads_per_minute=2, max_waiting_images=None)

        assert [upload(server.base_url, key=limited).status_code for _ in range(2)] == [202, 202]
        refused = upload(server.base_url, key=limited)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "uploads_per_minute" and refused.json()["error"]["limit"] == 2
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert upload(server.base_url, key=other).status_code == 202  # another key is not limited by it
        assert jobs_stored(own_database) == 3

        # A minute later (the jobs' clock moved back instead of the test waiting) the limit has reset, once
        # the API's memory of the refusal (REFUSAL_KEPT_SECONDS) has passed.
        conn.execute(
            "UPDATE processing_jobs SET created_at = created_at - interval '61 seconds' WHERE owner_key_id = %s",
            [limited_id],
        )
        time.sleep(REFUSAL_KEPT_SECONDS)
        assert upload(server.base_url, key=limited).status_code == 202

        # Another key, whose limits are set before it is first used (the API keeps a key it found for 5 s).
        waiting_id, waiting = keys.create_key(conn, "waiting")
        assert keys.set_limits(conn, "waiting", uploads_per_minute=None, max_waiting_images=6)
        assert upload(server.base_url, urls=3, key=waiting).status_code == 202
        too_many = upload(server.base_url, urls=4, key=waiting)  # would leave 7 not finished
        assert too_many.status_code == 429 and too_many.json()["error"]["code"] == "too_many_images_waiting"
        assert "Retry-After" in too_many.headers
        assert jobs_stored(own_database) == 5  # refused after reading its rows: nothing of it stored
        assert upload(server.base_url, urls=3, key=waiting).status_code == 202  # exactly at the limit
        at_limit = upload(server.base_url, key=waiting)  # refused before its body is read
        assert (at_limit.status_code, at_limit.json()["error"]["limit"]) == (429, 6)
        conn.execute(
            "UPDATE processing_jobs SET status = 'completed', processed_images = total_images WHERE owner_key_id = %s",
            [waiting_id],
        )  # its images finished
        assert upload(server.base_url, key=waiting).status_code == 202

    metrics = scrape(server.base_url, headers={"Authorization": f"Bearer {other}"})
    assert metrics.value("imgpipe_upload_refusals_total", key="limited", limit="uploads_per_minute") == 1
    assert metrics.value("imgpipe_upload_refusals_total", key="waiting", limit="too_many_images_waiting") == 2
    assert metrics.matching("imgpipe_upload_refusals_total", key="other") == {}
