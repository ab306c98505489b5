"""The HTTP API: upload a CSV, follow a job's progress, download its output CSV, fetch stored images.

Every error answers JSON of one shape: {"error": {"code": ..., "message": ..., ...details}}.
Endpoints are plain functions (run in the threadpool) because their DB and Kafka work blocks.
"""

import io
import logging
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import psycopg
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api import jobs, keys, operations
from services.api.csv_input import CsvError, TooManyImages
from services.api.dispatcher import Dispatcher
from services.api.errors import ApiError, database_error, database_unavailable, error_response
from services.api.guards import RequireApiKey, UploadSizeLimit
from services.api.intake import JobIntake
from services.api.limits import UploadLimits
from services.api.models import Health, JobList, JobState, JobStatus, UploadAccepted, errors
from services.api.options import FIELD_DESCRIPTIONS, read_options
from services.api.output_csv import render_output_csv
from services.api.upload_workers import DatabaseDown, UploadWorkers
from services.api.urls import check_webhook_url
from shared import db, kafka
from shared.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_STATUS_PAGE = 1000
MAX_STATUS_OFFSET = 2**63 - 1  # PostgreSQL's OFFSET is a bigint
HTTP_ERROR_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}
# Besides the CSV, an upload's body holds the multipart boundaries and part headers and the webhook_url field.
MULTIPART_ALLOWANCE_BYTES = 64 * 1024
WEB_PAGE_DIR = Path(__file__).parent / "static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db.migrate(settings.database_url)
        if settings.create_topics:
            kafka.ensure_topics(settings)
        # Bulkheads: reads and uploads never wait for each other's connections.
        app.state.pool = db.make_pool(
            settings.database_url, max_size=settings.api_read_connections, timeout=settings.api_connection_wait_seconds
        )
        app.state.uploads = UploadWorkers(
            settings.database_url, settings.max_concurrent_uploads, settings.api_connection_wait_seconds
        )
        app.state.intake_pool = db.make_pool(
            settings.database_url,
            max_size=1,  # the job intake over Kafka
            timeout=settings.api_connection_wait_seconds,
        )
        app.state.dispatcher = Dispatcher(settings)
        stop = threading.Event()
        dispatcher = threading.Thread(target=app.state.dispatcher.run, args=(stop,), name="dispatcher", daemon=True)
        dispatcher.start()
        producer = kafka.make_producer(settings)  # the job intake's dead letters
        intake = JobIntake(settings, app.state.intake_pool, producer)
        intake_thread = threading.Thread(target=intake.run, args=(stop,), name="job-intake", daemon=True)
        intake_thread.start()
        try:
            yield
        finally:
            stop.set()
            intake_thread.join(timeout=10)
            dispatcher.join(timeout=10)
            app.state.dispatcher.close(timeout=10)
            del app.state.dispatcher  # its producer goes with it, not when the app is collected
            producer.flush(10)
            app.state.uploads.close()
            app.state.intake_pool.close()
            app.state.pool.close()

    app = FastAPI(title="imgpipe", lifespan=lifespan)
    _install_error_handlers(app, settings)
    # Middleware added later runs earlier. First the key, then an upload's declared size, then whether it
    # may come in (its slot, its key's limits): all before its body is read.
    app.add_middleware(UploadLimits, path="/upload", settings=settings, pool=lambda: app.state.pool)
    app.add_middleware(
        UploadSizeLimit,
        path="/upload",
        max_body_bytes=settings.max_csv_bytes + MULTIPART_ALLOWANCE_BYTES,
        too_large=lambda: error_response(413, *_csv_too_large(settings)),
    )
    app.add_middleware(
        RequireApiKey,
        required=settings.api_keys_required,
        find_key=keys.ActiveKeys(lambda: app.state.pool).find,
        database_url=settings.database_url,
    )

    def caller(request: Request) -> uuid.UUID | None:
        """The id of the key of the request (set by RequireApiKey); None when keys are not required."""
        key = request.state.api_key
        if settings.api_keys_required and key is None:  # never show every job for want of a key
            raise ApiError(401, "unauthorized", "this API needs a valid key", headers={"WWW-Authenticate": "Bearer"})
        return None if key is None else key.id

    @app.post("/upload", status_code=202, response_model=UploadAccepted, responses=errors(401, 413, 422, 429, 503))
    def upload(
        request: Request,
        file: Annotated[UploadFile, File()],
        webhook_url: Annotated[str, Form()] = "",
        quality: Annotated[str | None, Form(description=FIELD_DESCRIPTIONS["quality"] + "; 1-95, default 50")] = None,
        max_width: Annotated[str | None, Form(description=FIELD_DESCRIPTIONS["max_width"])] = None,
        max_height: Annotated[str | None, Form(description=FIELD_DESCRIPTIONS["max_height"])] = None,
        format: Annotated[
            str | None, Form(description="keep (default), webp or jpeg. " + FIELD_DESCRIPTIONS["format"])
        ] = None,
    ):
        owner = caller(request)
        options = read_options(
            settings.default_quality, quality=quality, max_width=max_width, max_height=max_height, format=format
        )
        if _size_of(file.file) > settings.max_csv_bytes:
            raise ApiError(413, *_csv_too_large(settings))
        webhook = webhook_url.strip() or None
        if webhook is not None:
            check_webhook_url(webhook, settings)
        allowance = request.state.image_allowance  # what the key's images not finished leave (UploadLimits)
        try:  # the CSV is read as its rows are stored, in a worker process: a bad row rolls the job back
            job_id, total_images = request.app.state.uploads.store(
                file.file, min(settings.max_images_per_job, allowance.images), webhook, owner, options
            )
        except DatabaseDown as exc:
            raise database_unavailable(exc) from None
        except TooManyImages as exc:
            if allowance.images < settings.max_images_per_job:
                raise allowance.refusal() from None
            raise ApiError(422, "too_many_images", exc.message, limit=settings.max_images_per_job) from None
        except CsvError as exc:
            details = {"row": exc.row_number} if exc.row_number is not None else {}
            raise ApiError(422, "invalid_csv", exc.message, **details) from None
        return {
            "request_id": str(job_id),
            "total_images": total_images,
            "events": "queued",  # stored: the dispatcher releases its images at the job's fair share
            "status_url": f"/status/{job_id}",
            "output_csv_url": f"/output_csv/{job_id}",
        }

    @app.get("/status/{request_id}", response_model=JobStatus, responses=errors(401, 404, 422, 503))
    def status(
        request: Request,
        request_id: str,
        offset: Annotated[int, Query(ge=0, le=MAX_STATUS_OFFSET)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=MAX_STATUS_PAGE)] = None,
    ):
        page_size = limit or min(settings.status_page_size, MAX_STATUS_PAGE)
        report = jobs.get_status(request.app.state.pool, _job_id(request_id), caller(request), offset, page_size)
        if report is None:
            raise _job_not_found(request_id)
        return report

    @app.get("/jobs", response_model=JobList, responses=errors(401, 422, 503))
    def list_jobs(
        request: Request,
        status: Annotated[list[JobState], Query()] = ["pending", "processing"],  # noqa: B006 (FastAPI copies it)
        limit: Annotated[int, Query(ge=1, le=MAX_STATUS_PAGE)] = 100,
    ):
        """The jobs in these states that the caller may see (all, without API keys), oldest first."""
        return {"jobs": jobs.list_jobs(request.app.state.pool, list(status), caller(request), limit)}

    @app.get(
        "/output_csv/{request_id}",
        response_class=Response,
        responses={
            200: {
                "description": "The input CSV with an `Output Image Urls` column",
                "content": {CsvResponse.media_type: {"schema": {"type": "string"}}},
            },
            **errors(401, 404, 409, 422, 503),
        },
    )
    def output_csv(request: Request, request_id: str):
        job_id = _job_id(request_id)
        pool = request.app.state.pool
        job = jobs.get_job(pool, job_id, caller(request))
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
        output = jobs.get_output_rows(pool, job_id)
        assert output is not None  # the job was found just above, and jobs are not deleted
        header, rows, images = output
        return CsvResponse(
            render_output_csv(header, rows, images),
            headers={"Content-Disposition": f'attachment; filename="{job_id}.csv"'},
        )

    @app.get("/healthz", response_model=Health)
    def healthz():
        """Alive: the process answers. Whether it can work (PostgreSQL, Kafka) is /readyz."""
        return {"status": "ok"}

    operations.install(app, settings)  # /readyz, /metrics and the count of uploads by outcome

    # The web page (public with API keys on: its calls carry the key the user types in it).
    app.mount("/web", StaticFiles(directory=WEB_PAGE_DIR), name="web")

    @app.get("/", include_in_schema=False)
    def web_page():
        return FileResponse(WEB_PAGE_DIR / "index.html")

    if settings.storage == "local":
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        app.mount("/files", StaticFiles(directory=settings.storage_dir), name="files")

    return app


class CsvResponse(Response):
    media_type = "text/csv; charset=utf-8"


def _size_of(file) -> int:
    """The size of the spooled upload, without reading it."""
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    return size


def _csv_too_large(settings: Settings) -> tuple[str, str]:
    return "csv_too_large", f"the CSV is larger than {settings.max_csv_bytes} bytes"


def _job_id(request_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(request_id)
    except ValueError:
        raise _job_not_found(request_id) from None


def _job_not_found(request_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job with request_id {request_id[:100]!r}")


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ApiError)
    def api_error(_request, exc: ApiError):
        return error_response(exc.status_code, exc.code, exc.message, headers=exc.headers, **exc.details)

    @app.exception_handler(psycopg.OperationalError)  # the server is down, or the pool busy (PoolTimeout)
    def database_error_handler(_request, exc: psycopg.OperationalError):
        error = database_error(exc, settings.database_url)
        return error_response(error.status_code, error.code, error.message, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request, exc: RequestValidationError):
        problems = [
            f"{'.'.join(str(part) for part in error['loc'][1:]) or 'request'}: {error['msg']}" for error in exc.errors()
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
