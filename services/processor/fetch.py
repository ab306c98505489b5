"""Download one image over HTTP(S) in one attempt, with limits on time, redirects and size.
Whether and when to try again is the caller's decision (TransientFailure says it may help)."""

import time
from collections.abc import Callable

import httpx

from services.processor.failures import ImageFailure, TransientFailure
from shared.addresses import AddressRule, ForbiddenAddress
from shared.failures import FailureCode, http_status
from shared.outbound import CheckedBackend, address_checked_client, total_deadline
from shared.settings import Settings


def make_http_client(settings: Settings, backend: CheckedBackend | None = None) -> httpx.Client:
    """The client fetch_image expects: its timeouts, redirect limit and address rule come from the
    settings. One client is shared by every download thread of a process (httpx.Client is thread-safe)."""
    return address_checked_client(
        backend or CheckedBackend(AddressRule(settings.allow_private_addresses, settings.allowed_private_hosts)),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=settings.processor_max_in_flight),
        timeout=httpx.Timeout(
            connect=settings.fetch_connect_timeout,
            read=settings.fetch_read_timeout,
            write=settings.fetch_read_timeout,
            pool=settings.fetch_connect_timeout,
        ),
        follow_redirects=True,
        max_redirects=settings.fetch_max_redirects,
        headers={"User-Agent": "imgpipe-processor/1", "Accept": "image/*"},
    )


def check_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ImageFailure(FailureCode.INVALID_URL, f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ImageFailure(FailureCode.INVALID_URL, "only absolute http:// and https:// URLs can be fetched")
    return parsed


def fetch_image(
    client: httpx.Client,
    url: str,
    max_bytes: int,
    total_seconds: float | None = None,
    before_body: Callable[[int | None], None] = lambda declared: None,
) -> bytearray:
    """The body of `url`, or ImageFailure (a TransientFailure when another attempt may succeed).
    total_seconds bounds the whole download, redirects included, however slowly the server sends.
    before_body(the body's declared size, or None) is called once the answer is accepted, before its body is read."""
    check_url(url)
    try:
        with total_deadline(total_seconds) as deadline, client.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise TransientFailure(http_status(status), f"the server answered {status} {response.reason_phrase}")
            if not 200 <= status < 300:
                raise ImageFailure(http_status(status), f"the server answered {status} {response.reason_phrase}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageFailure(
                    FailureCode.TOO_LARGE, f"the server declares {declared} bytes; the limit is {max_bytes}"
                )
            before_body(_declared_size(response))
            body = _read_body(response, max_bytes)
    except ForbiddenAddress as exc:
        raise ImageFailure(FailureCode.FORBIDDEN_ADDRESS, str(exc)) from None
    except httpx.TimeoutException as exc:
        if deadline is not None and time.monotonic() >= deadline:
            raise TransientFailure(
                FailureCode.TIMEOUT, f"the download took longer than {total_seconds:g}s in total"
            ) from None
        raise TransientFailure(
            FailureCode.TIMEOUT, f"timed out ({type(exc).__name__})", host_unreachable=True
        ) from None
    except httpx.TooManyRedirects:
        raise ImageFailure(FailureCode.TOO_MANY_REDIRECTS, "the redirect limit was reached") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # e.g. a redirect to ftp://
        raise ImageFailure(FailureCode.INVALID_URL, f"cannot follow: {exc}") from None
    except httpx.TransportError as exc:  # refused, reset, DNS failure, broken HTTP framing
        raise TransientFailure(
            FailureCode.CONNECT_ERROR, f"{type(exc).__name__}: {exc}", host_unreachable=True
        ) from None
    if not body:
        raise ImageFailure(FailureCode.EMPTY_BODY, "the server answered with an empty body")
    return body


def _declared_size(response: httpx.Response) -> int | None:
    """The body's size as it will be read (a compressed body is decoded, so its Content-Length is not)."""
    declared = response.headers.get("Content-Length", "")
    return int(declared) if declared.isdigit() and not response.headers.get("Content-Encoding") else None


def _read_body(response: httpx.Response, max_bytes: int) -> bytearray:
    """The body, in one buffer sized once from Content-Length when the server gives it (growing a
    buffer chunk by chunk holds up to twice the image at times)."""
    declared = _declared_size(response)
    body = bytearray(declared) if declared is not None else bytearray()
    size = 0
    for chunk in response.iter_bytes():
        end = size + len(chunk)
        if end > max_bytes:
            raise ImageFailure(FailureCode.TOO_LARGE, f"the body exceeds the limit of {max_bytes} bytes")
        body[size:end] = chunk
        size = end
    del body[size:]  # a server that sent less than it declared
    return body
