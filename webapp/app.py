"""The application factory: one Flask app per worker process, reading that worker's runtime."""

from __future__ import annotations

import re
import time
import uuid

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from webapp import errors
from webapp import runtime as worker_runtime
from webapp.api import auth, bodies, context, demo, generate, health, job_routes, metrics, openapi
from webapp.api.openai import routes as openai_routes
from webapp.runtime import Runtime
from webapp.settings import Settings
from webapp.telemetry import logs
from webapp.telemetry.recorder import recorder

log = logs.get(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class NoRuntime(RuntimeError):
    """``create_app`` was called without the runtime of the worker it serves for."""


def create_app(runtime: Runtime | None = None) -> Flask:
    """Build the app for the worker ``runtime`` serves with: under gunicorn, the one post_fork started,
    handed over by the worker class of gunicorn.conf.py (``webapp.server.hooks``). Without one it refuses
    (NoRuntime): gunicorn's stock worker classes import the app by name, and an app that made its own
    runtime there would give each worker a private one-slot board, whose probes describe that worker alone.
    ``standalone_app`` is the way to run without gunicorn."""
    if runtime is None:
        raise NoRuntime(
            "create_app needs the worker's runtime: run gunicorn with gunicorn.conf.py's worker_class (a stock "
            "worker class would give each worker a board of its own), or `flask --app webapp.app:standalone_app "
            "run` without gunicorn"
        )
    app = Flask(__name__)
    context.install(app, runtime)
    auth.install(app, runtime.settings)
    settings = runtime.settings

    app.register_blueprint(health.bp)
    app.register_blueprint(generate.bp)
    app.register_blueprint(demo.bp)
    app.register_blueprint(openai_routes.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(job_routes.bp)
    metrics.init_app(app)
    body_limit = bodies.install(app, settings)  # after every blueprint: it reads the URL map
    job_routes.install(app, runtime)

    @app.before_request
    def assign_request_id() -> None:
        g.started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        logs.bind_request(g.request_id)

    @app.before_request
    def limit_body() -> None:
        """Every route's body limit, applied here for all of them (``webapp.api.bodies``): 413 from a declared
        length over it, before anything is read; a chunked body is cut one byte past it, so whoever reads it
        (``jobs.read_json``, a form parser) sees it was too long rather than a silently shortened body."""
        limit = body_limit(request.path)
        request.max_content_length = limit + 1
        if request.content_length is not None and request.content_length > limit:
            message = f"body is {request.content_length} bytes; the limit for {request.path} is {limit}"
            raise errors.InvalidRequest(errors.PAYLOAD_TOO_LARGE, message)

    @app.errorhandler(errors.ApiError)
    def api_error(exc: errors.ApiError) -> Response:
        return exc.response()

    @app.after_request
    def stamp(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Request-ID"] = getattr(g, "request_id", "")
        # Routes by their rule, so a scan of random paths cannot blow up the number of series.
        route = request.url_rule.rule if request.url_rule else "unmatched"
        recorded = recorder()
        recorded.requests.labels(request.method, route, str(response.status_code)).inc()
        recorded.request_seconds.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        if isinstance(exc, RequestEntityTooLarge):  # a chunked body read past its route's limit
            limit = body_limit(request.path)
            message = f"body exceeds the limit of {limit} bytes for {request.path}"
            return errors.error_response(errors.PAYLOAD_TOO_LARGE, message)
        status = exc.code or 500
        code = errors.BY_HTTP_STATUS.get(status, errors.INTERNAL if status >= 500 else errors.HTTP_ERROR)
        response = errors.error_response(code, exc.description or exc.name, status=status)
        for name, value in exc.get_headers():  # a 405 must say Allow (RFC 9110 15.5.6)
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        request_id = getattr(g, "request_id", "")
        log.exception("unhandled", path=request.path)
        return errors.error_response(errors.INTERNAL, f"internal error; request id {request_id}")

    return app


def standalone_app() -> Flask:
    """The app outside gunicorn (``flask --app webapp.app:standalone_app run``): a one-worker runtime started
    in this process from the environment's settings, with a one-slot board of its own."""
    return create_app(worker_runtime.standalone(Settings.from_env()))
