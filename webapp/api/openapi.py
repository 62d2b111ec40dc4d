"""GET /openapi.json: an OpenAPI 3.1 document of every route, built from the running configuration
(docs/architecture.md §11).

Request bodies are the JSON Schemas of the same pydantic models that validate requests
(``schema.model_of`` over ``fields.FIELDS`` and ``protocol.IMAGE_FIELDS``), so every limit is the
one this server enforces now. The answers are the JSON Schemas of the typed models the routes build
(``webapp.api.answers``), the errors' of ``webapp.errors``. Which routes need an API key comes from the views
themselves (``auth.required`` marks them); the status codes of each operation are declared here. A test
checks that every rule in Flask's URL map is described, and schemathesis checks the server's answers
against this document.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from webapp.api import answers, auth, context, images
from webapp.api.fields import FIELDS, TIMEOUT_HEADER, RequestField
from webapp.api.health import OIP_FALSE
from webapp.api.jobs import JSON, MULTIPART
from webapp.api.openai import protocol
from webapp.api.schema import model_of
from webapp.model.profile import Limits

bp = Blueprint("openapi", __name__)
VERSION = "3.1.0"
HTML = "text/html"
SSE = "text/event-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {JSON: {"schema": _ref(name)}}


def _events(*names: str) -> dict[str, Any]:
    """A server-sent event stream whose events are named ``names``, each with JSON data."""
    event = {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"enum": list(names)}, "data": {"type": "string", "contentMediaType": JSON}},
    }
    return {SSE: {"schema": event}}


def _answers(codes: dict[int, str], shape: str, retry: bool = True) -> dict[str, Any]:
    """Error answers of one ``shape`` (ErrorBody or OpenAIError): status -> meaning."""
    out: dict[str, Any] = {}
    for status, meaning in codes.items():
        answer: dict[str, Any] = {"description": meaning, "content": _json(shape)}
        if status == 503 and retry:
            answer["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "string"}}}
        if status == 401:
            answer["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
        out[str(status)] = answer
    return out


TRANSPORT = {
    400: "The request line, headers or JSON could not be parsed",
    408: "The request did not arrive within CLIENT_TIMEOUT",
    413: "The body is larger than the route's limit, or an image field is over MAX_UPLOAD_BYTES",
    415: "The body is not application/json",
}
GENERATING = {
    422: "A field is outside its type or limits (named in field), or the model failed on this request alone",
    503: "This worker is not READY, is full, or turned UNHEALTHY: retry after Retry-After",
    504: "The deadline (REQUEST_TIMEOUT, timeout_s or X-Request-Timeout) passed",
}
OPENAI = {
    400: "A param is invalid or not supported here (named in param), or the JSON could not be parsed",
    404: "model is not the served model",
    408: TRANSPORT[408],
    413: TRANSPORT[413],
    415: TRANSPORT[415],
    422: "The model failed on this request alone, while the worker stayed sound",
    503: GENERATING[503],
    504: GENERATING[504],
}
UNAUTHORIZED = {401: "An API key is needed (API_KEYS or API_KEYS_FILE is set) and none or a wrong one was sent"}


REF_TEMPLATE = "#/components/schemas/{model}"


def _schema(title: str, fields: tuple[RequestField, ...], limits: Limits, found: dict) -> dict[str, Any]:
    """The JSON Schema of the model validating ``fields``, its nested models (a LoRA adapter's) moved into
    ``found``, the document's components, where its references point."""
    schema = model_of(title, fields, limits).model_json_schema(ref_template=REF_TEMPLATE)
    found.update(schema.pop("$defs", {}))
    return schema


def _request_schemas(limits: Limits) -> dict[str, Any]:
    """The request bodies: the JSON Schemas of the models that validate them."""
    nested: dict[str, Any] = {}
    bodies = {
        "GenerateRequest": _schema("GenerateRequest", FIELDS, limits, nested),
        "CreateImageRequest": _schema(protocol.TITLE, protocol.IMAGE_FIELDS, limits, nested),
        "CreateImageEditRequest": _edit_schema(limits, nested),
    }
    return {**nested, **bodies}


def _edit_schema(limits: Limits, nested: dict[str, Any]) -> dict[str, Any]:
    """/v1/images/edits' multipart body: its fields' schema, with the files as binary parts."""
    schema = _schema(protocol.EDIT_TITLE, protocol.EDIT_FIELDS, limits, nested)
    limit = f"at most MAX_UPLOAD_BYTES={limits.max_upload_bytes} bytes"
    files = {
        name: {"type": "string", "contentMediaType": "image/*", "description": f"{field.meaning} A file part, {limit}."}
        for name, field in protocol.EDIT_FILES.items()
        if name != "image[]"
    }
    if "loras" in schema["properties"]:  # a form field is text: the list travels as its JSON
        meaning = schema["properties"]["loras"]["description"]
        schema["properties"]["loras"] = {"type": "string", "contentMediaType": JSON, "description": meaning}
    schema["properties"] = {**files, **schema["properties"]}
    schema["required"] = ["image", *schema.get("required", [])]
    return schema


def _error_schemas() -> dict[str, Any]:
    """The two error shapes: ours and, under /v1/, OpenAI's (webapp.errors)."""
    error_fields = {"code": {"type": "string"}, "message": {"type": "string"}, "field": {"type": ["string", "null"]}}
    openai_fields = {
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]},
    }
    return {
        "ErrorBody": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": list(error_fields), "properties": error_fields}},
        },
        "OpenAIError": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "object", "required": list(openai_fields), "properties": openai_fields}},
        },
    }


