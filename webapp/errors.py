"""JSON error responses, with codes spelled once here, in one of two shapes by path:

- ours: ``{"error": {"code", "message", "field"}}``;
- under /v1/ (the OpenAI-compatible API), OpenAI's: ``{"error": {"message", "type", "param", "code"}}``,
  where ``type`` follows from the status as OpenAI's clients expect and Retry-After is at most
  OPENAI_MAX_RETRY_AFTER_S, the longest wait the ``openai`` package honours (it does not retry at all
  when asked to wait longer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Response


class Code(str):
    """One error code: the string clients see, with its ``status`` on our routes and what it means. A raise
    site names the code alone and the status follows from it (``ApiError``); under /v1/ a 422 is answered as
    OpenAI's 400 (``status_for``). The docs' table of codes is derived from these (``webapp.tools.doctables``,
    compared by a test). ``status`` None: the status of the HTTP error werkzeug raised (``HTTP_ERROR``)."""

    status: int | None
    meaning: str

    def __new__(cls, code: str, status: int | None, meaning: str) -> Code:
        made = super().__new__(cls, code)
        made.status = status
        made.meaning = meaning
        return made

    @property
    def code(self) -> str:
        return str(self)


def _code(code: str, status: int | None, meaning: str) -> Code:
    CODES.append(made := Code(code, status, meaning))
    return made


CODES: list[Code] = []
BAD_JSON = _code(
    "bad_json", 400, "the body is not valid JSON (NaN and Infinity included), not UTF-8, or nested too deeply"
)
INVALID_BODY = _code("invalid_body", 422, "the body is JSON but not an object")
INVALID_FIELD = _code("invalid_field", 422, "a field outside its type or limits, or one the model does not take")
MISSING_FIELD = _code("missing_field", 422, "a required field is absent")
UNKNOWN_FIELD = _code("unknown_field", 422, "a field no route declares: never silently dropped")
UNSUPPORTED_MEDIA_TYPE = _code(
    "unsupported_media_type", 415, "the body is not application/json (multipart/form-data for /v1/images/edits)"
)
PAYLOAD_TOO_LARGE = _code(
    "payload_too_large",
    413,
    "the body is over its route's limit (chunked too), a file over MAX_UPLOAD_BYTES, or a multipart body of "
    "too many parts",
)
NOT_ACCEPTABLE = _code(
    "not_acceptable", 406, "an Accept the server cannot produce, or one that disagrees with the body"
)
NOT_READY = _code(
    "not_ready", 503, "this worker is not READY (loading, draining, failed); Retry-After says when to ask again"
)
WORKER_UNHEALTHY = _code("worker_unhealthy", 503, "the worker turned UNHEALTHY before finishing the job")
OVERLOADED = _code("overloaded", 503, "the worker already holds MAX_ONGOING + MAX_QUEUED jobs; Retry-After")
TIMEOUT = _code("timeout", 504, "the job's deadline passed (queued: dropped unrun; running: interrupted)")
REJECTED_BY_MODEL = _code(
    "rejected_by_model", 422, "the model failed on this request alone while the worker stayed sound"
)
INTERNAL = _code("internal_error", 500, "the worker itself failed (its canary failed too); quote the request id")
NON_FINITE_OUTPUT = _code(
    "non_finite_output", 500, "the model drew NaN or infinite pixels: never sent as a (black) picture"
)
BAD_REQUEST = _code(
    "bad_request",
    400,
    "headers that cannot be parsed, refused before the app (webapp.server.gthread), or a request werkzeug cannot read",
)
REQUEST_TIMEOUT = _code("request_timeout", 408, "the request did not fully arrive within CLIENT_TIMEOUT")
MISSING_API_KEY = _code("missing_api_key", 401, "the route needs an API key and the request carries none")
INVALID_API_KEY = _code("invalid_api_key", 401, "the API key is not one the server accepts")
MODEL_NOT_FOUND = _code("model_not_found", 404, "the OpenAI request names a model not served here")


ADAPTER_FAILED = _code(
    "adapter_failed",
    422,
    "a LoRA adapter the request names could not be used: corrupt, built for another base model, or gone; "
    "remembered as bad until its file changes, while the worker stays READY",
)
INVALID_IMAGE = _code(
    "invalid_image",
    422,
    "an input image or mask the server cannot take: not PNG, JPEG or WebP, corrupt or truncated, animated, "
    "over MAX_UPLOAD_PIXELS, a mask of another size or marking nothing, or a size the model cannot draw",
)
BAD_MULTIPART = _code(
    "bad_multipart", 400, "a multipart/form-data body without a boundary, or one that cannot be parsed"
)
JOB_NOT_FOUND = _code("job_not_found", 404, "no job has this id (or it belongs to another API key)")
JOB_EXPIRED = _code("job_expired", 410, "the job is past its retention (JOB_TTL): its images were deleted")
IDEMPOTENCY_CONFLICT = _code(
    "idempotency_conflict", 422, "the Idempotency-Key already names a job made from another body"
)
JOB_STORE_UNAVAILABLE = _code(
    "job_store_unavailable",
    503,
    "the job store is full (JOB_STORE_MAX_MB, or Redis's maxmemory) or cannot be reached; a submit stored nothing",
)
FOLLOWERS_FULL = _code(
    "followers_full",
    503,
    "this worker already holds THREADS - MAX_ONGOING - MAX_QUEUED - 2 event streams and long polls of jobs",
)
CANCELED = _code("canceled", 409, "a job canceled by a client (the error of a canceled job, never an HTTP answer)")
WORKER_LOST = _code(
    "worker_lost", 500, "the job's worker died on each of its JOB_MAX_ATTEMPTS attempts (a job's error only)"
)
NOT_FOUND = _code("not_found", 404, "no route has this path")
METHOD_NOT_ALLOWED = _code("method_not_allowed", 405, "the route takes other methods, which `Allow` lists")
HTTP_ERROR = _code("http_error", None, "another HTTP error werkzeug raised before a route could answer")
# The code each HTTP error raised by werkzeug or Flask (not by a route) is answered with.
BY_HTTP_STATUS = {400: BAD_REQUEST, 404: NOT_FOUND, 405: METHOD_NOT_ALLOWED, 413: PAYLOAD_TOO_LARGE}


OPENAI_PREFIX = "/v1/"
JOBS_PATH = "/v1/jobs"  # under /v1/ but ours: our error shape and 422s (docs/architecture.md §17)
OPENAI_MAX_RETRY_AFTER_S = 120


class ApiError(Exception):
    """Any answer other than success: a stable ``code`` (its status follows from it), the ``field`` at fault
    (or None) and extra ``headers`` (Retry-After). Every route turns it into the same JSON error body.
    ``status`` is given only with HTTP_ERROR, whose status is the one werkzeug raised."""

    def __init__(
        self,
        code: Code,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = _resolved(code, status)
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self) -> Response:
        return error_response(self.code, self.message, self.field, self.headers, status=self.status)

    def shaped(self, path: str) -> dict[str, Any]:
        """The error body a route at ``path`` answers with (in a stream's ``error`` event too)."""
        return shaped_body(path, status_for(self.status, path), self.code, self.message, self.field)

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "code": self.code, "message": self.message, "field": self.field}


