"""The OpenAI-compatible API: POST /v1/images/generations, POST /v1/images/edits and GET /v1/models
(docs/architecture.md §11).

The generation path is /generate's (``webapp.api.jobs``: read, admit, wait, encode); what differs is the
request's fields (``webapp.api.openai.protocol``), the answer's shape and the error envelope, which
``webapp.errors`` picks for every path under /v1/. An answer's ``data`` items carry OpenAI's ``b64_json``
plus this server's ``seed``; the body also carries ``timings``, ``batch`` and ``worker`` as /generate's
does. OpenAI's clients ignore keys they do not know.

With ``stream: true`` the answer is server-sent events as the ``openai`` package reads them: one
``image_generation.completed`` (``image_edit.completed`` for an edit) event per image, a comment line after
each denoising step (so proxies see traffic), and on failure one ``{"error": {...}}`` event, which the
package raises as an APIError.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from webapp import errors
from webapp.api import answers, auth, bodies, context, job_routes, jobs
from webapp.api.fields import TIMEOUT_HEADER
from webapp.api.openai import protocol
from webapp.api.openai.protocol import ImageRequest
from webapp.errors import ApiError, InvalidRequest
from webapp.model import adapters
from webapp.model.request import GenerationParams
from webapp.runtime import Runtime
from webapp.settings import Settings
from webapp.telemetry import logs

bp = Blueprint("openai", __name__, url_prefix=errors.OPENAI_PREFIX.rstrip("/"))  # the prefix errors shapes by
log = logs.get(__name__)
OWNED_BY = "honest-diffusion"


def _runtime() -> Runtime:
    return context.runtime()


def _entry(runtime: Runtime) -> answers.Model:
    """The served model as OpenAI's model object; ``created`` is when this worker's model finished loading.
    Once it has, ``profile`` says what it draws (webapp.model.profile.ModelProfile): OpenAI's clients ignore it."""
    engine = runtime.engine
    loaded = engine.loaded_at if engine is not None else None
    model = engine.model if engine is not None else None
    return answers.Model(
        id=runtime.settings.model_name,
        created=int(loaded if loaded is not None else time.time()),
        owned_by=OWNED_BY,
        profile=model.profile.as_dict() if model is not None else None,
    )


