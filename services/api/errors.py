"""The one shape of every error answer: {"error": {"code": ..., "message": ..., ...details}}, and what a
database error tells the client: `busy` when the server answers but every connection of the pool is in
use, `database_unavailable` only when it does not answer."""

import logging

import psycopg
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 1
UNAVAILABLE_RETRY_SECONDS = 5
PROBE_TIMEOUT_SECONDS = 2


class ApiError(Exception):
    """Raised by an endpoint to answer status_code with the JSON error body."""

    def __init__(self, status_code: int, code: str, message: str, headers=None, **details):
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers
        self.details = details


def error_response(status_code: int, code: str, message: str, headers=None, **details) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **details}}, status_code, headers=headers)


def database_error(exc: psycopg.OperationalError, database_url: str) -> ApiError:
    """A pool that found no free connection in time while the server answers is busy; anything else
    means the server does not answer. Blocks for up to PROBE_TIMEOUT_SECONDS (run it in a thread)."""
    if isinstance(exc, PoolTimeout) and _server_answers(database_url):
        log.warning("every database connection of the pool is in use: %s", exc)
        return ApiError(
            503,
            "busy",
            "the API is at its capacity for this kind of request; retry shortly",
            headers={"Retry-After": str(BUSY_RETRY_SECONDS)},
        )
    return database_unavailable(exc)


def database_unavailable(reason: object) -> ApiError:
    log.error("database unavailable: %s", reason)
    return ApiError(
        503,
        "database_unavailable",
        "the database does not answer; retry later",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_SECONDS)},
    )


def _server_answers(database_url: str) -> bool:
    try:
        with psycopg.connect(database_url, connect_timeout=PROBE_TIMEOUT_SECONDS) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False
