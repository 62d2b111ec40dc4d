"""Logging: one line per event, as logfmt key=value pairs or as JSON (LOG_FORMAT), for every line the server
writes: the app's own events, gunicorn's messages and the access log.

The app logs through structlog with named fields (``log.info("state", slot=0, state="READY")``); records
from other libraries (gunicorn's "Booting worker") pass through the same formatter, so an operator can
grep or parse every line alike. Each line carries ``ts``, ``level``, ``event``, ``logger`` and ``pid``;
lines written while a request is handled carry its ``request_id``. Probes stay out of the access log
unless LOG_PROBES=1: a kubelet probing every few seconds would bury the lines that matter.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import structlog
from gunicorn.glogging import Logger

# Set in a request's WSGI environ by the health routes (webapp.api.health), the one owner of which routes are
# probes: the access log leaves those requests out unless LOG_PROBES=1.
PROBE_ENVIRON_KEY = "honest_diffusion.probe"
FORMATS = ("kv", "json")
_FIRST_KEYS = ["ts", "level", "event", "logger", "pid"]


def _add_pid(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event.setdefault("pid", os.getpid())
    return event


# Characters a log reader could take for the end of a line, or a terminal for a command: every C0 and C1
# control and the Unicode line separators. logfmt escapes only the newline itself (as \n).
_CONTROLS = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)
    if code != 0x0A
}


def _escape_controls(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Escape control characters in every text value, so a client's path or header can never forge a line."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = value.translate(_CONTROLS)
    return event


def _chain() -> list[Any]:
    """Processors every line goes through, structlog's own and other libraries' records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _add_pid,
        structlog.processors.format_exc_info,  # a traceback becomes one escaped field, not many lines
    ]


def formatter(fmt: str) -> logging.Formatter:
    """A stdlib formatter rendering any record as one logfmt (``kv``) or JSON line."""
    meta = structlog.stdlib.ProcessorFormatter.remove_processors_meta
    if fmt == "json":  # json.dumps escapes every control character itself
        processors = [meta, structlog.processors.JSONRenderer()]
    else:
        logfmt = structlog.processors.LogfmtRenderer(key_order=_FIRST_KEYS, drop_missing=True, bool_as_flag=False)
        processors = [meta, _escape_controls, logfmt]
    return structlog.stdlib.ProcessorFormatter(foreign_pre_chain=_chain(), processors=processors)


def configure(fmt: str) -> None:
    """Make structlog hand its events to the stdlib loggers, whose handlers use ``formatter(fmt)``."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_chain(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get(name: str) -> Any:
    """The app's logger: ``get(__name__).info("event_name", field=value, ...)``."""
    return structlog.stdlib.get_logger(name)


def bind_request(request_id: str) -> None:
    """Tag every line this thread logs until the next request with ``request_id``."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)


def bind_request_key(key_fingerprint: str) -> None:
    """Tag the rest of the request's lines with the fingerprint of the API key it came with."""
    structlog.contextvars.bind_contextvars(key=key_fingerprint)


def server_logger(fmt: str, log_probes: bool) -> type[Logger]:
    """gunicorn's logger class with our line format, and an access log that skips probes unless asked."""
    access_log = get("gunicorn.access")

    class ServerLogger(Logger):
        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in self.error_log.handlers + self.access_log.handlers:
                handler.setFormatter(formatter(fmt))

        def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
            if not self.cfg.accesslog:
                return
            path = environ.get("PATH_INFO", "")
            if not log_probes and environ.get(PROBE_ENVIRON_KEY):
                return
            headers = {name.lower(): value for name, value in resp.headers}
            fields = {
                "method": environ.get("REQUEST_METHOD"),
                "path": path,
                "query": environ.get("QUERY_STRING"),
                "status": resp.status_code,
                "bytes": getattr(resp, "sent", None),
                "duration_ms": round(request_time.total_seconds() * 1000, 1),
                "request_id": headers.get("x-request-id"),
                "remote": environ.get("REMOTE_ADDR"),
                "user_agent": environ.get("HTTP_USER_AGENT"),
            }
            access_log.info("request", **{key: value for key, value in fields.items() if value not in (None, "")})

    return ServerLogger


def route_app_logs(server_log: Any, level: str) -> None:
    """Send the ``webapp`` loggers, and Python warnings from libraries, to gunicorn's error log handlers
    (stderr), so they too come out as one formatted line each."""
    logging.captureWarnings(True)
    for name in ("webapp", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers = list(server_log.error_log.handlers)
        logger.setLevel(level.upper())
        logger.propagate = False
