"""OpenAI-compatible routes: ``/v1/chat/completions`` (plain and SSE) and ``/v1/models``.

Stateless: the client sends the whole conversation. Responses have exactly the shape of
OpenAI's chat completion objects, so the official ``openai`` client works unchanged.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from ...errors import AllInOneError
from ...results import ChatChunk, ChatResult
from ..deps import Slot, blocking, server_state
from ..errors import error_body
from ..schemas import ChatCompletionRequest
from ..state import SSE_GRACE_S, ServerState
from ..streaming import ChunkStream, collect

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
_ROUTE = "/v1/chat/completions"


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict[str, Any] | EventSourceResponse:
    """A chat completion (``stream: false``) or a stream of chunks as server-sent events ending
    with ``data: [DONE]`` (``stream: true``).

    Errors found before the first token (bad input, a full queue, the model loading) are plain
    HTTP errors; one after the stream started is sent as a last ``data: {"error": {...}}`` event.
    """
    server = server_state(request)
    ai = server.require_ai()
    sampling = body.checked_sampling()
    messages = [m.to_message() for m in body.messages]
    slot = Slot(server)
    try:
        # as OpenAI: a conversation that does not fit is refused (400 context_length_exceeded),
        # not answered from a cut prompt the response could not say was cut
        # on a worker thread: a message that tells a feeling has its sentiment computed first
        stream = ChunkStream(await blocking(lambda: ai.chat(messages, stream=True, cut=False, **sampling)))
    except BaseException:
        slot.release()
        raise
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": ai.chat_model_id}
    if not body.stream:
        try:
            reply = await collect(request, stream)
        finally:
            slot.release()
        server.metrics.count_tokens(_ROUTE, reply.usage.prompt_tokens, reply.usage.completion_tokens)
        return completion_object(meta, reply)
    try:
        # Wait for the first chunk before answering, so that errors raised on the worker
        # (e.g. the prompt cannot fit the context) still get their proper status code.
        async with stream.watching(request):
            first = await stream.next()
    except BaseException:
        await stream.aclose()
        slot.release()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _events(server, stream, first, meta, include_usage)

    async def on_close() -> None:
        await stream.aclose()
        slot.release()

    # at shutdown the stream may go on until the drain (state.DRAIN_S) ends it with an error event
    return _SSEResponse(events, on_close=on_close, sep="\n", ping=15, shutdown_grace_period=SSE_GRACE_S)


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    """``{"object": "list", "data": [model, ...]}``: the loaded model, then the chat model when
    ``chat_model`` loaded a second one (it writes every chat completion)."""
    server = server_state(request)
    return {"object": "list", "data": _model_objects(server)}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    """One model object by its id, or by the name the server was started with (``model``
    setting, e.g. ``embedded``: clients configured with that name look it up). 404 otherwise."""
    server = server_state(request)
    models = _model_objects(server)
    if model_id == server.settings.model:
        return models[0]
    for model in models:
        if model["id"] == model_id:
            return model
    names = " and ".join(repr(m["id"]) for m in models)
    raise HTTPException(404, f"no model {model_id!r}; this server has {names}")


def completion_object(meta: dict[str, Any], reply: ChatResult) -> dict[str, Any]:
    """OpenAI's ``chat.completion`` object for a finished reply."""
    return {
        **meta, "object": "chat.completion", "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.text, "refusal": None},
            "logprobs": None,
            "finish_reason": reply.finish_reason,
        }],
        "usage": reply.usage.to_dict(),
    }


def chunk_object(meta: dict[str, Any], delta: dict[str, Any], finish_reason: str | None = None,
                 *, include_usage: bool = False) -> dict[str, Any]:
    """OpenAI's ``chat.completion.chunk`` object (``usage: null`` on every chunk when the client
    asked for usage, which then comes in one extra chunk with no choices)."""
    out = {
        **meta, "object": "chat.completion.chunk", "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if include_usage:
        out["usage"] = None
    return out


async def _events(server: ServerState, stream: ChunkStream, first: ChatChunk | None, meta: dict[str, Any],
                  include_usage: bool) -> AsyncIterator[dict[str, str]]:
    def event(obj: dict[str, Any]) -> dict[str, str]:
        return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}

    yield event(chunk_object(meta, {"role": "assistant", "content": ""}, include_usage=include_usage))
    chunk = first
    try:
        while chunk is not None:
            if chunk.text:
                yield event(chunk_object(meta, {"content": chunk.text}, include_usage=include_usage))
            if chunk.finish_reason is not None:
                yield event(chunk_object(meta, {}, chunk.finish_reason, include_usage=include_usage))
                if chunk.usage is not None:
                    server.metrics.count_tokens(_ROUTE, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                    if include_usage:
                        yield event({**meta, "object": "chat.completion.chunk", "system_fingerprint": None,
                                     "choices": [], "usage": chunk.usage.to_dict()})
            chunk = await stream.next()
    except AllInOneError as exc:
        yield event(error_body(exc.message, type=exc.error_type, code=exc.code, param=exc.param))
        return
    except Exception:  # the response has started: report in-band, keep the server serving
        log.exception("chat stream failed")
        yield event(error_body("internal server error", type="server_error", code="internal_error"))
        return
    yield {"data": "[DONE]"}


class _SSEResponse(EventSourceResponse):
    """An SSE response that runs ``on_close`` however it ends (done, error, client gone).

    The events generator's own ``finally`` is not enough: if the client is gone before the
    first event, the generator is never started and its cleanup would never run.
    """

    def __init__(self, content: Any, *, on_close: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def _model_objects(server: ServerState) -> list[dict[str, Any]]:
    ai = server.require_ai()
    infos = [ai.info] if ai.chat_info is ai.info else [ai.info, ai.chat_info]
    return [{"id": info.model_id, "object": "model", "created": server.started, "owned_by": "allinone",
             "backend": info.backend} for info in infos]
