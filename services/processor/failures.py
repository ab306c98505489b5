"""The exceptions that carry an image's failure code (shared/failures.py) through the processor."""


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
