"""What the API offers to whoever runs it: /readyz (PostgreSQL and Kafka reachable), /metrics
(Prometheus), the count of uploads by outcome, and the request id on the log lines about a job.
Neither endpoint is part of the API's schema."""

import json
import logging
import re

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from psycopg_pool import ConnectionPool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.health import CHECK_TIMEOUT_SECONDS, Readiness, kafka_check
from shared.runtime import log_context
from shared.settings import Settings

log = logging.getLogger(__name__)

UPLOADS = Counter(
    "imgpipe_uploads_total",
    "Uploads by outcome: accepted, or the error code of a refusal (invalid_csv, csv_too_large, unauthorized, "
    "database_unavailable, ...)",
    ["outcome"],
)
MAX_BODY_READ = 64 * 1024  # an upload's answer is a small JSON object
JOB_PATH = re.compile(r"^/(?:status|output_csv)/([0-9a-fA-F-]{36})$")


def install(app: FastAPI, settings: Settings) -> None:
    readiness = Readiness()
    readiness.add("postgresql", lambda: _ping(app.state.pool))
    readiness.add("kafka", kafka_check(settings))

    @app.get("/readyz", include_in_schema=False)
    def readyz():
        status, body = readiness.answer()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # Added after the key and size guards, so they run before them and see their refusals too.
    app.add_middleware(CountUploads)
    app.add_middleware(LogRequestId)


def _ping(pool: ConnectionPool) -> None:
    with pool.connection(timeout=CHECK_TIMEOUT_SECONDS) as conn:
        conn.execute("SELECT 1")


class CountUploads:
    """Counts each POST /upload by its answer, and logs the request id of an accepted one (plain ASGI:
    the body streams through untouched)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/upload" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        status, body = 500, bytearray()  # 500 if the app raises before answering

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(body) < MAX_BODY_READ:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            answer = _json(bytes(body))
            outcome = _outcome(status, answer)
            UPLOADS.labels(outcome=outcome).inc()
            if 200 <= status < 300 and "request_id" in answer:
                log.info(
                    "job %s accepted: %s images",
                    answer["request_id"],
                    answer.get("total_images"),
                    extra={"request_id": answer["request_id"]},
                )


class LogRequestId:
    """Lines logged while a request about a job is answered (its access log line included) carry its
    request_id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        job = JOB_PATH.match(scope["path"]) if scope["type"] == "http" else None
        if job is None:
            return await self.app(scope, receive, send)
        with log_context(request_id=job.group(1)):
            await self.app(scope, receive, send)


def _json(body: bytes) -> dict:
    try:
        answer = json.loads(body)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _outcome(status: int, answer: dict) -> str:
    try:
        return "accepted" if 200 <= status < 300 else answer["error"]["code"]
    except (KeyError, TypeError):
        return f"http_{status}"
