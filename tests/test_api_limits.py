"""Upload size limits, against the API in a real uvicorn server on 127.0.0.1, spoken to over raw sockets
so that the test controls exactly what is sent and when."""

import json
import socket
import threading

import psycopg
import pytest

from services.api.app import MULTIPART_ALLOWANCE_BYTES, create_app
from tests.support.api_server import ApiServer
from tests.support.settings import make_test_settings, own_names

MAX_CSV_BYTES = 100_000
MAX_BODY_BYTES = MAX_CSV_BYTES + MULTIPART_ALLOWANCE_BYTES
BOUNDARY = "imgpipe-test-boundary"
FILE_PART_HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="job.csv"\r\n'
    "Content-Type: text/csv\r\n\r\nurl\r\n"
).encode()


class BodyBytesRead:
    """Wraps the app and counts the request body bytes it takes from the server: what the API read,
    whatever the client sent."""

    def __init__(self, app):
        self.app = app
        self.count = 0

    async def __call__(self, scope, receive, send):
        async def counting_receive():
            message = await receive()
            if message["type"] == "http.request":
                self.count += len(message.get("body", b""))
            return message

        await self.app(scope, counting_receive if scope["type"] == "http" else receive, send)


@pytest.fixture(scope="module")
def server(infra, module_database, tmp_path_factory):
    settings = make_test_settings(
        kafka_bootstrap_servers=infra.kafka_bootstrap_servers,
        database_url=module_database,
        **own_names("limits"),
        topic_partitions=1,
        storage_dir=tmp_path_factory.mktemp("images"),
        max_csv_bytes=MAX_CSV_BYTES,
    )
    counter = BodyBytesRead(create_app(settings))
    with ApiServer(counter) as api:
        # the body_bytes_read fixture reads the counter off the server
        api.body_bytes_read = counter  # type: ignore[attr-defined]
        yield api


@pytest.fixture
def body_bytes_read(server):
    server.body_bytes_read.count = 0
    return server.body_bytes_read


def stored_jobs(database: str) -> int:
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT count(*) FROM processing_jobs").fetchone()
        assert row is not None  # count(*) gives one row
        return row[0]


def request_head(server, **headers: str) -> bytes:
    lines = [
        "POST /upload HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
    ]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response, up to the end of its Content-Length body, as an HTTP client does: the server
    may reset the connection right after it (it closes with the client's unread data in its buffers)."""

    def more() -> bytes:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection before a whole response"
        return chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data += more()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        body += more()
    return int(status_line.split()[1]), headers, body


def assert_csv_too_large(status: int, headers: dict, body: bytes) -> None:
    assert status == 413, body
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "csv_too_large"
    assert str(MAX_CSV_BYTES) in error["message"]


def test_a_content_length_over_the_limit_is_refused_before_the_body_is_sent(server, body_bytes_read, module_database):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(server, Content_Length=str(10**12)))  # a terabyte announced, nothing sent
        status, headers, body = read_response(sock)
        assert sock.recv(1) == b""  # and closed the connection
    assert_csv_too_large(status, headers, body)
    assert body_bytes_read.count == 0
    assert stored_jobs(module_database) == 0


def test_a_chunked_body_streaming_forever_is_cut_off_after_about_the_limit(server, body_bytes_read, module_database):
    sent = 0
    send_error: list[OSError] = []
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)

    def stream_forever():
        """A CSV that never ends, as HTTP chunks, until the server stops taking it."""
        nonlocal sent
        rows = b"https://127.0.0.1:9/image.jpg\r\n" * 2000
        chunk = b"%x\r\n%s\r\n" % (len(rows), rows)
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(FILE_PART_HEAD), FILE_PART_HEAD))
            while True:
                sock.sendall(chunk)
                sent += len(rows)
        except OSError as exc:
            send_error.append(exc)

    with sock:
        sock.sendall(request_head(server, Transfer_Encoding="chunked"))
        sender = threading.Thread(target=stream_forever, daemon=True)
        sender.start()
        status, headers, body = read_response(sock)
        sender.join(30)
    assert not sender.is_alive(), "the client could go on sending"
    assert isinstance(send_error[0], (BrokenPipeError, ConnectionResetError))  # the server closed the connection
    assert_csv_too_large(status, headers, body)
    # The API read past the limit by at most what uvicorn hands over at once (what it buffered: its 64 KiB
    # high-water mark plus one 256 KiB socket read); the client could send a few MiB more into the
    # kernel's socket buffers before the server closed the connection (3.6 MB when this was written).
    assert MAX_BODY_BYTES < body_bytes_read.count <= MAX_BODY_BYTES + 512 * 1024
    assert sent < MAX_BODY_BYTES + 64 * 2**20
    assert stored_jobs(module_database) == 0
