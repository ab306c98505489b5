"""The one way an image can fail: a stable code for machines and a message for people."""


class ImageFailure(Exception):
    """This image cannot be processed, and trying the same event again would not help.

    `code` is stable and machine-readable (no spaces or commas): invalid_url, http_<status>, timeout,
    connect_error, too_many_redirects, too_large, empty_body, not_an_image, unsupported_format,
    decode_error, storage_error.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
