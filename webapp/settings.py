"""Settings: one validated, frozen object built from environment variables.

Each setting is declared once, as a field of ``Settings``: its variable, default, bounds and meaning.
pydantic parses and checks the values; the docs' settings table (``webapp.tools.doctables``, which a test
compares with docs/configuration.md) and the error messages are derived from the same declarations. A bad value
raises ``SettingsError`` naming the variable: the server refuses to start rather than fall back silently.

gunicorn's own worker count is gunicorn's: it reads ``WEB_CONCURRENCY`` (or ``-w``) itself, and the master
hands the count it really runs to ``Settings.for_workers``. The gunicorn settings below that gunicorn does
not read from the environment itself (bind, threads, timeouts, recycling, logging) are declared here and
passed to it by gunicorn.conf.py, flat.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo

# The embedded models, served by name (webapp/model/pipeline.py resolves them to folders, then from_pretrained):
# the default, trained on generated scenes (webapp/model/weights/scenes-64, training/train.py), and the random-weight
# pipeline it was grown from, kept as the floor bench/quality.py compares against.
SCENES_MODEL = "builtin:scenes-64"
BUILTIN_TINY_MODEL = "builtin:tiny-sd"
EMBEDDED_MODELS = (SCENES_MODEL, BUILTIN_TINY_MODEL)
SIZE_MULTIPLE = 8  # the configured sizes' multiple; a loaded model may ask for more (webapp/model/profile.py)
# The embedded models are made for 64x64 and their UNets attend over every latent position at the top level:
# the random one at 512x512 took 41 s for one step of two images on 2 CPUs (STALL_TIMEOUT is 60 s), and
# 1024x1024 needs tens of GiB. Their MAX_IMAGE_SIZE defaults to this instead of 1024.
TINY_MODEL_MAX_SIZE = 256
# The embedded model's own LoRA adapters (training/train_lora.py), its LORA_DIR when none is set.
EMBEDDED_LORA_DIR = Path(__file__).resolve().parent / "model" / "weights" / "loras"
# When MAX_UPLOAD_PIXELS is unset, an edit's input may be this many times the largest side the model draws, each
# way: a 12 MP phone photo for SDXL's 1024 (16.7 MP), 1024x1024 for the embedded model's 256. Room to resize, and a
# bound on what one decode costs (about 3 bytes a pixel, times the few conversions).
UPLOAD_SIDE_FACTOR = 4
STARTUP_OVERHEAD_S = 60  # imports (5-10 s measured) plus the last load attempt, on top of LOAD_MAX_SECONDS


def base64_chars(size: int) -> int:
    """The length of ``size`` bytes in base64 (4 characters per 3 bytes, padded)."""
    return 4 * -(-size // 3)


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the environment variable."""


def _setting(variable: str, default: Any, meaning: str, expected: str = "", **bounds: Any) -> Any:
    """One setting: read from ``variable``, ``default`` when unset, with its ``meaning`` for the README and,
    where its bounds are not numbers, what it ``expected`` in words for the error message."""
    extra = {"expected": expected} if expected else None
    return Field(default, validation_alias=variable, description=meaning, json_schema_extra=extra, **bounds)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _default_board_dir(value: Any) -> Any:
    if value not in ("", None):
        return value
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _empty_is_none(value: Any) -> Any:
    return None if value in ("", None) else value


def _folder(path: Path | None) -> Path | None:
    """LORA_DIR must be a folder at start; what it holds is read at each request."""
    if path is not None and not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    return path


def _key_file(path: Path | None) -> Path | None:
    """An API key file must be readable at start: a server meant to be closed must not start open."""
    if path is None:
        return None
    try:
        path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it: {exc}") from None
    return path


