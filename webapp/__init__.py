"""An image-generation server whose health routes tell the truth. ``create_app`` builds the Flask app."""

from webapp.app import create_app

__all__ = ["create_app"]
