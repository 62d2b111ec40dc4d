"""Each route's body limit, with one owner (docs/architecture.md §6): MAX_BODY_BYTES, or on a view marked
``takes_uploads`` (one that takes an edit's input image and mask) room for two uploads of MAX_UPLOAD_BYTES
in base64 on top (``Settings.max_upload_body_bytes``). The routes that take uploads say so where they are
declared; the set is read from the app's URL map. The app's before_request hook applies the limit to every
route, the worker's event loop asks it as a request's headers arrive (``webapp.server.gthread``), and a route
that reads a body reads no further than it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from flask import Flask, current_app

from webapp.settings import Settings

View = TypeVar("View", bound=Callable[..., object])
_KEY = "honest_diffusion.body_limits"


def takes_uploads(view: View) -> View:
    """Mark a view whose body may carry an input image and a mask."""
    view.takes_uploads = True  # type: ignore[attr-defined]
    return view


@dataclass(frozen=True)
class BodyLimits:
    """The largest body a request to a path may send."""

    plain: int  # MAX_BODY_BYTES
    uploads: int  # Settings.max_upload_body_bytes
    upload_paths: frozenset[str]  # the rules of the views marked takes_uploads

    def __call__(self, path: str) -> int:
        return self.uploads if path in self.upload_paths else self.plain


def install(app: Flask, settings: Settings) -> BodyLimits:
    """Read the marked views from ``app``'s URL map (every blueprint registered) and keep the limits on it."""
    marked = frozenset(
        rule.rule
        for rule in app.url_map.iter_rules()
        if getattr(app.view_functions[rule.endpoint], "takes_uploads", False)
    )
    limits = BodyLimits(settings.max_body_bytes, settings.max_upload_body_bytes, marked)
    app.extensions[_KEY] = limits
    return limits


def of(app: Flask) -> BodyLimits:
    return app.extensions[_KEY]


def limit(path: str) -> int:
    """The current app's limit for ``path``."""
    return of(current_app)(path)
