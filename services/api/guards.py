"""Checks that run before FastAPI reads a request's body (plain ASGI middleware): the API key, and
the size of an upload.

FastAPI parses a multipart body, spooling its file to disk, before any endpoint or dependency runs,
so neither check can wait for the endpoint."""

from collections.abc import Callable

import psycopg
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.errors import database_error, error_response
from services.api.keys import ApiKey

# Paths open without a key: health, the API's own description, and stored images, whose URLs are
# unguessable (<request_id>/<image_id>.<ext>, two random UUIDs) and are handed to webhook receivers.
PUBLIC_PATHS = {"/", "/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC_PREFIXES = ("/files/", "/web/")  # "/" and /web/: the web page, whose API calls carry a key


class RequireApiKey:
    """When `required`, answers 401 to a request without an active key in `Authorization: Bearer <key>`
    (public paths excepted); otherwise puts the key (keys.ApiKey) in the request state as api_key
    (None when keys are not required). find_key(presented) -> the key or None; it may block."""

    def __init__(self, app: ASGIApp, required: bool, find_key: Callable[[str], ApiKey | None], database_url: str):
        self.app = app
        self.required = required
        self.find_key = find_key
        self.database_url = database_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = None
        if self.required and not _is_public(scope["path"]):
            scheme, _, presented = Headers(scope=scope).get("authorization", "").partition(" ")
            presented = presented.strip()
            try:
                key = await run_in_threadpool(self.find_key, presented) if scheme.lower() == "bearer" else None
            except psycopg.OperationalError as exc:  # the server is down, or every read connection in use
                error = await run_in_threadpool(database_error, exc, self.database_url)
                response = error_response(
                    error.status_code, error.code, error.message, headers={**error.headers, "Connection": "close"}
                )
                return await response(scope, receive, send)
            if key is None:
                response = error_response(
                    401,
                    "unauthorized",
                    "this API needs a valid key: Authorization: Bearer <key>",
                    # closed: uvicorn would otherwise read the body of a refused upload to discard it
                    headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
                )
                return await response(scope, receive, send)
        scope.setdefault("state", {})["api_key"] = key
        await self.app(scope, receive, send)


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class _BodyTooLarge(Exception):
    pass


class UploadSizeLimit:
    """Answers 413 csv_too_large to a POST to `path` whose body is larger than max_body_bytes: at once
    when its Content-Length says so (nothing is read), and as soon as the bytes received pass the
    limit otherwise (chunked, or a Content-Length that lies), so that no more than about the limit
    is ever read or spooled. The answer closes the connection: uvicorn would otherwise go on reading
    the rest of the body to discard it."""

    def __init__(self, app: ASGIApp, path: str, max_body_bytes: int, too_large: Callable[[], JSONResponse]):
        self.app = app
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(scope, receive, send)

        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge  # stops the form parser; whatever the app answers is replaced below
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded and not response_started:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded or response_started:
                raise
        if exceeded and not response_started:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self.too_large()
        response.headers["Connection"] = "close"
        await response(scope, receive, send)