Choice = Annotated[str, BeforeValidator(_lower)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class _Group(BaseModel):
    """What every group of settings shares: frozen, strict about unknown names, read by variable."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True, validate_default=True
    )


class _Serving(_Group):
    """Where gunicorn binds and how its workers run, stop and recycle."""

    host: str = _setting("HOST", "0.0.0.0", "Address gunicorn binds.", min_length=1)
    port: int = _setting("PORT", 8080, "Port gunicorn binds (Cloud Run sets it).", ge=1, le=65535)
    threads: int = _setting(
        "THREADS", 16, "gthread request threads per worker; at least MAX_ONGOING + MAX_QUEUED + 2.", ge=3, le=4096
    )
    engine_nice: int = _setting(
        "ENGINE_NICE",
        10,
        "How much lower the CPU priority of each worker's engine thread (and the torch threads it starts) is than "
        "its request threads', in nice steps; 0 = the same. Probes then wait less behind generation.",
        ge=0,
        le=19,
    )
    max_requests: int = _setting(
        "MAX_REQUESTS",
        0,
        "gunicorn max_requests: recycle a worker after this many requests; 0 = never.",
        ge=0,
        le=10**7,
    )
    max_requests_jitter: int = _setting(
        "MAX_REQUESTS_JITTER", 0, "gunicorn max_requests_jitter, so workers do not recycle together.", ge=0, le=10**7
    )
    graceful_timeout: Number = _setting(
        "GRACEFUL_TIMEOUT", 30, "Seconds a worker may finish in-flight work after SIGTERM.", ge=0, le=3600
    )
    master_preimport: bool = _setting(
        "MASTER_PREIMPORT",
        True,
        "1 = once the first worker is forked, the master imports the model code (torch, diffusers, the "
        "pipeline classes) so later workers inherit it: a replacement only loads weights. 0 = each worker imports.",
    )
    worker_timeout: Number = _setting(
        "WORKER_TIMEOUT",
        60,
        "gunicorn timeout: a worker whose main loop is frozen this long is killed.",
        ge=1,
        le=86400,
    )


class _Model(_Group):
    """The model, where it runs, and how its load is retried."""

    model_id: str = _setting(
        "MODEL_ID",
        SCENES_MODEL,
        f"Model to serve: a local folder, a hub id, or an embedded one ({SCENES_MODEL}: trained on generated "
        f"scenes, draws what is asked; {BUILTIN_TINY_MODEL}: random weights, noise).",
        min_length=1,
    )
    model_cache_dir: Annotated[Path, AfterValidator(Path.expanduser)] = _setting(
        "MODEL_CACHE_DIR", "~/.cache/honest-diffusion", f"Where {BUILTIN_TINY_MODEL} is built."
    )
    lora_dir: Annotated[Path | None, BeforeValidator(_empty_is_none), AfterValidator(_folder)] = _setting(
        "LORA_DIR",
        "",
        "Folder of LoRA adapters requests may name (a .safetensors file or a folder each, named by it), read "
        f"at each request; empty = none, or the embedded model's own when MODEL_ID is {SCENES_MODEL}.",
    )
    lora_cache_size: int = _setting(
        "LORA_CACHE_SIZE", 4, "LoRA adapters a worker keeps loaded (least recently used evicted).", ge=1, le=256
    )
    max_loras: int = _setting("MAX_LORAS", 2, "Most LoRA adapters one request may name.", ge=1, le=16)
    max_lora_scale: Number = _setting(
        "MAX_LORA_SCALE", 2, "Largest LoRA scale a request may give (from -MAX_LORA_SCALE).", ge=0, le=100
    )
    model_loader: str = _setting(
        "MODEL_LOADER",
        "webapp.model.pipeline:load",
        "Callable `module:function(settings, slot)` returning a model.",
        expected="module.path:function",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
    )
    device: Choice = _setting(
        "DEVICE",
        "auto",
        "auto (cuda:<slot % GPUs> when CUDA is there, else cpu), cpu, cuda or cuda:N.",
        expected="auto, cpu, cuda or cuda:N",
        pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
    )
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"], BeforeValidator(_lower)] = _setting(
        "DTYPE",
        "auto",
        "auto (on CUDA the model family's: bfloat16 for FLUX and SD3, float16 for SD and SDXL; float32 on CPU), "
        "float32, float16 or bfloat16.",
    )
    torch_threads: int = _setting(
        "TORCH_THREADS", 0, "CPU threads per worker for torch; 0 = cores / workers.", ge=0, le=1024
    )
    load_max_attempts: int = _setting("LOAD_MAX_ATTEMPTS", 5, "Load attempts before a worker is FAILED.", ge=1, le=1000)
    load_max_seconds: Number = _setting(
        "LOAD_MAX_SECONDS", 180, "Total load budget; no retry starts that would end past it.", ge=0.1, le=86400
    )
    load_backoff_initial: Number = _setting(
        "LOAD_BACKOFF_INITIAL", 2, "First retry wait in seconds (exponential, with jitter).", ge=0, le=3600
    )
    load_backoff_max: Number = _setting(
        "LOAD_BACKOFF_MAX", 30, "Longest wait between attempts, seconds.", ge=0, le=3600
    )


class _Health(_Group):
    """What the probes judge: the readiness policy, heartbeats, stalls and failure streaks."""

    ready_policy: Choice = _setting(
        "READY_POLICY",
        "all",
        "/readyz is 200 when: all = every worker READY, any = one, N = at least N.",
        expected="all, any, or a number of workers",
        pattern=r"^(all|any|[1-9]\d{0,3})$",
    )
    heartbeat_interval: Number = _setting(
        "HEARTBEAT_INTERVAL", 1, "Seconds between a worker's heartbeats on the board.", ge=0.05, le=60
    )
    heartbeat_timeout: Number = _setting(
        "HEARTBEAT_TIMEOUT", 10, "A heartbeat older than this marks the worker stale (not ready).", ge=0.1, le=3600
    )
    board_dir: Annotated[Path, BeforeValidator(_default_board_dir)] = _setting(
        "BOARD_DIR", "", "Folder for the readiness board; empty = /dev/shm, else the temp dir."
    )
    stall_timeout: Number = _setting(
        "STALL_TIMEOUT", 60, "A denoising step running longer than this makes the worker UNHEALTHY.", ge=0.1, le=86400
    )
    max_consecutive_failures: int = _setting(
        "MAX_CONSECUTIVE_FAILURES", 5, "Failed generations in a row that make a worker UNHEALTHY.", ge=1, le=1_000_000
    )
    crash_loop_limit: int = _setting(
        "CRASH_LOOP_LIMIT",
        5,
        "Deaths in a row of a slot's workers before READY that turn /healthz 503.",
        ge=1,
        le=65535,
    )
    respawn_backoff_initial: Number = _setting(
        "RESPAWN_BACKOFF_INITIAL", 1, "Wait before loading again after a slot's worker crashed, seconds.", ge=0, le=3600
    )
    respawn_backoff_max: Number = _setting(
        "RESPAWN_BACKOFF_MAX", 60, "Longest respawn wait, seconds (doubles per crash in a row).", ge=0, le=86400
    )


class _Traffic(_Group):
    """Admission, batching, deadlines and the limits of one request."""

    request_timeout: Number = _setting(
        "REQUEST_TIMEOUT", 120, "Seconds a /generate request may wait for its images (504 after).", ge=0.1, le=86400
    )
    max_ongoing: int = _setting(
        "MAX_ONGOING", 4, "Jobs a worker runs on its device at once (in one batch).", ge=1, le=1024
    )
    max_queued: int = _setting(
        "MAX_QUEUED", 8, "Jobs that may wait per worker beyond MAX_ONGOING; more are shed with 503.", ge=0, le=10000
    )
    max_batch_size: int = _setting(
        "MAX_BATCH_SIZE", 4, "Images in one pipeline call; compatible queued jobs share it.", ge=1, le=1024
    )
    batch_wait_ms: Number = _setting(
        "BATCH_WAIT_MS", 0, "How long an idle engine waits for more jobs to fill a batch.", ge=0, le=60000
    )
    max_body_bytes: int = _setting(
        "MAX_BODY_BYTES",
        65536,
        "Largest request body without its images (413 above); a route that takes images adds room for two "
        "uploads (MAX_UPLOAD_BYTES each, base64 in JSON).",
        ge=1024,
        le=64 * 1024 * 1024,
    )
    max_upload_bytes: int = _setting(
        "MAX_UPLOAD_BYTES",
        8 * 1024 * 1024,
        "Largest input image or mask file of an edit (413 above, naming the field).",
        ge=1024,
        le=256 * 1024 * 1024,
    )
    max_upload_pixels: Annotated[int | None, BeforeValidator(_empty_is_none)] = _setting(
        "MAX_UPLOAD_PIXELS",
        "",
        f"Most pixels an input image or mask may declare: refused from its header, before it is decoded; empty = "
        f"({UPLOAD_SIDE_FACTOR} x the largest side the loaded model draws) squared.",
        ge=64 * 64,
        le=1 << 27,  # under PIL's own guard (2 x 89478485 pixels), so this limit is the one a client meets
    )
    max_decodes: int = _setting(
        "MAX_DECODES",
        2,
        "Input images a worker decodes at once, on threads ENGINE_NICE below the request threads; an upload is "
        "decoded only once its job holds a place in the worker.",
        ge=1,
        le=64,
    )
    client_timeout: Number = _setting(
        "CLIENT_TIMEOUT",
        20,
        "Seconds a client has to send a whole request (408 after) and to take each part of an answer.",
        ge=0.5,
        le=3600,
    )
    max_prompt_chars: int = _setting(
        "MAX_PROMPT_CHARS", 2000, "Longest prompt and negative_prompt.", ge=1, le=1_000_000
    )
    default_steps: Annotated[int | None, BeforeValidator(_empty_is_none)] = _setting(
        "DEFAULT_STEPS",
        "",
        "num_inference_steps when the request gives none; empty = the model family's (docs/models.md).",
        ge=1,
        le=10000,
    )
    max_steps: int = _setting("MAX_STEPS", 100, "Largest num_inference_steps.", ge=1, le=10000)
    max_guidance: Number = _setting("MAX_GUIDANCE", 30, "Largest guidance_scale.", ge=0, le=1000)
    default_guidance: Annotated[Number | None, BeforeValidator(_empty_is_none)] = _setting(
        "DEFAULT_GUIDANCE",
        "",
        "guidance_scale when the request gives none; empty = the model family's (docs/models.md).",
        ge=0,
        le=1000,
    )
    min_image_size: int = _setting(
        "MIN_IMAGE_SIZE", 64, "Smallest width or height (a multiple of 8).", ge=8, le=8192, multiple_of=SIZE_MULTIPLE
    )
    max_image_size: int = _setting(
        "MAX_IMAGE_SIZE",
        1024,
        f"Largest width or height (a multiple of 8); {TINY_MODEL_MAX_SIZE} when unset and MODEL_ID is an embedded "
        "model, whose steps take minutes past it.",
        ge=8,
        le=8192,
        multiple_of=SIZE_MULTIPLE,
    )
    max_images: int = _setting("MAX_IMAGES", 4, "Largest num_images per request.", ge=1, le=64)


class _Access(_Group):
    """Logs, API keys and the served model's name."""

    access_log: bool = _setting("ACCESS_LOG", True, "1 = access log on stdout, 0 = off.")
    probe_detail: Annotated[Literal["full", "brief"], BeforeValidator(_lower)] = _setting(
        "PROBE_DETAIL",
        "full",
        "What the open probes show: full = one row per worker (pid, device, model, error text); brief = the verdict "
        "and its reason alone, the rows only to a request with an API key (and to `honest-diffusion status`).",
    )
    log_probes: bool = _setting("LOG_PROBES", False, "1 = log /healthz and /readyz requests in the access log too.")
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = _setting(
        "LOG_LEVEL", "info", "gunicorn and app log level."
    )
    log_format: Annotated[Literal["kv", "json"], BeforeValidator(_lower)] = _setting(
        "LOG_FORMAT", "kv", "kv = one logfmt line (key=value) per event, json = one JSON object per line."
    )
    api_keys: SecretStr = _setting(
        "API_KEYS",
        "",
        "Comma-separated API keys; when this or API_KEYS_FILE is set, generating routes need one.",
    )
    api_keys_file: Annotated[Path | None, BeforeValidator(_empty_is_none), AfterValidator(_key_file)] = _setting(
        "API_KEYS_FILE", "", "File of API keys, one per line (a mounted secret); re-read when it changes."
    )
    served_model_name: str = _setting(
        "SERVED_MODEL_NAME",
        "",
        "The model's id in /v1/models and the OpenAI API's `model`; empty = MODEL_ID.",
        max_length=256,
    )


def _webhook_secret(value: SecretStr) -> SecretStr:
    """WEBHOOK_SECRET: empty, or ``whsec_`` and base64 of at least 24 bytes (the Standard Webhooks form)."""
    import base64
    import binascii

    text = value.get_secret_value()
    if not text:
        return value
    try:
        key = base64.b64decode(text.removeprefix("whsec_") + "==", validate=False)
    except (binascii.Error, ValueError):
        key = b""
    if not text.startswith("whsec_") or len(key) < 24:
        raise ValueError("WEBHOOK_SECRET must be whsec_ followed by the base64 of at least 24 random bytes")
    return value


def _schedule(value: Any) -> Any:
    """WEBHOOK_RETRY_SCHEDULE: comma-separated seconds, each from 0 to a week."""
    if not isinstance(value, str):
        return value
    try:
        delays = tuple(float(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ValueError("WEBHOOK_RETRY_SCHEDULE must be seconds separated by commas (5,300,1800)") from None
    if not all(0 <= delay <= 604800 for delay in delays):
        raise ValueError("WEBHOOK_RETRY_SCHEDULE's delays must be from 0 to 604800 seconds")
    return delays


def _default_job_store(value: Any) -> Any:
    """An empty JOB_STORE: a file in the user's state folder (XDG), which a server run by anyone can write."""
    if value not in ("", None):
        return value
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return f"sqlite:///{os.path.abspath(os.path.join(state, 'honest-diffusion', 'jobs.sqlite3'))}"


def _job_store(value: str) -> str:
    """JOB_STORE: ``sqlite:///`` and an absolute path, as SQLAlchemy writes a SQLite URL (four slashes), or a
    Redis URL (``redis://``, ``rediss://`` for TLS) as redis-py reads it."""
    if value.startswith(("redis://", "rediss://")):
        return value
    path = value.removeprefix("sqlite:///")
    if path == value or not path.startswith("/"):
        raise ValueError(
            "JOB_STORE must be sqlite:/// followed by an absolute path (sqlite:////data/jobs.sqlite3), or a "
            "redis:// or rediss:// URL"
        )
    return value


def _replica_name(value: str) -> str:
    """REPLICA_NAME, or the host name and a random suffix: two replicas on one host, or on hosts that all call
    themselves localhost, must never share a name (a start releases the jobs held under its own)."""
    return value or f"{socket.gethostname()}-{secrets.token_hex(3)}"


class _Jobs(_Group):
    """Asynchronous jobs (docs/architecture.md §17): where they are kept, for how long, and how often one is
    tried again."""

    job_store: Annotated[str, BeforeValidator(_default_job_store), AfterValidator(_job_store)] = _setting(
        "JOB_STORE",
        "",
        "Where jobs are kept: sqlite:/// and an absolute path (WAL mode), in a folder mounted as a volume; empty "
        "= $XDG_STATE_HOME (~/.local/state)/honest-diffusion/jobs.sqlite3 (the image sets /var/lib/honest-diffusion); "
        "or redis://[:password@]host:port/db (rediss:// for TLS), one queue for a fleet of replicas.",
    )
    replica_name: Annotated[str, AfterValidator(_replica_name)] = _setting(
        "REPLICA_NAME",
        "",
        "This replica's name in a shared job store, which its workers' leases carry: unique per replica and "
        "the same across its restarts (a pod's name), so a restarted replica gives back its jobs at once; "
        "empty = the host name and a random suffix, new at each start (its jobs then wait out their lease).",
        max_length=200,
    )
    job_ttl: int = _setting(
        "JOB_TTL", 86400, "Seconds a job and its images are kept; after that it answers 410.", ge=1, le=31536000
    )
    job_lease_seconds: Number = _setting(
        "JOB_LEASE_SECONDS",
        30,
        "A running job's lease, renewed by its worker; one not renewed in time goes back to the queue.",
        ge=1,
        le=3600,
    )
    job_max_attempts: int = _setting(
        "JOB_MAX_ATTEMPTS", 2, "Attempts at a job whose worker died, before it fails naming the deaths.", ge=1, le=100
    )
    job_store_max_mb: int = _setting(
        "JOB_STORE_MAX_MB",
        1024,
        "The SQLite store's largest size; a full store makes submits 503 (a Redis is bounded by its maxmemory).",
        ge=1,
        le=1048576,
    )
    job_poll_interval: Number = _setting(
        "JOB_POLL_INTERVAL", 0.05, "Seconds between a READY worker's looks for queued jobs.", ge=0.01, le=60
    )
    webhook_secret: Annotated[SecretStr, AfterValidator(_webhook_secret)] = _setting(
        "WEBHOOK_SECRET",
        "",
        "The key webhooks are signed with (Standard Webhooks: whsec_ and base64); empty = jobs may not name one.",
    )
    webhook_retry_schedule: Annotated[tuple[float, ...], BeforeValidator(_schedule)] = _setting(
        "WEBHOOK_RETRY_SCHEDULE",
        "5,300,1800,7200,18000,36000,50400,72000,86400",
        "Seconds before each retry of a webhook delivery, comma-separated (the Standard Webhooks schedule).",
    )
    webhook_allow_private: bool = _setting(
        "WEBHOOK_ALLOW_PRIVATE",
        False,
        "1 = webhooks may target loopback and private addresses (never link-local or multicast).",
    )
    webhook_timeout: Number = _setting(
        "WEBHOOK_TIMEOUT", 10, "Seconds one webhook delivery may take before it counts as failed.", ge=0.1, le=300
    )


class Settings(_Jobs, _Access, _Traffic, _Health, _Model, _Serving):
    """Validated configuration; build it with ``Settings.from_env()``. Each setting is declared once, in the
    group above it belongs to (pydantic collects the groups' fields, the last base's first, so the table
    reads serving, model, health, traffic, access); the relations between settings are checked here."""

    # Not read from the environment: gunicorn's own count (WEB_CONCURRENCY or -w), given by ``for_workers``
    # once the master knows it; None until then.
    workers: int | None = Field(None, ge=1, le=64, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _tiny_model_size(cls, data: Any) -> Any:
        """An unset MAX_IMAGE_SIZE for an embedded model is TINY_MODEL_MAX_SIZE (see there)."""
        if not isinstance(data, dict) or {"MAX_IMAGE_SIZE", "max_image_size"} & set(data):
            return data
        tiny = data.get("MODEL_ID", data.get("model_id", SCENES_MODEL)) in EMBEDDED_MODELS
        return {**data, "MAX_IMAGE_SIZE": TINY_MODEL_MAX_SIZE} if tiny else data

    @model_validator(mode="before")
    @classmethod
    def _embedded_loras(cls, data: Any) -> Any:
        """An unset LORA_DIR for the trained embedded model is its own adapters' folder."""
        if not isinstance(data, dict) or {"LORA_DIR", "lora_dir"} & set(data):
            return data
        embedded = data.get("MODEL_ID", data.get("model_id", SCENES_MODEL)) == SCENES_MODEL
        return {**data, "LORA_DIR": str(EMBEDDED_LORA_DIR)} if embedded else data

    @model_validator(mode="after")
    def _relations(self) -> Settings:
        checks = [
            (
                self.max_loras <= self.lora_cache_size,
                f"MAX_LORAS={self.max_loras} must not exceed LORA_CACHE_SIZE={self.lora_cache_size}: a request's "
                "adapters must all fit in a worker's cache at once",
            ),
            (
                self.threads >= self.max_ongoing + self.max_queued + 2,
                f"THREADS={self.threads} is too few: each admitted /generate holds a thread while it waits, so "
                f"MAX_ONGOING + MAX_QUEUED + 2 = {self.max_ongoing + self.max_queued + 2} are needed for probes "
                "to always find a free one",
            ),
            (
                self.default_steps is None or self.default_steps <= self.max_steps,
                "DEFAULT_STEPS must not exceed MAX_STEPS",
            ),
            (
                self.default_guidance is None or self.default_guidance <= self.max_guidance,
                "DEFAULT_GUIDANCE must not exceed MAX_GUIDANCE",
            ),
            (self.min_image_size <= self.max_image_size, "MIN_IMAGE_SIZE must not exceed MAX_IMAGE_SIZE"),
            (
                self.load_backoff_initial <= self.load_backoff_max,
                "LOAD_BACKOFF_INITIAL must not exceed LOAD_BACKOFF_MAX",
            ),
            (
                self.respawn_backoff_initial <= self.respawn_backoff_max,
                "RESPAWN_BACKOFF_INITIAL must not exceed RESPAWN_BACKOFF_MAX",
            ),
            (
                self.heartbeat_timeout > 2 * self.heartbeat_interval,
                "HEARTBEAT_TIMEOUT must be more than twice HEARTBEAT_INTERVAL, or a live worker looks stale",
            ),
            (
                self.workers is None or self.ready_policy in ("all", "any") or int(self.ready_policy) <= self.workers,
                f"READY_POLICY={self.ready_policy} asks for more READY workers than the {self.workers} gunicorn runs "
                "(WEB_CONCURRENCY)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def model_name(self) -> str:
        """The served model's id for OpenAI clients."""
        return self.served_model_name or self.model_id

    def serves(self, name: str) -> bool:
        """Whether a client asking for model ``name`` means the one served here: its served name or its id."""
        return name in {self.model_name, self.model_id}

    @property
    def max_upload_body_bytes(self) -> int:
        """The largest body of a route that takes images: MAX_BODY_BYTES for everything else, plus an image
        and a mask of MAX_UPLOAD_BYTES each in base64 (4 characters per 3 bytes), which also covers the same
        files sent raw in a multipart body with their part headers."""
        return self.max_body_bytes + 2 * base64_chars(self.max_upload_bytes)

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def startup_budget_needed(self) -> float:
        """Seconds a platform's startup probe must allow: the load budget, plus the imports and the one
        attempt that may still be running when the budget ends (STARTUP_OVERHEAD_S)."""
        return self.load_max_seconds + STARTUP_OVERHEAD_S

    def required_ready(self, expected_workers: int) -> int:
        """How many READY workers /readyz needs under READY_POLICY, given the configured worker count."""
        if self.ready_policy == "all":
            return expected_workers
        if self.ready_policy == "any":
            return 1
        return int(self.ready_policy)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; raise SettingsError naming the first bad one."""
        env = os.environ if environ is None else environ
        given = {
            info.validation_alias: env[info.validation_alias].strip()
            for info in _declared()
            if info.validation_alias in env
        }
        return _validated(cls, given)

    def for_workers(self, workers: int) -> Settings:
        """These settings for a server of ``workers`` workers (gunicorn's count), checked again."""
        return _validated(type(self), {**self.model_dump(), "workers": workers})


# Never shown, in errors, logs or `config`: every setting declared a SecretStr (API_KEYS, WEBHOOK_SECRET).
SECRET = frozenset(
    name
    for attribute, declared in Settings.model_fields.items()
    if declared.annotation is SecretStr
    for name in (attribute, declared.validation_alias)
)


def _declared() -> list[FieldInfo]:
    return [info for info in Settings.model_fields.values() if isinstance(info.validation_alias, str)]


def _validated(cls: type[Settings], data: dict[str, Any]) -> Settings:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        if not error["loc"]:  # a relation between settings: its message names them
            raise SettingsError(str(error["ctx"]["error"])) from None
        name = str(error["loc"][0])
        variable = "WEB_CONCURRENCY" if name == "workers" else name
        shown = "(redacted)" if name in SECRET else data.get(name, error.get("input"))
        raise SettingsError(f"{variable}={shown!r} is invalid: {_expected(name, error)}") from None


def _expected(name: str, error: Any) -> str:
    """What the setting takes, in words, from its declaration: the bounds, the choices or the pattern."""
    info = Settings.model_fields.get(name) or next(
        f for f in Settings.model_fields.values() if f.validation_alias == name
    )
    bounds = {type(item).__name__: item for item in info.metadata}
    kind = {int: "an integer", float: "a number", int | None: "an integer", float | None: "a number"}.get(
        info.annotation, ""
    )
    if "Ge" in bounds and "Le" in bounds:
        low, high = bounds["Ge"].ge, bounds["Le"].le
        text = f"expected {kind or 'a value'} from {low:g} to {high:g}"
        if "MultipleOf" in bounds:
            text += f", a multiple of {bounds['MultipleOf'].multiple_of}"
        return text
    if isinstance(info.json_schema_extra, dict) and "expected" in info.json_schema_extra:
        return f"expected {info.json_schema_extra['expected']}"
    if info.annotation is bool:
        return "expected 1 or 0 (true/false, yes/no, on/off)"
    if error["type"] == "literal_error":
        return "expected " + error["msg"].removeprefix("Input should be ")
    return error["msg"]


@dataclass(frozen=True)
class Variable:
    """One environment variable as the README's settings table shows it."""

    name: str
    default: str
    meaning: str


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


VARIABLES: tuple[Variable, ...] = tuple(
    Variable(str(info.validation_alias), _text(info.default), info.description or "") for info in _declared()
)


def refusal(exc: SettingsError) -> str:
    """The line the server stops with on a bad setting (and ``honest-diffusion config`` prints)."""
    return f"configuration error: {exc}"


@dataclass(frozen=True)
class Effective:
    """One setting as ``honest-diffusion config`` shows it: its value and where the value came from."""

    variable: str
    value: str
    source: str  # "environment" or "default"


def effective(settings: Settings, environ: Mapping[str, str]) -> list[Effective]:
    """Every declared setting's validated value and its source; secrets are shown only as set or not."""
    rows = []
    for name, info in Settings.model_fields.items():
        variable = info.validation_alias
        if not isinstance(variable, str):
            continue
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            text = "(set, redacted)" if value.get_secret_value() else ""
        else:
            text = "" if value is None else without_password(_text(value))
        rows.append(Effective(variable, text, "environment" if variable in environ else "default"))
    return rows


def without_password(text: str) -> str:
    """``text`` with the password of a URL in it redacted (JOB_STORE=redis://:password@host carries one)."""
    parts = urllib.parse.urlsplit(text) if "://" in text else None
    if parts is None or parts.password is None:
        return text
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}(redacted)@{host}"))


def resolve_callable(spec: str) -> Callable[..., object]:
    """Import ``module:function`` and return the function (raises ImportError or AttributeError)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
