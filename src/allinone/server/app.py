"""The app factory: one FastAPI app with the task routes, the OpenAI-compatible routes, stored
sessions, health and metrics, and the web UI mounted at ``/ui``.

All state lives on ``app.state.server`` (a :class:`ServerState`), so several apps can coexist
in one process. Without a ready model, the model loads on a background thread at startup:
the server answers at once, ``/health`` says 503 until the model is ready.

:func:`run` serves the app with uvicorn and stops it so that every request gets an answer: after
SIGTERM (or Ctrl-C) running requests may finish for :data:`DRAIN_S` seconds; what still runs
then fails with a 503 error object (``shutting_down``; a stream: its last error event), before
uvicorn's graceful shutdown (:data:`GRACEFUL_S`) closes the connections and the model is freed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import RedirectResponse

from .. import __version__
from ..settings import Settings
from .errors import install_error_handlers
from .limits import BodyLimitMiddleware
from .metrics import MetricsMiddleware
from .routes import openai, sessions, system, tasks
from .security import AuthMiddleware
from .state import DRAIN_S, GRACEFUL_S, ServerState

if TYPE_CHECKING:
    from ..api import AllInOne


def run(settings: Settings, *, log_level: str = "info") -> None:
    """Serve :func:`create_app` ``(settings)`` on ``settings.host:port`` until SIGTERM/SIGINT,
    then stop as the module docstring says (a second signal stops at once; the times are in
    :mod:`.state`)."""
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=GRACEFUL_S)
    DrainingServer(config, app.state.server).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server that, on the first exit signal, also starts the drain of ``state``
    (:meth:`ServerState.drain`) :data:`~.state.DRAIN_S` seconds later."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            timer = threading.Timer(DRAIN_S, self.state.drain)
            timer.daemon = True  # a server that stopped sooner does not wait for it
            timer.start()
        super().handle_exit(sig, frame)


def create_app(settings: Settings | None = None, ai: "AllInOne | None" = None) -> FastAPI:
    """Build the app.

    Args:
        settings: the one settings object (default: from ``ALLINONE_*`` environment variables).
        ai: a ready model to serve (tests, or a program that already loaded one). The caller
            keeps ownership and closes it. ``None``: load ``settings.model`` in the background
            on startup and close it on shutdown.

    Returns:
        The FastAPI app; run it with uvicorn (``allinone serve`` does).
    """
    settings = settings or Settings()
    server = ServerState(settings, ai)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if server.ai is None and server.load_error is None:
            threading.Thread(target=server.load, name="allinone-load", daemon=True).start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(
        title="allinone", version=__version__, lifespan=lifespan, redoc_url=None,
        description="Sentiment, chat and an OpenAI-compatible API from one small model.",
    )
    app.state.server = server
    install_error_handlers(app)
    for module in (system, tasks, openai, sessions):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/ui/" if settings.ui else "/docs")

    # Outermost last: metrics see every answer (401s too), CORS answers preflights before the
    # key check, the key check runs before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AuthMiddleware, keys=settings.api_keys, metrics_public=settings.metrics_public)
    if settings.cors_origins:  # closed by default: no CORS headers at all
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)
    if settings.ui:
        from ..ui import mount_ui  # gradio is imported only when the UI is wanted

        # no Gradio log-in of its own: AuthMiddleware guards /ui like every other path
        mount_ui(app, server.require_ai, default_max_tokens=settings.default_max_tokens,
                 max_tokens_limit=settings.max_tokens_limit)
    return app
