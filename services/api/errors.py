"""The one shape of every error answer: {"error": {"code": ..., "message": ..., ...details}}."""
from fastapi.responses import JSONResponse


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
