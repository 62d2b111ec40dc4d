"""The answers that are not errors, declared once as typed models (as vLLM's ``protocol.py`` declares its
requests and answers): the routes build them (``webapp.api.jobs``, ``webapp.api.openai.routes``) and the
OpenAPI document takes their JSON Schemas (``webapp.api.openapi``), so what a route sends and what the
document promises cannot drift apart; schemathesis checks the one against the other.

A field absent from an answer is ``None`` here and left out when the answer is sent (``body``), never sent
as null; the schemas show only the present form (``Absent``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from webapp.api.images import FORMATS
from webapp.queue.store import STATUSES

SIZE_PATTERN = r"^[0-9]+x[0-9]+$"
Size = Annotated[str, Field(pattern=SIZE_PATTERN)]
Format = Literal[tuple(FORMATS)]  # type: ignore[valid-type]
# ``T | Absent`` with a default of None: a field an answer may leave out (never sent as null).
Absent = SkipJsonSchema[None]


def _absent_is_not_null(schema: dict[str, Any]) -> None:
    """An absent field's schema states no default: the answer leaves it out rather than sending null."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class _Answer(BaseModel):
    model_config = ConfigDict(frozen=True, json_schema_extra=_absent_is_not_null)

    def body(self) -> dict[str, Any]:
        """The answer as JSON-ready data, its absent fields left out."""
        return self.model_dump(mode="json", exclude_none=True)


class Edit(_Answer):
    """What an edit did: its mode, strength, the steps that ran, and the input's size as uploaded (the image
    was resized when it differs from the answer's width and height)."""

    mode: Literal["image", "inpaint"]
    strength: float
    denoising_steps: int
    input_size: Size


class Batch(_Answer):
    """The pipeline call the job rode in: how many jobs and images it held."""

    jobs: int
    images: int


class Worker(_Answer):
    """The worker that drew the images."""

    slot: int
    pid: int


class Image(_Answer):
    """One image of /generate's answer, its bytes in base64 under ``<output_format>_base64``."""

    seed: int
    png_base64: str | Absent = None
    jpeg_base64: str | Absent = None
    webp_base64: str | Absent = None


Timings = dict[str, float]  # milliseconds: queue_ms, generate_ms, encode_ms, total_ms (adapter_load_ms)


class _Drawn(_Answer):
    """What /generate's answer and a finished job's output both say of the images (their list apart)."""

    output_format: Format
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    timings: Timings
    batch: Batch
    worker: Worker
    edit: Edit | Absent = None


class GenerateResponse(_Drawn):
    """/generate's JSON answer (and its stream's ``done`` event)."""

    images: list[Image]


class ImageData(_Answer):
    """One image of OpenAI's answer: its bytes in base64, or with ``response_format: "url"`` its URL (a
    finished job's image, docs/architecture.md §17); ``seed`` is ours (OpenAI's clients ignore it)."""

    b64_json: str | Absent = None
    url: str | Absent = None
    seed: int


class ImagesResponse(_Answer):
    """OpenAI's images answer, for generations and edits, with what this server adds."""

    created: int
    data: list[ImageData]
    background: Literal["opaque"]
    output_format: Format
    size: Size
    timings: Timings
    batch: Batch
    worker: Worker
    edit: Edit | Absent = None


class Model(_Answer):
    """One model of /v1/models: the served one (with ``profile`` once loaded), or a LoRA adapter whose
    ``parent`` is the served one."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    profile: dict[str, Any] | Absent = None  # webapp.model.profile.ModelProfile.as_dict
    parent: str | Absent = None
    root: str | Absent = None


class ModelList(_Answer):
    object: Literal["list"] = "list"
    data: list[Model]


class JobImage(_Answer):
    """One image of a finished job: where to fetch its bytes, and its seed."""

    url: str
    seed: int


class JobOutput(_Drawn):
    """A succeeded job's output: /generate's answer with each image's URL in place of its bytes."""

    images: list[JobImage]


class JobError(_Answer):
    code: str
    message: str


class Progress(_Answer):
    """A running job's last finished denoising step, of ``total``."""

    step: int
    total: int | Absent = None


JobStatus = Literal[STATUSES]  # type: ignore[valid-type]


class Job(_Answer):
    """An asynchronous job (docs/architecture.md §17); times are Unix seconds."""

    id: str
    object: Literal["job"] = "job"
    status: JobStatus
    created_at: float
    started_at: float | Absent = None
    completed_at: float | Absent = None
    expires_at: float
    queue_position: int | Absent = None
    progress: Progress | Absent = None
    attempt: int
    request: dict[str, Any]
    error: JobError | Absent = None
    output: JobOutput | Absent = None
    webhook: str | Absent = None
    webhook_events_filter: list[str] | Absent = None


class JobList(_Answer):
    object: Literal["list"] = "list"
    data: list[Job]


ANSWERS: tuple[type[_Answer], ...] = (GenerateResponse, ImagesResponse, ModelList, Job, JobList)
