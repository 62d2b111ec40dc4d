"""Logging: app events on gunicorn's error log, and an access log that leaves probes out unless asked."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.glogging import Logger

PROBE_PATHS = frozenset({"/healthz", "/readyz"})


def server_logger(log_probes: bool) -> type[Logger]:
    """A gunicorn logger class whose access log skips /healthz and /readyz unless ``log_probes``."""

    class ServerLogger(Logger):
        def access(self, resp: Any, req: Any, environ: dict, request_time: Any) -> None:
            if not log_probes and environ.get("PATH_INFO") in PROBE_PATHS:
                return
            super().access(resp, req, environ, request_time)

    return ServerLogger


def route_app_logs(server_log: Any, level: str) -> None:
    """Send the ``webapp`` loggers to gunicorn's error log handlers (one line per event, with the pid)."""
    app_log = logging.getLogger("webapp")
    app_log.handlers = list(server_log.error_log.handlers)
    app_log.setLevel(level.upper())
    app_log.propagate = False
