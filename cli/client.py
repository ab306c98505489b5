"""The API as the CLI sees it. Every failure (the API unreachable, an error answer) is a CliError whose
text is one line: the command prints it on stderr and exits non-zero. An answer that says when to come
back (429 or 503 with Retry-After: a limit, or a busy moment) is waited for and the request sent again,
for RETRY_FOR_SECONDS at most in all; that is safe for uploads too, since a refused upload stores nothing."""

import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"
STATUS_PAGE_LIMIT = 1000  # the largest page /status gives
TIMEOUT_SECONDS = 30
RETRY_FOR_SECONDS = 600
RETRYABLE = {429, 503}


class CliError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(one_line(message))
        self.exit_code = exit_code


def one_line(text: str) -> str:
    """No line breaks, and no control characters from an answer reach the terminal."""
    return " ".join("".join(char if char.isprintable() else " " for char in str(text)).split())


class ApiClient:
    def __init__(self, base_url: str, api_key: str | None = None):
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL as exc:
            raise CliError(f"the API address {base_url!r} is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise CliError(f"the API address must be an http(s) URL, not {base_url!r}")
        self.base_url = str(url).rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=TIMEOUT_SECONDS)

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self._http.close()

    def upload(self, csv_path: Path, webhook_url: str | None, options: dict[str, str]) -> dict:
        """options: per-job form fields (quality, max_width, …) passed as given; the API validates them."""
        fields = {**options, **({"webhook_url": webhook_url} if webhook_url else {})}
        with csv_path.open("rb") as csv_file:
            return _json(
                self._request(
                    "POST",
                    "/upload",
                    files={"file": (csv_path.name, csv_file, "text/csv")},
                    data=fields,
                    before_each=lambda: csv_file.seek(0),
                )
            )

    def status_page(self, request_id: str, offset: int = 0, limit: int | None = None) -> dict:
        params = {"offset": offset, **({"limit": limit} if limit else {})}
        return _json(self._request("GET", f"/status/{_path_segment(request_id)}", params=params))

    def status_pages(self, request_id: str):
        """Every page of the job's status, the largest the API gives, in order."""
        offset = 0
        while offset is not None:
            page = self.status_page(request_id, offset, STATUS_PAGE_LIMIT)
            yield page
            offset = page["page"]["next_offset"]

    def jobs_in_progress(self) -> list[str]:
        """The request ids of the jobs not completed yet (those the API key may see), oldest first."""
        answer = _json(self._request("GET", "/jobs", params={"status": ["pending", "processing"], "limit": 1000}))
        return [job["request_id"] for job in answer["jobs"]]

    def output_csv(self, request_id: str) -> bytes:
        return self._request("GET", f"/output_csv/{_path_segment(request_id)}").content

    def _request(
        self, method: str, path: str, before_each: Callable[[], object] | None = None, **kwargs
    ) -> httpx.Response:
        """before_each: run before every attempt (an upload rewinds its file)."""
        give_up_at = time.monotonic() + RETRY_FOR_SECONDS
        while True:
            if before_each is not None:
                before_each()
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, timed out, reset, not HTTP
                raise CliError(f"cannot reach the API at {self.base_url}: {str(exc) or type(exc).__name__}") from None
            if not response.is_error:
                return response
            wait = _retry_after(response)
            if wait is None or time.monotonic() + wait > give_up_at:
                raise CliError(describe_error_answer(response))
            print(f"{describe_error_answer(response)}; retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)


def _retry_after(response: httpx.Response) -> float | None:
    """The seconds a 429 or 503 asks to wait (Retry-After in seconds), else None."""
    value = response.headers.get("Retry-After", "")
    if response.status_code not in RETRYABLE or not value.strip().isdigit():
        return None
    return float(value)


def _json(response: httpx.Response) -> dict:
    try:
        return response.json()
    except ValueError:
        raise CliError(
            f"{_origin(response)} answered {response.status_code} without JSON: is it imgpipe's API?"
        ) from None


def _origin(response: httpx.Response) -> str:
    return f"the server at {response.url.scheme}://{response.url.netloc.decode()}"


def describe_error_answer(response: httpx.Response) -> str:
    """The API's {"error": {"code", "message", …details}} as one line; any other answer by its status."""
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        return f"{_origin(response)} answered {response.status_code} {response.reason_phrase}"
    details = [f"{key} {value}" for key, value in error.items() if key not in ("code", "message") and _is_scalar(value)]
    if isinstance(error.get("counts"), dict):
        counts = error["counts"]
        details.append(
            ", ".join(f"{counts[key]} {key}" for key in ("processed", "failed", "pending", "total") if key in counts)
        )
    hint = " (set IMGPIPE_API_KEY)" if response.status_code == 401 else ""
    return f"{code} ({response.status_code}): {message}" + (f" [{'; '.join(details)}]" if details else "") + hint


def _is_scalar(value) -> bool:
    return isinstance(value, (str, int, float, bool))


def _path_segment(request_id: str) -> str:
    """The id as one path segment, so that no id can name another endpoint (e.g. '../healthz')."""
    return quote(request_id, safe="")
