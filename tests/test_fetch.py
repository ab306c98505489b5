"""fetch_image() against a real HTTP server on 127.0.0.1: limits, retries and the failure codes."""

import socket
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler

import pytest

from deploy.local.probe import free_port
from services.processor.failures import ImageFailure, TransientFailure
from services.processor.fetch import fetch_image, make_http_client
from shared.settings import Settings
from testbed.http_servers import LoopbackServer
from tests.support.settings import make_test_settings

BODY = b"\xff\xd8\xff\xe0 pretend image bytes"
MAX_BYTES = 1000
SLOW_SECONDS = 1.0
TRICKLE_BYTES = 200
TRICKLE_SECONDS = 0.05  # well under the read timeout: only a total deadline stops it (10 s in all)


class ImageServer(BaseHTTPRequestHandler):
    """Each path is one behaviour; `attempts` counts the requests per path."""

    attempts: Counter = Counter()
    trickled: Counter = Counter()  # bytes sent by the trickle paths

    def do_GET(self):
        self.attempts[self.path] += 1
        name, _, argument = self.path.strip("/").partition("/")
        if name == "ok":
            self.reply(200, BODY)
        elif name == "missing":
            self.reply(404, b"not here")
        elif name == "flaky":  # fails with the status in the path once, then works
            self.reply(int(argument), b"busy") if self.attempts[self.path] == 1 else self.reply(200, BODY)
        elif name == "down":
            self.reply(503, b"down")
        elif name == "slow":
            time.sleep(SLOW_SECONDS)
            self.reply(200, BODY)
        elif name == "redirect":
            hops = int(argument)
            self.send_response(302)
            self.send_header("Location", f"/redirect/{hops - 1}" if hops > 1 else "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif name.startswith("redirect-to?"):
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif name == "to-ftp":
            self.send_response(301)
            self.send_header("Location", "ftp://127.0.0.1/image.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif name == "big-declared":
            self.reply(200, b"x" * (MAX_BYTES + 1))
        elif name == "big-undeclared":  # HTTP/1.0 body delimited by closing the connection
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * (MAX_BYTES + 1))
        elif name == "exactly-max":
            self.reply(200, b"x" * MAX_BYTES)
        elif name == "exactly-max-undeclared":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * MAX_BYTES)
        elif name == "empty":
            self.reply(200, b"")
        elif name == "trickle":  # a whole body, one byte per TRICKLE_SECONDS: each read is quick, the total is not
            self.send_response(200)
            self.send_header("Content-Length", str(TRICKLE_BYTES))
            self.end_headers()
            self.trickle(b"x" * TRICKLE_BYTES)
        elif name == "trickle-headers":  # even the headers never end
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.trickle(b"X-Slow: " + b"x" * TRICKLE_BYTES)
        else:
            self.reply(500, b"unknown test path")

    def reply(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def trickle(self, data: bytes):
        for byte in data:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            self.trickled[self.path] += 1
            time.sleep(TRICKLE_SECONDS)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with LoopbackServer(ImageServer) as running:
        yield running.base_url


@pytest.fixture
def settings() -> Settings:
    return make_test_settings(
        allow_private_addresses=True,
        fetch_connect_timeout=0.5,
        fetch_read_timeout=0.3,
        fetch_max_redirects=3,
        fetch_attempts=3,
        max_download_bytes=MAX_BYTES,
    )


@pytest.fixture
def fetch(settings):
    with make_http_client(settings) as client:
        yield lambda url: fetch_image(client, url, settings.max_download_bytes)


def failure(fetch, url: str) -> ImageFailure:
    with pytest.raises(ImageFailure) as caught:
        fetch(url)
    return caught.value


def test_ok(fetch, server):
    assert fetch(f"{server}/ok") == BODY


@pytest.mark.parametrize("path, announced", [("/ok", len(BODY)), ("/exactly-max-undeclared", None)])
def test_the_body_size_is_announced_before_the_body_is_read(settings, server, path, announced):
    sizes: list[int | None] = []
    with make_http_client(settings) as client:
        body = fetch_image(client, f"{server}{path}", settings.max_download_bytes, before_body=sizes.append)
    assert sizes == [announced]
    assert len(body) == (len(BODY) if announced else MAX_BYTES)


def test_not_found_fails_at_once(fetch, server):
    assert failure(fetch, f"{server}/missing").code == "http_404"
    assert ImageServer.attempts["/missing"] == 1


@pytest.mark.parametrize("status", [503, 429])
def test_transient_status_is_a_transient_failure_and_the_next_attempt_may_work(fetch, server, status):
    caught = failure(fetch, f"{server}/flaky/{status}")
    assert isinstance(caught, TransientFailure) and caught.code == f"http_{status}"
    assert not caught.host_unreachable  # the host answered
    assert fetch(f"{server}/flaky/{status}") == BODY
    assert ImageServer.attempts[f"/flaky/{status}"] == 2


def test_slow_server_times_out(fetch, server):
    caught = failure(fetch, f"{server}/slow")
    assert isinstance(caught, TransientFailure) and caught.code == "timeout" and caught.host_unreachable
    assert ImageServer.attempts["/slow"] == 1


def test_redirects_up_to_the_limit_are_followed(fetch, server):
    assert fetch(f"{server}/redirect/3") == BODY


def test_too_many_redirects(fetch, server):
    assert failure(fetch, f"{server}/redirect/4").code == "too_many_redirects"
    assert ImageServer.attempts["/redirect/4"] == 1


def test_redirect_to_another_scheme_is_an_invalid_url(fetch, server):
    assert failure(fetch, f"{server}/to-ftp").code == "invalid_url"


def test_declared_length_above_the_limit_is_too_large(fetch, server):
    assert failure(fetch, f"{server}/big-declared").code == "too_large"
    assert ImageServer.attempts["/big-declared"] == 1


def test_undeclared_body_above_the_limit_is_too_large(fetch, server):
    assert failure(fetch, f"{server}/big-undeclared").code == "too_large"


def test_body_at_the_limit_is_accepted(fetch, server):
    assert len(fetch(f"{server}/exactly-max")) == MAX_BYTES


def test_empty_body(fetch, server):
    assert failure(fetch, f"{server}/empty").code == "empty_body"


def test_refused_connection_is_a_connect_error(fetch):
    caught = failure(fetch, f"http://127.0.0.1:{free_port()}/image.jpg")
    assert isinstance(caught, TransientFailure) and caught.code == "connect_error" and caught.host_unreachable


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/image.jpg", "not a url", "http://", "/relative/image.jpg", "http://[::1"]
)
def test_invalid_urls(fetch, url):
    assert failure(fetch, url).code == "invalid_url"


