"""``/health`` (always open, for load balancers) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..deps import server_state
from ..errors import error_body

router = APIRouter(tags=["system"])


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(request: Request) -> JSONResponse:
    """200 ``{"status": "ok", "model", "backend", "chat_model", "queue_depth", "in_flight",
    "uptime_seconds"}`` once the model is loaded (``chat_model``: the model that writes chat
    replies, ``model`` unless the ``chat_model`` setting loaded another); 503
    ``{"status": "loading"}`` before, 503 ``{"status": "error", "error": {...}}`` if loading
    failed."""
    server = server_state(request)
    if server.ai is None:
        if server.load_error is not None:
            body = {"status": "error", **error_body(f"the model failed to load: {server.load_error}",
                                                    type="server_error", code="model_load_failed")}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    ai = server.ai
    return JSONResponse({
        "status": "ok", "model": ai.model_id, "backend": ai.backend_name, "chat_model": ai.chat_model_id,
        "queue_depth": ai.stats().queue_depth, "in_flight": server.admission.active,
        "uptime_seconds": int(time.time()) - server.started,
    })


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this app's registry."""
    body, content_type = server_state(request).metrics.render()
    return Response(body, media_type=content_type)
