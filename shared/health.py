"""Liveness and readiness: /healthz (the process answers), /readyz (what it needs is reachable), and
the small HTTP server that serves them, with /metrics, for the processor and the notifier (the API
serves the same on its own port: services/api/operations.py).

A readiness check is a function that returns when its dependency is usable and raises, saying why,
when it is not. Checks are run when /readyz is asked, never in the services' hot paths."""

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
from confluent_kafka.admin import AdminClient
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.kafka import client_config
from shared.runtime import StartupError
from shared.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 2.0
NOT_STARTED = "not started yet"

Check = Callable[[], None]


class Readiness:
    """Named checks, all of which must pass. A check expected but not added yet (the service is still
    starting) fails with NOT_STARTED."""

    def __init__(self, *expected: str):
        self._checks: dict[str, Check | None] = dict.fromkeys(expected)

    def expect(self, *names: str) -> None:
        for name in names:
            self._checks.setdefault(name, None)

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def report(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or why not})."""
        results = {}
        for name, check in list(self._checks.items()):
            if check is None:
                results[name] = NOT_STARTED
                continue
            try:
                check()
                results[name] = "ok"
            except Exception as exc:  # whatever the dependency raised is the reason
                results[name] = f"{type(exc).__name__}: {exc}"[:500]
        return all(result == "ok" for result in results.values()), results

    def answer(self) -> tuple[int, dict]:
        """/readyz's answer: 200 or 503, and {"status": "ready" | "not_ready", "checks": {name: "ok" or why not}}."""
        ready, checks = self.report()
        return (200 if ready else 503), {"status": "ready" if ready else "not_ready", "checks": checks}


# The process's own, filled in as the service starts (the processor and the notifier).
readiness = Readiness()


def kafka_check(settings: Settings) -> Check:
    """Kafka answers a metadata request with these settings."""
    admin: AdminClient | None = None

    def check() -> None:
        nonlocal admin
        if admin is None:  # made on first use, then kept connected
            # AdminClient's hints allow only str and number values, not the logger librdkafka takes.
            admin = AdminClient({**client_config(settings), "logger": _Discard()})  # type: ignore[dict-item]
        try:
            admin.list_topics(timeout=CHECK_TIMEOUT_SECONDS)
        finally:
            admin.poll(0)  # serves (and drops) its log lines, which would otherwise pile up while Kafka is down

    return check


def postgresql_check(database_url: str) -> Check:
    """PostgreSQL accepts a connection and answers a query."""

    def check() -> None:
        with psycopg.connect(database_url, connect_timeout=max(1, int(CHECK_TIMEOUT_SECONDS))) as conn:
            conn.execute("SELECT 1")

    return check


def consumer_check(assigned: set) -> Check:
    """The consumer has joined its group and holds at least one partition (a member beyond the
    partition count holds none, and does no work)."""

    def check() -> None:
        if not assigned:
            raise NotReady("no partition assigned")

    return check


class NotReady(Exception):
    pass


class _Discard:
    """A librdkafka logger that drops the lines: a probe's connection failures are its answer."""

    def log(self, *_args) -> None:
        pass


def serve_health(settings: Settings, *expected: str) -> None:
    """Start /healthz, /readyz and /metrics on settings.health_host:health_port in a daemon thread
    (nothing when the port is 0), with the checks `expected` failing until the service adds them.
    The "kafka" and "postgresql" checks are added here, so that /readyz says what is missing while the
    service's start checks wait for them; the service adds "consumer" once it has one."""
    readiness.expect(*expected)
    if "kafka" in expected:
        readiness.add("kafka", kafka_check(settings))
    if "postgresql" in expected:
        readiness.add("postgresql", postgresql_check(settings.database_url))
    if settings.health_port == 0:
        return
    try:
        server = ThreadingHTTPServer((settings.health_host, settings.health_port), _HealthHandler)
    except OSError as exc:
        raise StartupError(
            f"cannot serve health and metrics on {settings.health_host}:{settings.health_port}: "
            f"{exc.strerror or exc} (set health_port, or 0 to turn them off)"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    log.info(
        "health and metrics on http://%s:%d (/healthz, /readyz, /metrics)", settings.health_host, settings.health_port
    )


class _HealthHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._answer(200, "application/json", b'{"status": "ok"}')
        elif path == "/readyz":
            status, body = readiness.answer()
            self._answer(status, "application/json", json.dumps(body).encode())
        elif path == "/metrics":
            self._answer(200, CONTENT_TYPE_LATEST, generate_latest())
        else:
            self._answer(404, "application/json", b'{"error": {"code": "not_found", "message": "no such path"}}')

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:  # probes and scrapes every few seconds: not worth a line each
        pass
