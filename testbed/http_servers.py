"""Real HTTP servers on 127.0.0.1 for the tests: an image host and a webhook receiver."""

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast


class LoopbackHTTPServer(ThreadingHTTPServer):
    """The one HTTP server class of the tests and benchmarks: on 127.0.0.1, a thread per connection, a
    long backlog (many images in flight connect at once; the default of 5 drops connections), and quiet
    about clients that hang up early, which is what many tests provoke."""

    owner: Any  # set by whoever serves with it (LoopbackServer and others); handlers reach it as self.server.owner
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, handler_class):
        super().__init__(("127.0.0.1", 0), handler_class)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class LoopbackServer:
    """A LoopbackHTTPServer in a thread; use as a context manager. Handlers reach it as self.server.owner."""

    def __init__(self, handler_class):
        self._httpd = LoopbackHTTPServer(handler_class)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{cast(str, host)}:{port}"  # an AF_INET server: the host is a str, never bytes

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


class _ImageHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    def log_message(self, *args):
        pass

    def do_GET(self):
        owner = self.server.owner
        with owner.lock:
            owner.requests[self.path] += 1
            owner.active += 1
            owner.most_active = max(owner.most_active, owner.active)
            status = owner.first_statuses[self.path].pop(0) if owner.first_statuses.get(self.path) else 200
        try:
            time.sleep(owner.delays.get(self.path, owner.delay))
            body = owner.files.get(self.path) if status == 200 else b""
            if body is None:
                status, body = 404, b""
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with owner.lock:
                owner.active -= 1


class ImageHost(LoopbackServer):
    """Serves `files` (path -> bytes), each after `delay` seconds (or `delays[path]`); any other path
    answers 404; a path in `first_statuses` answers those statuses first, one per request.
    `requests` counts the GETs per path, `most_active` the most answered at once."""

    def __init__(self):
        super().__init__(_ImageHandler)
        self.files: dict[str, bytes] = {}
        self.delay = 0.0
        self.delays: dict[str, float] = {}
        self.first_statuses: dict[str, list[int]] = {}
        self.requests: Counter = Counter()
        self.active = self.most_active = 0
        self.lock = threading.Lock()

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base_url + path


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


class _WebhookHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(Received(self.path, dict(self.headers), body))
            status = owner.statuses.pop(0) if owner.statuses else owner.default_status
        time.sleep(owner.delay)
        try:
            self.send_response(status)
            if owner.location:
                self.send_header("Location", owner.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except OSError:  # the sender gave up waiting (timeout tests)
            pass


class WebhookReceiver(LoopbackServer):
    """Records every POST; answers with `statuses` in turn, then `default_status`, each after `delay`
    seconds, with a Location header when `location` is set."""

    def __init__(self, statuses=(), default_status: int = 200, delay: float = 0.0, location: str | None = None):
        super().__init__(_WebhookHandler)
        self.requests: list[Received] = []
        self.statuses = list(statuses)
        self.default_status, self.delay, self.location = default_status, delay, location
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.url_for("/hook")

    def url_for(self, path: str) -> str:
        return self.base_url + path

    def posts_to(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if path is None or r.path == path]

    def wait_for(self, count: int = 1, timeout: float = 60, path: str | None = None) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(posts := self.posts_to(path)) < count:
            assert time.monotonic() < deadline, (
                f"expected {count} POSTs to {path or 'any path'} within {timeout}s, got {len(posts)}"
            )
            time.sleep(0.05)
        return posts
