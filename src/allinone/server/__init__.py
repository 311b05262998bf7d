"""The HTTP service: ``create_app(settings, ai=None)`` builds the FastAPI app, ``run(settings)``
serves it (see :mod:`.app`)."""

from .app import create_app, run

__all__ = ["create_app", "run"]
