"""The worker's runtime, asked for by type (as flaskr's ``get_db``): ``install`` puts it on the app in the
factory, and a route calls ``runtime()``. (The API keys have the same pair in ``auth``.)"""

from __future__ import annotations

from flask import Flask, current_app

from webapp.runtime import Runtime

_RUNTIME = "honest_diffusion.runtime"


def install(app: Flask, worker: Runtime) -> None:
    """Give ``app`` the runtime of the worker it serves for."""
    app.extensions[_RUNTIME] = worker


def runtime() -> Runtime:
    """The runtime of the worker serving the current request."""
    return current_app.extensions[_RUNTIME]
