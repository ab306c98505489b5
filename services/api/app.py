"""The HTTP API: upload a CSV, follow a job's progress, download its output CSV, fetch stored images.

Every error answers JSON of one shape: {"error": {"code": ..., "message": ..., ...details}}.
Endpoints are plain functions (run in the threadpool) because their DB and Kafka work blocks.
"""
import logging
import threading
import uuid
from contextlib import asynccontextmanager
from typing import Annotated

import psycopg
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import jobs
from services.api.csv_input import CsvError, TooManyImages, parse_csv
from services.api.output_csv import render_output_csv
from services.api.urls import MAX_URL_LENGTH, is_http_url
from shared import db, kafka
from shared.kafka import DeliveryError
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_STATUS_PAGE = 1000
HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """Raised by an endpoint to answer status_code with the JSON error body."""

    def __init__(self, status_code: int, code: str, message: str, **details):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.details = details


def error_response(status_code: int, code: str, message: str, headers=None, **details) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **details}}, status_code, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db.migrate(settings.database_url)
        if settings.create_topics:
            kafka.ensure_topics(settings)
        app.state.pool = db.make_pool(settings.database_url)
        app.state.producer = kafka.make_producer(settings)
        stop = threading.Event()
        republisher = threading.Thread(target=_republish_loop, args=(app, settings, stop), daemon=True)
        republisher.start()
        try:
            yield
        finally:
            stop.set()
            republisher.join(timeout=10)
            app.state.producer.flush(10)
            app.state.pool.close()

    app = FastAPI(title="imgpipe", lifespan=lifespan)
    _install_error_handlers(app)

    @app.post("/upload", status_code=202)
    def upload(request: Request, file: Annotated[UploadFile, File()], webhook_url: Annotated[str, Form()] = ""):
        data = file.file.read(settings.max_csv_bytes + 1)
        if len(data) > settings.max_csv_bytes:
            raise ApiError(413, "csv_too_large", f"the CSV is larger than {settings.max_csv_bytes} bytes")
        webhook_url = webhook_url.strip() or None
        if webhook_url is not None and not is_http_url(webhook_url):
            raise ApiError(
                422,
                "invalid_webhook_url",
                f"webhook_url must be an absolute http(s) URL with a host, at most {MAX_URL_LENGTH} characters",
            )
        try:
            parsed = parse_csv(data, settings.max_images_per_job)
        except TooManyImages as exc:
            raise ApiError(422, "too_many_images", exc.message, limit=settings.max_images_per_job) from None
        except CsvError as exc:
            details = {"row": exc.row_number} if exc.row_number is not None else {}
            raise ApiError(422, "invalid_csv", exc.message, **details) from None
        try:
            job_id = jobs.create_job(request.app.state.pool, request.app.state.producer, settings, parsed, webhook_url)
        except DeliveryError as exc:
            log.error("upload refused, events not acknowledged by Kafka: %s", exc)
            raise ApiError(503, "events_unavailable", "the event bus is unavailable; nothing was stored, retry later")
        return {
            "request_id": str(job_id),
            "total_images": parsed.total_images,
            "status_url": f"/status/{job_id}",
            "output_csv_url": f"/output_csv/{job_id}",
        }

    @app.get("/status/{request_id}")
    def status(
        request: Request,
        request_id: str,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=MAX_STATUS_PAGE)] = None,
    ):
        page_size = limit or min(settings.status_page_size, MAX_STATUS_PAGE)
        report = jobs.get_status(request.app.state.pool, _job_id(request_id), offset, page_size)
        if report is None:
            raise _job_not_found(request_id)
        return report

    @app.get("/output_csv/{request_id}")
    def output_csv(request: Request, request_id: str):
        job_id = _job_id(request_id)
        pool = request.app.state.pool
        job = jobs.get_job(pool, job_id)
        if job is None:
            raise _job_not_found(request_id)
        if job["status"] != "completed":
            raise ApiError(
                409,
                "job_not_completed",
                "the output CSV is available once every image of the job is processed or failed",
                status=job["status"],
                counts=jobs.job_counts(job),
            )
        header, rows, images = jobs.get_output_rows(pool, job_id)
        return Response(
            render_output_csv(header, rows, images),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'},
        )

    @app.get("/healthz")
    def healthz(request: Request):
        try:
            with request.app.state.pool.connection(timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ApiError(503, "database_unavailable", f"the database does not answer: {exc}") from None
        return {"status": "ok"}

    if settings.storage == "local":
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        app.mount("/files", StaticFiles(directory=settings.storage_dir), name="files")

    return app


def _job_id(request_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(request_id)
    except ValueError:
        raise _job_not_found(request_id) from None


def _job_not_found(request_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with request_id {request_id[:100]!r}")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    def api_error(_request, exc: ApiError):
        return error_response(exc.status_code, exc.code, exc.message, **exc.details)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(part) for part in error['loc'][1:]) or 'request'}: {error['msg']}"
            for error in exc.errors()
        ]
        return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    def http_error(_request, exc: StarletteHTTPException):
        code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    def internal_error(_request, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal error; see the API logs")


def _republish_loop(app: FastAPI, settings: Settings, stop: threading.Event) -> None:
    """Every republish_interval_seconds, produce the events of jobs an API crash left unpublished."""
    while not stop.wait(settings.republish_interval_seconds):
        try:
            count = jobs.republish_unpublished(
                app.state.pool, app.state.producer, settings, settings.republish_after_seconds
            )
            if count:
                log.warning("republished the events of %d job(s) left unpublished", count)
        except Exception:
            log.exception("republishing unpublished jobs failed; retrying in %gs", settings.republish_interval_seconds)
