"""An image-generation server whose health routes tell the truth. ``create_app`` builds the Flask app.

It is looked up on first use, not imported with the package: gunicorn's master imports ``webapp.server``
and binds its port before it loads the app's libraries (docs/architecture.md §13).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from webapp.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from webapp.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
