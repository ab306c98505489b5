"""Why an image can fail: every failure code, in one place, and the exceptions that carry them.

A code is stable and machine-readable (no spaces or commas): clients see it in the status answer,
the webhook and the output CSV (as failed:<code>)."""

INVALID_URL = "invalid_url"  # not an absolute http(s) URL, or a redirect to one that is not
FORBIDDEN_ADDRESS = "forbidden_address"  # the host is private, loopback or link-local
TIMEOUT = "timeout"
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
LOST = "lost"  # its events were lost, and again after reconcile_max_requests new requests (the notifier's reconciler)


def http_status(status: int) -> str:
    """The code of an HTTP answer that is not a success, e.g. http_404."""
    return f"http_{status}"


class ImageFailure(Exception):
    """This image cannot be processed, and trying the same event again would not help."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self):  # crosses back from a compression worker process intact
        return type(self), (self.code, self.message)


class TransientFailure(ImageFailure):
    """A failure that another attempt may not have: timeouts, connection problems, 5xx and 429.
    host_unreachable: the host itself did not answer (a timeout or a connection failure)."""

    def __init__(self, code: str, message: str, host_unreachable: bool = False):
        super().__init__(code, message)
        self.host_unreachable = host_unreachable

    def __reduce__(self):
        return type(self), (self.code, self.message, self.host_unreachable)


class StorageUnavailable(Exception):
    """The storage cannot take images right now (an outage, a disk error). Not the image's fault:
    the image is tried again, without limit, until the storage is back."""
