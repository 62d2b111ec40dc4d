"""The worker's runtime and its upload decoder, asked for by type (as flaskr's ``get_db``): ``install`` puts
them on the app in the factory, and a route calls ``runtime()`` or ``decoder()``. (The API keys have the same
pair in ``auth``.)"""

from __future__ import annotations

from flask import Flask, current_app

from webapp.api.uploads import Decoder
from webapp.runtime import Runtime

_RUNTIME = "honest_diffusion.runtime"
_DECODER = "honest_diffusion.decoder"


def install(app: Flask, worker: Runtime) -> None:
    """Give ``app`` the runtime of the worker it serves for, and that worker's upload decoder (MAX_DECODES
    threads, ENGINE_NICE below the request threads)."""
    app.extensions[_RUNTIME] = worker
    app.extensions[_DECODER] = Decoder(worker.settings.max_decodes, worker.settings.engine_nice)


def runtime() -> Runtime:
    """The runtime of the worker serving the current request."""
    return current_app.extensions[_RUNTIME]


def decoder() -> Decoder:
    """Where the current request's uploads are decoded, once admitted."""
    return current_app.extensions[_DECODER]
