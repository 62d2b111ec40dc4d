"""Settings: one validated object built from environment variables.

Every variable is listed in ``VARIABLES`` with its default and meaning (the README's settings table is
generated from the same list). A bad value raises ``SettingsError`` naming the variable: the server
refuses to start rather than fall back silently.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

BUILTIN_TINY_MODEL = "builtin:tiny-sd"
READY_POLICIES = ("all", "any")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
DTYPE_CHOICES = ("auto", "float32", "float16", "bfloat16")
SIZE_MULTIPLE = 8  # diffusers' Stable Diffusion pipelines require sides divisible by 8
STARTUP_OVERHEAD_S = 60  # imports (5-10 s measured) plus the last load attempt, on top of LOAD_MAX_SECONDS


class SettingsError(ValueError):
    """A configuration value is invalid; the message names the environment variable."""


@dataclass(frozen=True)
class Variable:
    name: str
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("HOST", "0.0.0.0", "Address gunicorn binds."),
    Variable("PORT", "8080", "Port gunicorn binds (Cloud Run sets it)."),
    Variable("WEB_CONCURRENCY", "1", "gunicorn workers; each loads its own pipeline (one per GPU is usual)."),
    Variable("THREADS", "16", "gthread request threads per worker; at least MAX_ONGOING + MAX_QUEUED + 2."),
    Variable("MODEL_ID", BUILTIN_TINY_MODEL, "Model to serve: a local folder, a hub id, or the embedded tiny model."),
    Variable("MODEL_CACHE_DIR", "~/.cache/honest-diffusion", "Where the embedded tiny model is built."),
    Variable("MODEL_LOADER", "webapp.pipeline:load", "Callable `module:function(settings, slot)` returning a model."),
    Variable("DEVICE", "auto", "auto (cuda:<slot % GPUs> when CUDA is there, else cpu), cpu, cuda or cuda:N."),
    Variable("DTYPE", "auto", "auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16."),
    Variable("TORCH_THREADS", "0", "CPU threads per worker for torch; 0 = cores / workers."),
    Variable("LOAD_MAX_ATTEMPTS", "5", "Load attempts before a worker is FAILED."),
    Variable("LOAD_MAX_SECONDS", "180", "Total load budget; no retry starts that would end past it."),
    Variable("LOAD_BACKOFF_INITIAL", "2", "First retry wait in seconds (exponential, with jitter)."),
    Variable("LOAD_BACKOFF_MAX", "30", "Longest wait between attempts, seconds."),
    Variable("READY_POLICY", "all", "/readyz is 200 when: all = every worker READY, any = one, N = at least N."),
    Variable("HEARTBEAT_INTERVAL", "1", "Seconds between a worker's heartbeats on the board."),
    Variable("HEARTBEAT_TIMEOUT", "10", "A heartbeat older than this marks the worker stale (not ready)."),
    Variable("BOARD_DIR", "", "Folder for the readiness board; empty = /dev/shm, else the temp dir."),
    Variable("STALL_TIMEOUT", "60", "A denoising step running longer than this makes the worker UNHEALTHY."),
    Variable("MAX_CONSECUTIVE_FAILURES", "5", "Failed generations in a row that make a worker UNHEALTHY."),
    Variable("CRASH_LOOP_LIMIT", "5", "Deaths in a row of a slot's workers before READY that turn /healthz 503."),
    Variable("RESPAWN_BACKOFF_INITIAL", "1", "Wait before loading again after a slot's worker crashed, seconds."),
    Variable("RESPAWN_BACKOFF_MAX", "60", "Longest respawn wait, seconds (doubles per crash in a row)."),
    Variable("MAX_REQUESTS", "0", "gunicorn max_requests: recycle a worker after this many requests; 0 = never."),
    Variable("MAX_REQUESTS_JITTER", "0", "gunicorn max_requests_jitter, so workers do not recycle together."),
    Variable("REQUEST_TIMEOUT", "120", "Seconds a /generate request may wait for its images (504 after)."),
    Variable("MAX_ONGOING", "4", "Jobs a worker runs on its device at once (in one batch)."),
    Variable("MAX_QUEUED", "8", "Jobs that may wait per worker beyond MAX_ONGOING; more are shed with 503."),
    Variable("MAX_BATCH_SIZE", "4", "Images in one pipeline call; compatible queued jobs share it."),
    Variable("BATCH_WAIT_MS", "0", "How long an idle engine waits for more jobs to fill a batch."),
    Variable("MAX_BODY_BYTES", "65536", "Largest /generate body accepted (413 above)."),
    Variable(
        "CLIENT_TIMEOUT",
        "20",
        "Seconds a client has to send a whole request (408 after) and to take each part of an answer.",
    ),
    Variable("MAX_PROMPT_CHARS", "2000", "Longest prompt and negative_prompt."),
    Variable("DEFAULT_STEPS", "20", "num_inference_steps when the request gives none."),
    Variable("MAX_STEPS", "100", "Largest num_inference_steps."),
    Variable("MAX_GUIDANCE", "30", "Largest guidance_scale."),
    Variable("DEFAULT_GUIDANCE", "7.5", "guidance_scale when the request gives none."),
    Variable("MIN_IMAGE_SIZE", "64", "Smallest width or height (a multiple of 8)."),
    Variable("MAX_IMAGE_SIZE", "1024", "Largest width or height (a multiple of 8)."),
    Variable("MAX_IMAGES", "4", "Largest num_images per request."),
    Variable("GRACEFUL_TIMEOUT", "30", "Seconds a worker may finish in-flight work after SIGTERM."),
    Variable("WORKER_TIMEOUT", "60", "gunicorn timeout: a worker whose main loop is frozen this long is killed."),
    Variable("ACCESS_LOG", "1", "1 = access log on stdout, 0 = off."),
    Variable("LOG_PROBES", "0", "1 = log /healthz and /readyz requests in the access log too."),
    Variable("LOG_LEVEL", "info", "gunicorn and app log level."),
    Variable("LOG_FORMAT", "kv", "kv = one logfmt line (key=value) per event, json = one JSON object per line."),
)
_DEFAULTS = {v.name: v.default for v in VARIABLES}


@dataclass(frozen=True)
class Settings:
    """Validated configuration; build it with ``Settings.from_env()``."""

    host: str
    port: int
    workers: int
    threads: int
    model_id: str
    model_cache_dir: Path
    model_loader: str
    device: str
    dtype: str
    torch_threads: int
    load_max_attempts: int
    load_max_seconds: float
    load_backoff_initial: float
    load_backoff_max: float
    ready_policy: str
    heartbeat_interval: float
    heartbeat_timeout: float
    board_dir: Path
    stall_timeout: float
    max_consecutive_failures: int
    crash_loop_limit: int
    respawn_backoff_initial: float
    respawn_backoff_max: float
    max_requests: int
    max_requests_jitter: int
    request_timeout: float
    max_ongoing: int
    max_queued: int
    max_batch_size: int
    batch_wait_ms: float
    max_body_bytes: int
    client_timeout: float
    max_prompt_chars: int
    default_steps: int
    max_steps: int
    max_guidance: float
    default_guidance: float
    min_image_size: int
    max_image_size: int
    max_images: int
    graceful_timeout: float
    worker_timeout: float
    access_log: bool
    log_probes: bool
    log_level: str
    log_format: str

    @property
    def bind(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def startup_budget_needed(self) -> float:
        """Seconds a platform's startup probe must allow: the load budget, plus the imports and the one
        attempt that may still be running when the budget ends (STARTUP_OVERHEAD_S)."""
        return self.load_max_seconds + STARTUP_OVERHEAD_S

    def respawn_delay(self, crashes: int) -> float:
        """How long a slot's new worker waits before loading after ``crashes`` deaths in a row."""
        if crashes <= 0:
            return 0.0
        return min(self.respawn_backoff_max, self.respawn_backoff_initial * 2 ** (crashes - 1))

    def ready_quorum(self, expected_workers: int) -> int:
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
        r = _Reader(env)
        workers = r.integer("WEB_CONCURRENCY", 1, 64)
        settings = cls(
            host=r.text("HOST"),
            port=r.integer("PORT", 1, 65535),
            workers=workers,
            threads=r.integer("THREADS", 3, 4096),
            model_id=r.text("MODEL_ID"),
            model_cache_dir=Path(r.text("MODEL_CACHE_DIR")).expanduser(),
            model_loader=r.loader("MODEL_LOADER"),
            device=r.device("DEVICE"),
            dtype=r.choice("DTYPE", DTYPE_CHOICES),
            torch_threads=r.integer("TORCH_THREADS", 0, 1024),
            load_max_attempts=r.integer("LOAD_MAX_ATTEMPTS", 1, 1000),
            load_max_seconds=r.number("LOAD_MAX_SECONDS", 0.1, 86400),
            load_backoff_initial=r.number("LOAD_BACKOFF_INITIAL", 0, 3600),
            load_backoff_max=r.number("LOAD_BACKOFF_MAX", 0, 3600),
            ready_policy=r.ready_policy("READY_POLICY", workers),
            heartbeat_interval=r.number("HEARTBEAT_INTERVAL", 0.05, 60),
            heartbeat_timeout=r.number("HEARTBEAT_TIMEOUT", 0.1, 3600),
            board_dir=Path(r.text("BOARD_DIR", allow_empty=True) or _default_board_dir()),
            stall_timeout=r.number("STALL_TIMEOUT", 0.1, 86400),
            max_consecutive_failures=r.integer("MAX_CONSECUTIVE_FAILURES", 1, 1_000_000),
            crash_loop_limit=r.integer("CRASH_LOOP_LIMIT", 1, 65535),
            respawn_backoff_initial=r.number("RESPAWN_BACKOFF_INITIAL", 0, 3600),
            respawn_backoff_max=r.number("RESPAWN_BACKOFF_MAX", 0, 86400),
            max_requests=r.integer("MAX_REQUESTS", 0, 10_000_000),
            max_requests_jitter=r.integer("MAX_REQUESTS_JITTER", 0, 10_000_000),
            request_timeout=r.number("REQUEST_TIMEOUT", 0.1, 86400),
            max_ongoing=r.integer("MAX_ONGOING", 1, 1024),
            max_queued=r.integer("MAX_QUEUED", 0, 10000),
            max_batch_size=r.integer("MAX_BATCH_SIZE", 1, 1024),
            batch_wait_ms=r.number("BATCH_WAIT_MS", 0, 60000),
            max_body_bytes=r.integer("MAX_BODY_BYTES", 1024, 64 * 1024 * 1024),
            client_timeout=r.number("CLIENT_TIMEOUT", 0.5, 3600),
            max_prompt_chars=r.integer("MAX_PROMPT_CHARS", 1, 1_000_000),
            default_steps=r.integer("DEFAULT_STEPS", 1, 10000),
            max_steps=r.integer("MAX_STEPS", 1, 10000),
            max_guidance=r.number("MAX_GUIDANCE", 0, 1000),
            default_guidance=r.number("DEFAULT_GUIDANCE", 0, 1000),
            min_image_size=r.size("MIN_IMAGE_SIZE"),
            max_image_size=r.size("MAX_IMAGE_SIZE"),
            max_images=r.integer("MAX_IMAGES", 1, 64),
            graceful_timeout=r.number("GRACEFUL_TIMEOUT", 0, 3600),
            worker_timeout=r.number("WORKER_TIMEOUT", 1, 86400),
            access_log=r.flag("ACCESS_LOG"),
            log_probes=r.flag("LOG_PROBES"),
            log_level=r.choice("LOG_LEVEL", ("debug", "info", "warning", "error", "critical")),
            log_format=r.choice("LOG_FORMAT", ("kv", "json")),
        )
        _check_relations(settings)
        return settings