def _answer_schemas() -> dict[str, Any]:
    """The answers that are not errors: the probes' (the readiness verdict's rows), and the JSON Schemas of
    the typed answers the routes build (``webapp.api.answers``), their nested models beside them."""
    worker = {"type": "object", "properties": {"state": {"type": "string"}, "slot": {"type": "integer"}}}
    found: dict[str, Any] = {
        "Health": {
            "type": "object",
            "required": ["status", "reason", "policy", "required_ready", "workers"],
            "properties": {
                "status": {"enum": ["alive", "dead", "ready", "not_ready"]},
                "reason": {"type": "string"},
                "policy": {"type": "string"},
                "required_ready": {"type": "integer"},
                "workers": {"type": "array", "items": worker},
                "job_store": {"enum": ["up", "unavailable", "unknown"]},
                "job_store_error": {"type": "string"},
            },
        },
    }
    for answer in answers.ANSWERS:
        schema = answer.model_json_schema(ref_template=REF_TEMPLATE)
        found.update(schema.pop("$defs", {}))
        found[answer.__name__] = schema
    return found


def _component_schemas(limits: Limits) -> dict[str, Any]:
    return {**_request_schemas(limits), **_error_schemas(), **_answer_schemas()}


def _timeout_header(limits: Limits) -> dict[str, Any]:
    return {
        "name": TIMEOUT_HEADER,
        "in": "header",
        "required": False,
        "description": f"Seconds this request may wait: more than 0, at most {limits.request_timeout:g}",
        "schema": {"type": "string"},
    }


def _binary_images() -> dict[str, Any]:
    return {media: {"schema": {"type": "string", "format": "binary"}} for media in images.BY_MEDIA_TYPE}


def _prefer_async() -> dict[str, Any]:
    return {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "respond-async: store the request as a job and answer 202 with it (/v1/jobs)",
        "schema": {"type": "string"},
    }


def _oip_answers(field: str) -> dict[str, Any]:
    """The Open Inference Protocol's health answers: the status is the boolean (webapp.api.health)."""
    schema = {
        "type": "object",
        "required": [field],
        "properties": {field: {"type": "boolean"}, "name": {"type": "string"}, "reason": {"type": "string"}},
    }
    return {
        "200": {"description": "True", "content": {JSON: {"schema": schema}}},
        str(OIP_FALSE): {"description": "False: reason says why", "content": {JSON: {"schema": schema}}},
    }


def _oip_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """The Open Inference Protocol's health routes (KServe): aliases of the probes."""
    return {
        ("/v2/health/live", "get"): {
            "summary": "Open Inference Protocol liveness: the /healthz verdict",
            "responses": _oip_answers("live"),
        },
        ("/v2/health/ready", "get"): {
            "summary": "Open Inference Protocol readiness: the /readyz verdict",
            "responses": _oip_answers("ready"),
        },
        ("/v2/models/{name}/ready", "get"): {
            "summary": "Open Inference Protocol model readiness: the /readyz verdict for the served model",
            "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                **_oip_answers("ready"),
                "404": {"description": "name is not the served model", "content": _json("ErrorBody")},
            },
        },
    }