def _resolved(code: Code, status: int | None) -> int:
    """``status`` where given, else the code's own; HTTP_ERROR has none of its own."""
    resolved = status if status is not None else code.status
    if resolved is None:
        raise TypeError(f"{code} takes the status of the HTTP error it answers")
    return resolved


class InvalidRequest(ApiError):
    """A client error (4xx) naming the offending ``field`` where there is one."""


def is_openai(path: str) -> bool:
    """Whether ``path`` is the OpenAI-compatible API's (everything under /v1/ but our own /v1/jobs)."""
    return path.startswith(OPENAI_PREFIX) and not (path == JOBS_PATH or path.startswith(JOBS_PATH + "/"))


def status_for(status: int, path: str) -> int:
    """The status a route at ``path`` answers for ``status``: under /v1/ a 422 is OpenAI's 400 (its API has no
    422 for a bad param or file). The one place a status is mapped to a protocol."""
    return 400 if status == 422 and is_openai(path) else status


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
    """The error body for a request to ``path`` answered with ``status`` (``status_for``'s): OpenAI's shape
    under /v1/, ours elsewhere."""
    if is_openai(path):
        return openai_error_body(status, code, message, field)
    return error_body(code, message, field)


def error_response(
    code: Code,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    status: int | None = None,
) -> Response:
    """The error answer in the shape and status of the route being answered (``status``: the code's own,
    unless given, as ``ApiError`` takes it)."""
    # Flask is imported here, on the first error answer, not with the codes: gunicorn's master reads them
    # (webapp.server.gthread) before it binds its port, and loads Flask only after (docs/architecture.md §13).
    from flask import has_request_context, jsonify, request

    headers = dict(headers or {})
    path = request.path if has_request_context() else ""
    answered = status_for(_resolved(code, status), path)
    response = jsonify(shaped_body(path, answered, code, message, field))
    if is_openai(path) and "Retry-After" in headers:
        headers["Retry-After"] = str(min(int(headers["Retry-After"]), OPENAI_MAX_RETRY_AFTER_S))
    response.status_code = answered
    for name, value in headers.items():
        response.headers[name] = value
    return response