def _default_board_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _check_relations(s: Settings) -> None:
    pairs: list[tuple[bool, str]] = [
        (
            s.threads >= s.max_ongoing + s.max_queued + 2,
            f"THREADS={s.threads} is too few: each admitted /generate holds a thread while it waits, so "
            f"MAX_ONGOING + MAX_QUEUED + 2 = {s.max_ongoing + s.max_queued + 2} are needed for probes to "
            "always find a free one",
        ),
        (s.default_steps <= s.max_steps, "DEFAULT_STEPS must not exceed MAX_STEPS"),
        (s.default_guidance <= s.max_guidance, "DEFAULT_GUIDANCE must not exceed MAX_GUIDANCE"),
        (s.min_image_size <= s.max_image_size, "MIN_IMAGE_SIZE must not exceed MAX_IMAGE_SIZE"),
        (s.load_backoff_initial <= s.load_backoff_max, "LOAD_BACKOFF_INITIAL must not exceed LOAD_BACKOFF_MAX"),
        (
            s.respawn_backoff_initial <= s.respawn_backoff_max,
            "RESPAWN_BACKOFF_INITIAL must not exceed RESPAWN_BACKOFF_MAX",
        ),
        (
            s.heartbeat_timeout > 2 * s.heartbeat_interval,
            "HEARTBEAT_TIMEOUT must be more than twice HEARTBEAT_INTERVAL, or a live worker looks stale",
        ),
    ]
    for ok, message in pairs:
        if not ok:
            raise SettingsError(message)


