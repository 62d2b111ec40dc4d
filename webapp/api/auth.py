"""API keys for the routes that generate (docs/architecture.md §11).

Keys come from API_KEYS (comma-separated) and API_KEYS_FILE (one per line; blank lines and lines starting
with # are skipped). The file is read again when its modification time or size changes, so a rotated
Kubernetes or Docker secret takes effect without a restart; if it cannot be read, the keys read last stay.
A client sends ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. Keys are compared by their SHA-256
digests with ``hmac.compare_digest`` against every key, so neither the time taken nor an early exit says
how much of a key matched. A key is never logged; its fingerprint (12 hex digits of an HMAC keyed with a secret
the server makes at start and never writes down) is.

With no key configured every route is open, as the probes always are: /healthz, /readyz and /metrics
never ask for one (a platform's probe cannot send a secret).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from flask import Flask, current_app, request

from webapp import errors
from webapp.errors import ApiError
from webapp.settings import Settings
from webapp.telemetry import logs

log = logs.get(__name__)
View = TypeVar("View", bound=Callable[..., Any])
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="honest-diffusion"'}
KEY_HEADER = "X-API-Key"


def needs_keys(settings: Settings) -> bool:
    """Whether ``settings`` ask for API keys on the routes that generate."""
    return bool(_split(settings.api_keys.get_secret_value(), ",")) or settings.api_keys_file is not None


def open_warning(settings: Settings) -> str | None:
    """The warning to log at start when the routes that generate are open to anyone who can reach a
    non-loopback address; None when keys are set or the bind is loopback only."""
    if needs_keys(settings):
        return None
    host = settings.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name: it may resolve to anything
    if loopback:
        return None
    return (
        f"no API key is set and gunicorn binds {settings.bind}: anyone who can reach it can generate; "
        "set API_KEYS or API_KEYS_FILE, or keep the port behind a gateway that checks callers"
    )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


# The secret of the keys' fingerprints: made when the master imports the app (its workers inherit it), never
# written anywhere. Someone holding the logs cannot test guesses of weak keys against them; the operator maps a
# fingerprint to a key by its position, which ``api_keys_loaded`` logs at each start.
_FINGERPRINT_SECRET = secrets.token_bytes(32)


def fingerprint(key: str) -> str:
    """A short name for a key that is safe to log: a keyed hash (HMAC-SHA256 with a secret this server holds
    for its life), so neither the key nor a guess at it can be checked against it without that secret."""
    return hmac.new(_FINGERPRINT_SECRET, key.encode("utf-8"), hashlib.sha256).hexdigest()[:12]


def _split(text: str, separator: str) -> list[str]:
    return [key.strip() for key in text.split(separator) if key.strip() and not key.strip().startswith("#")]


class Keys:
    """The keys a worker accepts: API_KEYS, plus API_KEYS_FILE as it is now."""

    def __init__(self, settings: Settings) -> None:
        self._enabled = needs_keys(settings)
        fixed = _split(settings.api_keys.get_secret_value(), ",")
        self._fixed = [_digest(key) for key in fixed]
        if fixed:  # by position in API_KEYS, so the operator can tell which key a logged fingerprint is
            log.info("api_keys_set", keys=len(fixed), fingerprints=[fingerprint(key) for key in fixed])
        self._path: Path | None = settings.api_keys_file
        self._lock = threading.Lock()
        self._seen: tuple[float, int] | None = None
        self._from_file: list[bytes] = []
        self._reload()

    @property
    def enabled(self) -> bool:
        """Whether keys are required (set once at start: a file emptied later shuts everyone out)."""
        return self._enabled

    def _reload(self) -> None:
        if self._path is None:
            return
        try:
            stat = os.stat(self._path)
            if self._seen == (stat.st_mtime, stat.st_size):
                return
            keys = _split(self._path.read_text(encoding="utf-8"), "\n")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("api_keys_file_unreadable", path=str(self._path), error=str(exc), kept=len(self._from_file))
            return
        with self._lock:
            self._seen, self._from_file = (stat.st_mtime, stat.st_size), [_digest(key) for key in keys]
        log.info(
            "api_keys_loaded",
            path=str(self._path),
            keys=len(keys),
            fixed=len(self._fixed),
            fingerprints=[fingerprint(key) for key in keys],  # by line, as api_keys_set by position
        )

    def accepts(self, key: str) -> bool:
        self._reload()
        presented = _digest(key)
        with self._lock:
            known = [*self._fixed, *self._from_file]
        matched = False
        for digest in known:  # every key is compared: no early exit
            matched |= hmac.compare_digest(presented, digest)
        return matched


_KEYS = "honest_diffusion.keys"


def install(app: Flask, settings: Settings) -> None:
    """Give ``app`` the API keys of ``settings`` (the factory calls it; ``keys()`` asks for them)."""
    app.extensions[_KEYS] = Keys(settings)


def keys() -> Keys:
    """The API keys the current app checks."""
    return current_app.extensions[_KEYS]


def presented_key() -> str | None:
    """The key the request carries: a Bearer token, else X-API-Key; None when it carries neither."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get(KEY_HEADER, "").strip() or None


def owner() -> str:
    """Whose the request's jobs are (docs/architecture.md §17): the SHA-256 of its key, stable across restarts
    and never the key itself; "" when no key is needed (every job is everyone's)."""
    key = presented_key()
    return _digest(key).hex() if keys().enabled and key else ""


def check(form_field: str | None = None) -> None:
    """Raise a 401 ApiError unless the request carries a key this worker accepts (or none is needed): in
    its headers, or in the form field ``form_field`` (the demo's form without JavaScript)."""
    accepted = keys()
    if not accepted.enabled:
        return
    key = presented_key() or ((request.form.get(form_field, "").strip() or None) if form_field else None)
    if key is None:
        log.info("auth_refused", reason="no key", path=request.path)
        message = f"this route needs an API key: send Authorization: Bearer <key> or {KEY_HEADER}: <key>"
        raise ApiError(errors.MISSING_API_KEY, message, headers=CHALLENGE)
    if not accepted.accepts(key):
        log.info("auth_refused", reason="unknown key", key=fingerprint(key), path=request.path)
        raise ApiError(errors.INVALID_API_KEY, "the API key is not valid", headers=CHALLENGE)
    logs.bind_request_key(fingerprint(key))


def required(
    view: View | None = None, *, refused: Callable[[ApiError], Any] | None = None, form_field: str | None = None
) -> Any:
    """Decorate a view that generates: it runs only for a request with a valid key (see ``check``).
    ``refused`` turns the 401 into the route's own answer (the demo's HTML page); by default the JSON
    error. The view is marked ``requires_key`` for the OpenAPI document."""

    def decorate(inner: View) -> View:
        @functools.wraps(inner)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                check(form_field)
            except ApiError as exc:
                return refused(exc) if refused else exc.response()
            return inner(*args, **kwargs)

        wrapper.requires_key = True  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate(view) if view is not None else decorate
