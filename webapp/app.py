"""The application factory: one Flask app per worker process, reading that worker's runtime."""

from __future__ import annotations

import logging
import re
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from webapp import errors, hooks
from webapp.runtime import Runtime
from webapp.settings import Settings

log = logging.getLogger("webapp.app")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Flask:
    """Build the app. Under gunicorn the runtime comes from the post_fork hook; without one (plain
    ``flask run``) a standalone one-worker runtime is started in this process."""
    if runtime is None:
        runtime = hooks.current_runtime()
    if runtime is None:
        runtime = Runtime.standalone(settings or Settings.from_env())
    app = Flask(__name__)
    app.extensions["runtime"] = runtime
    app.config["MAX_CONTENT_LENGTH"] = runtime.settings.max_body_bytes + 1  # see generate._read_json

    from webapp.demo import bp as demo_bp
    from webapp.generate import bp as generate_bp
    from webapp.health import bp as health_bp

    app.register_blueprint(health_bp)
    app.register_blueprint(generate_bp)
    app.register_blueprint(demo_bp)

    @app.before_request
    def assign_request_id() -> None:
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex

    @app.after_request
    def stamp(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        return errors.error_response(exc.code or 500, code, exc.description or exc.name)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        request_id = getattr(g, "request_id", "")
        log.exception("event=unhandled request_id=%s path=%s", request_id, request.path)
        return errors.error_response(500, errors.INTERNAL, f"internal error; request id {request_id}")

    return app
