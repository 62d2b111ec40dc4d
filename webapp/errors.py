"""JSON error responses: ``{"error": {"code", "message", "field"}}``, with codes spelled once here."""

from __future__ import annotations

from flask import Response, jsonify

BAD_JSON = "bad_json"
INVALID_BODY = "invalid_body"  # the body is JSON but not an object
INVALID_FIELD = "invalid_field"  # a field outside its type or limits
MISSING_FIELD = "missing_field"
UNKNOWN_FIELD = "unknown_field"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
PAYLOAD_TOO_LARGE = "payload_too_large"
NOT_ACCEPTABLE = "not_acceptable"
NOT_READY = "not_ready"
WORKER_UNHEALTHY = "worker_unhealthy"
OVERLOADED = "overloaded"
TIMEOUT = "timeout"
REJECTED_BY_MODEL = "rejected_by_model"
INTERNAL = "internal_error"
BAD_REQUEST = "bad_request"  # headers that cannot be parsed, refused before the app (webapp.worker)
REQUEST_TIMEOUT = "request_timeout"  # the request did not arrive within CLIENT_TIMEOUT


class ApiError(Exception):
    """Any answer other than success: HTTP ``status``, a stable ``code``, the ``field`` at fault (or None)
    and extra ``headers`` (Retry-After). Every route turns it into the same JSON error body."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.code, self.message, self.field, self.headers)

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "code": self.code, "message": self.message, "field": self.field}


def error_body(code: str, message: str, field: str | None = None) -> dict[str, dict[str, str | None]]:
    """The body every error answer carries."""
    return {"error": {"code": code, "message": message, "field": field}}


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    response = jsonify(error_body(code, message, field))
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response
