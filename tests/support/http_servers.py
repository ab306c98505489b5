"""Real HTTP servers on 127.0.0.1 for the tests: an image host and a webhook receiver."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 in a thread; use as a context manager."""

    def __init__(self, handler_class):
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


class _ImageHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(self.server.owner.delay)
        body = self.server.owner.files.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ImageHost(LoopbackServer):
    """Serves `files` (path -> bytes), each after `delay` seconds; any other path answers 404."""

    def __init__(self):
        super().__init__(_ImageHandler)
        self.files: dict[str, bytes] = {}
        self.delay = 0.0

    def add(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.base_url + path


class _WebhookHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        owner = self.server.owner
        with owner.lock:
            owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WebhookReceiver(LoopbackServer):
    """Records every POST and answers 200."""

    def __init__(self):
        super().__init__(_WebhookHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path

    def posts_to(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def wait_for(self, path: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            posts = self.posts_to(path)
            if posts:
                return json.loads(posts[0]["body"])
            time.sleep(0.1)
        raise AssertionError(f"no webhook POST to {path} within {timeout}s")