class _Reader:
    """Parses one variable at a time and names it in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def raw(self, name: str) -> str:
        return self.env.get(name, _DEFAULTS[name]).strip()

    def fail(self, name: str, expected: str) -> SettingsError:
        return SettingsError(f"{name}={self.env.get(name, '')!r} is invalid: expected {expected}")

    def text(self, name: str, allow_empty: bool = False) -> str:
        value = self.raw(name)
        if not value and not allow_empty:
            raise self.fail(name, "a non-empty value")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        try:
            value = int(self.raw(name))
        except ValueError:
            raise self.fail(name, f"an integer from {low} to {high}") from None
        if not low <= value <= high:
            raise self.fail(name, f"an integer from {low} to {high}")
        return value

    def number(self, name: str, low: float, high: float) -> float:
        try:
            value = float(self.raw(name))
        except ValueError:
            raise self.fail(name, f"a number from {low:g} to {high:g}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise self.fail(name, f"a number from {low:g} to {high:g}")
        return value

    def flag(self, name: str) -> bool:
        value = self.raw(name).lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise self.fail(name, "1 or 0 (true/false, yes/no, on/off)")

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name).lower()
        if value not in choices:
            raise self.fail(name, "one of " + ", ".join(choices))
        return value

    def size(self, name: str) -> int:
        value = self.integer(name, SIZE_MULTIPLE, 8192)
        if value % SIZE_MULTIPLE:
            raise self.fail(name, f"a multiple of {SIZE_MULTIPLE}")
        return value

    def device(self, name: str) -> str:
        value = self.raw(name).lower()
        if value in DEVICE_CHOICES:
            return value
        prefix, _, index = value.partition(":")
        if prefix == "cuda" and index.isdigit():
            return value
        raise self.fail(name, "auto, cpu, cuda or cuda:N")

    def ready_policy(self, name: str, workers: int) -> str:
        value = self.raw(name).lower()
        if value in READY_POLICIES:
            return value
        if value.isdigit() and 1 <= int(value) <= workers:
            return str(int(value))
        raise self.fail(name, f"all, any, or a number of workers from 1 to WEB_CONCURRENCY ({workers})")

    def loader(self, name: str) -> str:
        value = self.text(name)
        module, sep, attr = value.partition(":")
        if not sep or not module or not attr.isidentifier():
            raise self.fail(name, "module.path:function")
        return value


def resolve_callable(spec: str) -> Callable[..., object]:
    """Import ``module:function`` and return the function (raises ImportError or AttributeError)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