# Only loopback hosts here: were the refusal broken, these requests must still stay on this machine.
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2", "[::1]"])
def test_private_addresses_are_refused_before_any_connection(server, host):
    settings = make_test_settings(fetch_attempts=1)  # the production default: private addresses refused
    assert not settings.allow_private_addresses
    port = server.rsplit(":", 1)[1]
    before = sum(ImageServer.attempts.values())
    with make_http_client(settings) as client, pytest.raises(ImageFailure) as caught:
        fetch_image(client, f"http://{host}:{port}/ok", settings.max_download_bytes)
    assert caught.value.code == "forbidden_address"
    assert sum(ImageServer.attempts.values()) == before


def test_a_redirect_to_a_private_address_is_refused(server):
    """The first hop is a host the operator allowed (an internal image server); it redirects to
    another private host, which the default rule still refuses before connecting."""
    with socket.socket() as listener:  # a second loopback server that must never be asked
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        private_url = f"http://localhost:{listener.getsockname()[1]}/secret.jpg"
        settings = make_test_settings(fetch_attempts=1, allowed_private_hosts=["127.0.0.1"])
        with make_http_client(settings) as client:
            assert fetch_image(client, f"{server}/ok", settings.max_download_bytes) == BODY  # the allowed host works
            with pytest.raises(ImageFailure) as caught:
                fetch_image(client, f"{server}/redirect-to?{private_url}", settings.max_download_bytes)
        assert caught.value.code == "forbidden_address"
        assert "localhost" in caught.value.message
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection was ever made to it


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_server_trickling_bytes_is_cut_off_at_the_total_deadline(server, settings, path):
    """Each byte comes well within the read timeout; the total deadline still ends the download,
    long before the server is done (it counts what it managed to send)."""
    with make_http_client(settings) as client, pytest.raises(TransientFailure) as caught:
        fetch_image(client, server + path, settings.max_download_bytes, total_seconds=0.5)
    assert caught.value.code == "timeout"
    assert "longer than 0.5s in total" in caught.value.message
    assert not caught.value.host_unreachable  # the host answers; the breaker is for hosts that do not
    assert ImageServer.trickled[path] < TRICKLE_BYTES / 2
