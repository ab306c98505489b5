"""Everything the services talk to besides Kafka and PostgreSQL, all on 127.0.0.1: an image server in a
process of its own (so its CPU does not share the harness's GIL) with a "black hole" port that accepts
connections and never answers, a port that refuses connections, and the webhook receiver."""

import multiprocessing
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from deploy.local.probe import free_port
from testbed.http_servers import LoopbackHTTPServer, LoopbackServer

LOOPBACK = "127.0.0.1"


class _ImageHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    protocol_version = "HTTP/1.1"  # keep-alive, as a real image host

    def log_message(self, *args):
        pass

    def do_GET(self):
        # the query string only makes URLs unique; .files is set in _serve (LoopbackHTTPServer has no such attribute)
        body = self.server.files.get(urlsplit(self.path).path)  # type: ignore[attr-defined]
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        if body:
            self.wfile.write(body)


def _hold_connections(listener: socket.socket) -> None:
    held = []  # accepted, never read, never answered, never closed: each client waits for its own timeout
    while True:
        connection, _ = listener.accept()
        held.append(connection)


def _serve(directory: Path, ports) -> None:
    """The image server process: /img/<file name> for every file of `directory`, from memory."""
    httpd = LoopbackHTTPServer(_ImageHandler)
    # what _ImageHandler serves, reached as self.server (LoopbackHTTPServer has no such attribute)
    httpd.files = {  # type: ignore[attr-defined]
        f"/img/{path.name}": path.read_bytes() for path in directory.iterdir() if path.suffix in (".jpg", ".png")
    }
    black_hole = socket.create_server((LOOPBACK, 0), backlog=1024)
    threading.Thread(target=_hold_connections, args=(black_hole,), daemon=True).start()
    ports.send((httpd.server_address[1], black_hole.getsockname()[1]))
    httpd.serve_forever()


class ImageServer:
    """Use as a context manager; url() of a cached image, black_hole_url() and refused_url() of bad hosts."""

    def __init__(self, directory: Path):
        context = multiprocessing.get_context("spawn")
        self._ports, child_end = context.Pipe(duplex=False)
        self.process = context.Process(target=_serve, args=(directory, child_end), name="bench-images", daemon=True)
        self.port = self.black_hole_port = 0
        self.refused_port = free_port()

    def __enter__(self) -> "ImageServer":
        self.process.start()
        if not self._ports.poll(60):
            raise RuntimeError("the image server did not start within 60 s")
        self.port, self.black_hole_port = self._ports.recv()
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(10)

    def url(self, name: str, tag: str) -> str:
        return f"http://{LOOPBACK}:{self.port}/img/{name}?{tag}"

    def black_hole_url(self, n: int) -> str:
        return f"http://{LOOPBACK}:{self.black_hole_port}/img/hole{n}.jpg"

    def refused_url(self, n: int) -> str:
        return f"http://{LOOPBACK}:{self.refused_port}/img/refused{n}.jpg"


class _WebhookHandler(BaseHTTPRequestHandler):
    server: LoopbackHTTPServer

    def log_message(self, *args):
        pass

    def do_POST(self):
        arrived = time.monotonic()  # the job's end; taken before reading a body that may be large
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.owner.record(self.path, arrived, body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class WebhookReceiver(LoopbackServer):
    """Timestamps the first POST to each /hook/<key> (time.monotonic, this process's clock)."""

    def __init__(self):
        super().__init__(_WebhookHandler)
        self._arrivals: dict[str, tuple[float, bytes]] = {}
        self._changed = threading.Condition()

    def url(self, key: str) -> str:
        return f"{self.base_url}/hook/{key}"

    def record(self, path: str, arrived: float, body: bytes) -> None:
        with self._changed:
            self._arrivals.setdefault(path.removeprefix("/hook/"), (arrived, body))
            self._changed.notify_all()

    def wait(self, key: str, deadline: float) -> tuple[float, bytes] | None:
        """(arrival time, body) of the webhook for `key`, or None if none came before `deadline` (monotonic)."""
        with self._changed:
            while key not in self._arrivals:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)
            return self._arrivals[key]