def _page_operations() -> dict[tuple[str, str], dict[str, Any]]:
    """The probes, metrics, the demo, this document and the static files."""
    health = {"200": {"description": "Yes", "content": _json("Health")}}
    health["503"] = {"description": "No: reason says why", "content": _json("Health")}
    form_schema = {
        "type": "object",
        "properties": {field.name: {"type": "string"} for field in FIELDS if field.demo or field.kind == "text"}
        | {"random_seed": {"type": "string"}, "api_key": {"type": "string"}},
        "required": ["prompt"],
    }
    html = {HTML: {"schema": {"type": "string"}}}
    return {
        ("/healthz", "get"): {
            "summary": "Liveness: can this container still serve without a restart?",
            "responses": health,
        },
        ("/readyz", "get"): {
            "summary": "Readiness: does READY_POLICY hold over the live workers?",
            "responses": health,
        },
        ("/metrics", "get"): {
            "summary": "Prometheus metrics of every worker",
            "responses": {
                "200": {"description": "Text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}
            },
        },
        ("/", "get"): {"summary": "The HTML demo", "responses": {"200": {"description": "The page", "content": html}}},
        ("/demo", "post"): {
            "summary": "The demo's form without JavaScript",
            "requestBody": {
                "required": True,
                "content": {"application/x-www-form-urlencoded": {"schema": form_schema}},
            },
            "responses": {
                str(status): {"description": meaning, "content": html}
                for status, meaning in {
                    200: "The page with the images",
                    **TRANSPORT,
                    **UNAUTHORIZED,
                    **GENERATING,
                }.items()
                if status != 415
            },
        },
        ("/openapi.json", "get"): {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
        },
        ("/static/{filename}", "get"): {
            "summary": "The demo's script and style sheet",
            "parameters": [{"name": "filename", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The file", "content": {"*/*": {"schema": {"type": "string"}}}},
                "404": {"description": "No such file", "content": _json("ErrorBody")},
            },
        },
    }


def _generation_operations(limits: Limits) -> dict[tuple[str, str], dict[str, Any]]:
    """The routes that generate: /generate, its stream, and the OpenAI API."""
    image_media = _binary_images()
    generate_errors = _answers(
        {**TRANSPORT, 406: "Accept allows none of the answer's types", **GENERATING}, "ErrorBody"
    )
    return {
        ("/generate", "post"): {
            "summary": "Generate images: JSON with base64 images, or one image's bytes (Accept image/png, jpeg, webp)",
            "parameters": [_timeout_header(limits), _prefer_async()],
            "requestBody": {"required": True, "content": _json("GenerateRequest")},
            "responses": {
                "200": {"description": "The images", "content": {**_json("GenerateResponse"), **image_media}},
                "202": {"description": "Stored as a job (Prefer: respond-async)", "content": _json("Job")},
                **generate_errors,
                **_answers(UNAUTHORIZED, "ErrorBody"),
            },
        },
        ("/generate/stream", "post"): {
            "summary": "The same request as server-sent events: queued, progress per step, then done or error",
            "parameters": [_timeout_header(limits)],
            "requestBody": {"required": True, "content": _json("GenerateRequest")},
            "responses": {
                "200": {"description": "The event stream", "content": _events("queued", "progress", "done", "error")},
                **_answers({**TRANSPORT, 422: GENERATING[422], 503: GENERATING[503]}, "ErrorBody"),
                **_answers(UNAUTHORIZED, "ErrorBody"),
            },
        },
        ("/v1/images/generations", "post"): {
            "summary": "OpenAI's Images API: generate images (stream: true for server-sent events)",
            "parameters": [_timeout_header(limits), _prefer_async()],
            "requestBody": {"required": True, "content": _json("CreateImageRequest")},
            "responses": {
                "200": {
                    "description": "The images",
                    "content": {**_json("ImagesResponse"), **_events("image_generation.completed", "error")},
                },
                "202": {"description": "Stored as a job (Prefer: respond-async)", "content": _json("Job")},
                **_answers({**OPENAI, **UNAUTHORIZED}, "OpenAIError"),
            },
        },
        ("/v1/images/edits", "post"): {
            "summary": "OpenAI's Images API: edit an uploaded image (with a mask: inpaint), multipart/form-data",
            "parameters": [_timeout_header(limits)],
            "requestBody": {"required": True, "content": {MULTIPART: {"schema": _ref("CreateImageEditRequest")}}},
            "responses": {
                "200": {
                    "description": "The images",
                    "content": {**_json("ImagesResponse"), **_events("image_edit.completed", "error")},
                },
                **_answers({**OPENAI, 415: "The body is not multipart/form-data", **UNAUTHORIZED}, "OpenAIError"),
            },
        },
        ("/v1/models", "get"): {
            "summary": "OpenAI's model list: the served model",
            "responses": {
                "200": {"description": "The list", "content": _json("ModelList")},
                **_answers(UNAUTHORIZED, "OpenAIError"),
            },
        },
        ("/v1/models/{model}", "get"): {
            "summary": "One model: the served one",
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "The model", "content": _json("Model")},
                **_answers({404: OPENAI[404], **UNAUTHORIZED}, "OpenAIError"),
            },
        },
    }


JOB_ERRORS = {
    404: "No job has this id, or it belongs to another API key",
    410: "The job is past its retention (JOB_TTL); its images were deleted",
    503: "The job store cannot be read now: retry after Retry-After",
}


def _job_operations(limits: Limits) -> dict[tuple[str, str], dict[str, Any]]:
    """Asynchronous jobs (docs/architecture.md §17)."""
    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    prefer = {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": f"respond-async, and/or wait=N: hold the answer up to N s (at most {limits.request_timeout:g})",
        "schema": {"type": "string"},
    }
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "1 to 255 visible ASCII characters: the same key and body return the same job",
        "schema": {"type": "string"},
    }
    job = {"description": "The job", "content": _json("Job")}
    reads = {**_answers(JOB_ERRORS, "ErrorBody"), **_answers(UNAUTHORIZED, "ErrorBody")}
    return {
        ("/v1/jobs", "post"): {
            "summary": "Store a job from /generate's body; any READY worker runs it",
            "parameters": [prefer, key],
            "requestBody": {"required": True, "content": _json("GenerateRequest")},
            "responses": {
                "202": {**job, "headers": {"Location": {"description": "The job", "schema": {"type": "string"}}}},
                "200": {
                    "description": "The job, finished within Prefer: wait, or an Idempotency-Key repeated",
                    "content": _json("Job"),
                },
                **_answers({**TRANSPORT, 422: GENERATING[422], 503: GENERATING[503]}, "ErrorBody"),
                **_answers(UNAUTHORIZED, "ErrorBody"),
            },
        },
        ("/v1/jobs", "get"): {
            "summary": "The caller's jobs, newest first",
            "parameters": [
                {"name": "limit", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "status", "in": "query", "required": False, "schema": {"type": "string"}},
            ],
            "responses": {
                "200": {"description": "The jobs", "content": _json("JobList")},
                **_answers({422: "limit or status is not one this route takes", 503: JOB_ERRORS[503]}, "ErrorBody"),
                **_answers(UNAUTHORIZED, "ErrorBody"),
            },
        },
        ("/v1/jobs/{job_id}", "get"): {
            "summary": "One job (with Prefer: wait=N, once it finishes or N s pass)",
            "parameters": [job_id, prefer],
            "responses": {"200": job, **reads},
        },
        ("/v1/jobs/{job_id}/cancel", "post"): {
            "summary": "Cancel: a queued job at once, a running one between steps; a finished one is unchanged",
            "parameters": [job_id],
            "responses": {"200": job, **reads},
        },
        ("/v1/jobs/{job_id}/events", "get"): {
            "summary": "The job's states as server-sent events; resume with Last-Event-ID",
            "parameters": [job_id],
            "responses": {
                "200": {
                    "description": "The event stream",
                    "content": _events("queued", "running", "progress", "succeeded", "failed", "canceled"),
                },
                **reads,
            },
        },
        ("/v1/jobs/{job_id}/images/{n}", "get"): {
            "summary": "A finished job's image",
            "parameters": [job_id, {"name": "n", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "responses": {
                "200": {
                    "description": "The image's bytes",
                    "content": {
                        media: {"schema": {"type": "string", "format": "binary"}} for media in images.BY_MEDIA_TYPE
                    },
                },
                **reads,
            },
        },
    }


def _operations(limits: Limits) -> dict[tuple[str, str], dict[str, Any]]:
    """Every operation: (OpenAPI path, method) -> its description."""
    return {**_page_operations(), **_oip_operations(), **_generation_operations(limits), **_job_operations(limits)}


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/v1/models/<path:model>`` -> ``/v1/models/{model}``."""
    parts = []
    for part in rule.split("/"):
        if part.startswith("<") and part.endswith(">"):
            part = "{" + part[1:-1].split(":")[-1] + "}"
        parts.append(part)
    return "/".join(parts)


def document(app: Flask, limits: Limits, model_name: str, keys_required: bool) -> dict[str, Any]:
    """The OpenAPI document of ``app`` serving ``model_name`` under ``limits``; the views ``auth.required``
    marks carry a security requirement when ``keys_required``."""
    operations = _operations(limits)
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        path = openapi_path(rule.rule)
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            operation = dict(operations[(path, method.lower())])
            operation["operationId"] = f"{method.lower()}:{rule.endpoint}"
            if keys_required and getattr(view, "requires_key", False):
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
            paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": VERSION,
        "info": {
            "title": "honest-diffusion",
            "version": "0.1.0",
            "description": (
                f"Serving {model_name}. "
                + (
                    f"Limits are this server's configuration with the loaded {limits.model_family} model's "
                    "sizes, side multiple and defaults. "
                    if limits.model_family
                    else "Limits are this server's configuration; the model, once loaded, may narrow the sizes. "
                )
                + f"API keys: {'required on the routes marked with security' if keys_required else 'off'}."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": _component_schemas(limits),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }


@bp.get("/openapi.json")
def openapi_json() -> Response:
    runtime = context.runtime()
    keys_required = auth.keys().enabled
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return jsonify(document(app, runtime.limits, runtime.settings.model_name, keys_required))
