"""JSON error responses, with codes spelled once here, in one of two shapes by path:

- ours: ``{"error": {"code", "message", "field"}}``;
- under /v1/ (the OpenAI-compatible API), OpenAI's: ``{"error": {"message", "type", "param", "code"}}``,
  where ``type`` follows from the status as OpenAI's clients expect and Retry-After is at most
  OPENAI_MAX_RETRY_AFTER_S, the longest wait the ``openai`` package honours (it does not retry at all
  when asked to wait longer).
"""

from __future__ import annotations

from typing import Any

from flask import Response, has_request_context, jsonify, request

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
NON_FINITE_OUTPUT = "non_finite_output"  # the model drew NaN or inf pixels: never sent as a (black) picture
BAD_REQUEST = "bad_request"  # headers that cannot be parsed, refused before the app (webapp.worker)
REQUEST_TIMEOUT = "request_timeout"  # the request did not arrive within CLIENT_TIMEOUT
MISSING_API_KEY = "missing_api_key"
INVALID_API_KEY = "invalid_api_key"
MODEL_NOT_FOUND = "model_not_found"
UNSUPPORTED_VALUE = "unsupported_value"  # a value the OpenAI API takes that this server cannot honour


OPENAI_PREFIX = "/v1/"
OPENAI_MAX_RETRY_AFTER_S = 120


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


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    if status >= 500:
        return "server_error"
    return {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error"
    )


def openai_error_body(status: int, code: str, message: str, field: str | None = None) -> dict[str, dict[str, Any]]:
    return {"error": {"message": message, "type": openai_type(status), "param": field, "code": code}}


def shaped_body(path: str, status: int, code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The error body for a request to ``path``: OpenAI's shape under /v1/, ours elsewhere."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error_body(status, code, message, field)
    return error_body(code, message, field)


def error_response(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error answer in the shape of the route being answered."""
    headers = dict(headers or {})
    path = request.path if has_request_context() else ""
    response = jsonify(shaped_body(path, status, code, message, field))
    if path.startswith(OPENAI_PREFIX) and "Retry-After" in headers:
        headers["Retry-After"] = str(min(int(headers["Retry-After"]), OPENAI_MAX_RETRY_AFTER_S))
    response.status_code = status
    for name, value in headers.items():
        response.headers[name] = value
    return response
