"""Why an image can fail: every failure code, in one place, used by the processor, the notifier, the
API's documentation and the event schemas.

A code is stable and machine-readable (no spaces or commas): clients see it in the status answer,
the webhook and the output CSV (as failed:<code>). Besides these, `http_<status>` names an HTTP
answer that is not a success (http_404, http_503, ...)."""

from enum import StrEnum


class FailureCode(StrEnum):
    INVALID_URL = "invalid_url"  # not an absolute http(s) URL, or a redirect to one that is not
    FORBIDDEN_ADDRESS = "forbidden_address"  # the host is private, loopback or link-local
    TIMEOUT = "timeout"  # connecting, a read, or the whole download took too long
    CONNECT_ERROR = "connect_error"  # refused, reset, DNS failure, broken HTTP framing
    TOO_MANY_REDIRECTS = "too_many_redirects"
    TOO_LARGE = "too_large"  # download bytes or image pixels above the limits
    EMPTY_BODY = "empty_body"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_ERROR = "decode_error"  # corrupt or truncated image data
    HOST_UNAVAILABLE = "host_unavailable"  # the host's circuit breaker is open after repeated connection failures
    STORAGE_ERROR = "storage_error"  # the storage refused this image for good (e.g. bad credentials)
    INTERNAL_ERROR = "internal_error"  # an unexpected error, still there after image_max_attempts tries
    LOST = "lost"  # its events were lost, and again after reconcile_max_requests new requests


def http_status(status: int) -> str:
    """The code of an HTTP answer that is not a success, e.g. http_404."""
    return f"http_{status}"


# What a failure code may be: one of FailureCode, or http_<status>.
CODE_PATTERN = "^(" + "|".join(code.value for code in FailureCode) + r"|http_[1-5][0-9][0-9])$"
CODE_DESCRIPTION = "Why the image failed: " + ", ".join(code.value for code in FailureCode) + ", or http_<status>"
