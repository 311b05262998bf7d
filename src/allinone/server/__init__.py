"""The HTTP service: ``create_app(settings, ai=None)`` builds the FastAPI app (see :mod:`.app`)."""

from .app import create_app

__all__ = ["create_app"]