def _adapter_entries(runtime: Runtime) -> list[answers.Model]:
    """Each LoRA adapter in LORA_DIR as a model whose ``parent`` is the served one, as vLLM lists its LoRA
    modules: a request naming it as ``model`` draws with it at scale 1."""
    base = runtime.settings.model_name
    return [
        answers.Model(id=name, created=adapter.stamp[0] // 1_000_000_000, owned_by=OWNED_BY, parent=base, root=name)
        for name, adapter in adapters.listing(runtime.settings.lora_dir).items()
        if adapter.problem is None
    ]


def _check_model(asked: str | None, settings: Settings) -> None:
    if asked is not None and not settings.serves(asked) and asked not in adapters.listing(settings.lora_dir):
        message = (
            f"model {asked!r} is not served here; this server serves {settings.model_name!r} and the LoRA "
            "adapters /v1/models lists"
        )
        raise InvalidRequest(errors.MODEL_NOT_FOUND, message, "model")


@bp.get("/models")
@auth.required
def models() -> Response:
    """The served model, as OpenAI's model list."""
    runtime = _runtime()
    return jsonify(answers.ModelList(data=[_entry(runtime), *_adapter_entries(runtime)]).body())


@bp.get("/models/<path:model>")
@auth.required
def model(model: str) -> Response:
    """One model: the served one, or a 404 model_not_found."""
    runtime = _runtime()
    try:
        _check_model(model, runtime.settings)
    except ApiError as exc:
        return exc.response()
    named = [entry for entry in _adapter_entries(runtime) if entry.id == model]
    return jsonify((named[0] if named and not runtime.settings.serves(model) else _entry(runtime)).body())


def _plain(value: object) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def _size(params: GenerationParams) -> str:
    return f"{params.width}x{params.height}"


def _answer(admitted: jobs.Admitted, finished: list[Any], urls: list[str] | None = None) -> dict[str, Any]:
    """OpenAI's answer: each image in base64, or at its URL when ``urls`` are given (already stored)."""
    params = admitted.params
    if urls is None:
        data = jobs.encoded(admitted, finished)
        items = [
            answers.ImageData(b64_json=base64.b64encode(item).decode("ascii"), seed=seed)
            for seed, item in zip(params.seeds, data, strict=True)
        ]
    else:
        items = [answers.ImageData(url=url, seed=seed) for seed, url in zip(params.seeds, urls, strict=True)]
    return answers.ImagesResponse(
        created=int(time.time()),
        data=items,
        background="opaque",
        output_format=params.output_format,
        size=_size(params),
        timings=jobs.timings(admitted),
        batch=jobs.batch(admitted),
        worker=jobs.worker(admitted),
        edit=jobs.edit(params),
    ).body()


def _stream(admitted: jobs.Admitted, kind: str) -> Response:
    """The answer as server-sent events; ``kind`` is the event family: image_generation or image_edit."""
    total = admitted.params.steps_run

    def events() -> Iterator[str]:
        for step in jobs.steps(admitted):
            yield f": step {step} of {total}\n\n"
        try:
            finished = jobs.wait(admitted)
        except ApiError as exc:
            yield jobs.event(exc.shaped(errors.OPENAI_PREFIX), "error")
            return
        answer = _answer(admitted, finished)
        for item in answer["data"]:
            completed = {
                "type": f"{kind}.completed",
                "b64_json": item["b64_json"],
                "seed": item["seed"],
                "background": "opaque",
                "created_at": answer["created"],
                "output_format": answer["output_format"],
                "quality": "auto",
                "size": answer["size"],
                "timings": answer["timings"],
            }
            yield jobs.event(completed, f"{kind}.completed")

    response = Response(jobs.streamed(admitted, events()), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"
    return response


@bp.post("/images/generations")
@auth.required
def generations() -> Response:
    """OpenAI's image generation: 400 for a bad or unsupported param (naming it), 404 for another model,
    503 + Retry-After while loading or full (the ``openai`` package retries it), 504 past the deadline."""
    runtime = _runtime()
    received = time.monotonic()
    try:
        payload = jobs.read_json()
        image_request: ImageRequest = protocol.parse(payload, runtime.limits)
        if job_routes.wants_async():  # Prefer: respond-async: stored as a job, answered 202 (§17)
            _check_model(image_request.model, runtime.settings)
            if image_request.stream or image_request.values.get("response_format") == "url":
                message = "a job (Prefer: respond-async) is fetched from its URLs: drop stream and response_format"
                raise InvalidRequest(
                    errors.INVALID_FIELD, message, "stream" if image_request.stream else "response_format"
                )
            return job_routes.accept("openai", payload)
        return _serve(runtime, received, image_request, payload, protocol.generation_params, "image_generation")
    except ApiError as exc:
        return exc.response()


def _serve(
    runtime: Runtime, received: float, image_request: ImageRequest, payload: object, parser: jobs.Parser, kind: str
) -> Response:
    """An OpenAI image request whose fields are valid, from there on: the model it names, admission with
    ``parser``, and the answer, or ``kind`` events (image_generation, image_edit) when streamed. Raises
    ApiError."""
    _check_model(image_request.model, runtime.settings)
    who = image_request.values.get("user") or image_request.values.get("safety_identifier")
    if who:
        log.info("openai_user", user=who)
    by_url = image_request.values.get("response_format") == "url"
    if by_url and image_request.stream:
        message = 'response_format "url" cannot be streamed: the events carry b64_json'
        raise InvalidRequest(errors.INVALID_FIELD, message, "response_format")
    admitted = jobs.admit(runtime, payload, request.headers.get(TIMEOUT_HEADER), received, parser=parser)
    if image_request.stream:
        return _stream(admitted, kind)
    finished = jobs.wait(admitted)
    if by_url:
        kept = {key: value for key, value in image_request.values.items() if _plain(value)}  # an edit's files: not
        urls = job_routes.keep_finished("openai", kept, admitted, finished)
        response = jsonify(_answer(admitted, finished, [request.url_root.rstrip("/") + url for url in urls]))
    else:
        response = jsonify(_answer(admitted, finished))
    response.headers["X-Seeds"] = ",".join(str(seed) for seed in admitted.params.seeds)
    return response


@bp.post("/images/edits")
@bodies.takes_uploads
@auth.required
def edits() -> Response:
    """OpenAI's image edit: a multipart upload of one image (and a mask for inpainting) with a generation's
    params. 400 for a bad param or upload (naming it), 413 for a file over MAX_UPLOAD_BYTES, and otherwise
    the answers of /v1/images/generations."""
    runtime = _runtime()
    received = time.monotonic()
    try:
        form, files = jobs.read_form(runtime.settings)
        edit = protocol.edit_form(form, files, runtime.settings)
        edit_request = protocol.parse_edit(edit, runtime.limits)
        return _serve(runtime, received, edit_request, edit, protocol.edit_params, "image_edit")
    except ApiError as exc:
        return exc.response()
