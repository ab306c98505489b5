"""Download one image over HTTP(S), with limits on time, redirects and size, and retries of transient failures."""
import logging
import time

import httpx

from services.processor import failures
from services.processor.failures import ImageFailure
from shared.addresses import ForbiddenAddress, outbound_hooks
from shared.settings import Settings

log = logging.getLogger(__name__)

RETRY_BACKOFF_SECONDS = 0.2  # doubled after each failed attempt: 0.2 s, 0.4 s, ...


def make_http_client(settings: Settings) -> httpx.Client:
    """The client fetch_image expects: its timeouts and redirect limit come from the settings."""
    return httpx.Client(
        timeout=httpx.Timeout(
            connect=settings.fetch_connect_timeout,
            read=settings.fetch_read_timeout,
            write=settings.fetch_read_timeout,
            pool=settings.fetch_connect_timeout,
        ),
        follow_redirects=True,
        max_redirects=settings.fetch_max_redirects,
        headers={"User-Agent": "imgpipe-processor/1", "Accept": "image/*"},
        event_hooks=outbound_hooks(settings.allow_private_addresses, settings.allowed_private_hosts),
    )


def fetch_image(client: httpx.Client, url: str, settings: Settings) -> bytes:
    """Return the body of `url`, or raise ImageFailure once it is clear no further attempt would help."""
    _check_url(url)
    for attempt in range(1, settings.fetch_attempts + 1):
        try:
            return _fetch_once(client, url, settings.max_download_bytes)
        except _Transient as failure:
            if attempt == settings.fetch_attempts:
                raise ImageFailure(failure.code, f"{failure.message} (after {attempt} attempts)") from None
            log.info("fetch attempt %d of %s failed (%s), retrying", attempt, url, failure.code)
            time.sleep(RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
    raise AssertionError("unreachable: settings.fetch_attempts >= 1")


class _Transient(ImageFailure):
    """A failure that another attempt may not have: timeouts, connection problems, 5xx and 429."""


def _check_url(url: str) -> None:
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ImageFailure(failures.INVALID_URL, f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ImageFailure(failures.INVALID_URL, "only absolute http:// and https:// URLs can be fetched")


def _fetch_once(client: httpx.Client, url: str, max_bytes: int) -> bytes:
    try:
        with client.stream("GET", url) as response:
            status = response.status_code
            if status == 429 or status >= 500:
                raise _Transient(failures.http_status(status), f"the server answered {status} {response.reason_phrase}")
            if not 200 <= status < 300:
                raise ImageFailure(failures.http_status(status), f"the server answered {status} {response.reason_phrase}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ImageFailure(failures.TOO_LARGE, f"the server declares {declared} bytes; the limit is {max_bytes}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ImageFailure(failures.TOO_LARGE, f"the body exceeds the limit of {max_bytes} bytes")
    except ForbiddenAddress as exc:
        raise ImageFailure(failures.FORBIDDEN_ADDRESS, str(exc)) from None
    except httpx.TimeoutException as exc:
        raise _Transient(failures.TIMEOUT, f"timed out ({type(exc).__name__})") from None
    except httpx.TooManyRedirects:
        raise ImageFailure(failures.TOO_MANY_REDIRECTS, "the redirect limit was reached") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:  # e.g. a redirect to ftp://
        raise ImageFailure(failures.INVALID_URL, f"cannot follow: {exc}") from None
    except httpx.TransportError as exc:  # refused, reset, DNS failure, broken HTTP framing
        raise _Transient(failures.CONNECT_ERROR, f"{type(exc).__name__}: {exc}") from None
    if not body:
        raise ImageFailure(failures.EMPTY_BODY, "the server answered with an empty body")
    return bytes(body)
