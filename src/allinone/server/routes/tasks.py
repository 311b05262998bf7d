"""Task routes: ``/v1/tasks/sentiment``, ``/v1/tasks/analyze``, ``/v1/tasks/chat``, ``/v1/tokenize``,
and every declared task at ``POST /v1/tasks/{name}`` (listed at ``GET /v1/tasks``).

``analyze`` and ``chat`` take an optional ``session_id``: the session's recent history is sent
to the model with the new message, and the message and the reply are stored afterwards (only
when the reply is complete, so a failed or abandoned request leaves the session unchanged).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from ...errors import InvalidInputError
from ...results import ChatResult, ClassifyResult
from ...types import is_blank
from ..deps import admitted, blocking, server_state
from ..schemas import AnalyzeRequest, ChatTaskRequest, SentimentRequest, TextRequest
from ..state import ServerState
from ..streaming import ChunkStream, collect

router = APIRouter(prefix="/v1", tags=["tasks"])


@router.post("/tasks/sentiment")
async def sentiment(body: SentimentRequest, request: Request) -> dict[str, Any]:
    """Label ``text`` positive or negative (or with the given ``labels``).

    Returns ``{"object": "sentiment", "model", "label", "scores": {label: probability},
    "truncated"}``; probabilities sum to 1. 400 for empty or over-long text or bad parameters.
    """
    server = server_state(request)
    ai = server.require_ai()
    params = body.params()
    async with admitted(server):
        result: ClassifyResult = await blocking(lambda: ai.run("sentiment", body.text, **params))
    return {"object": "sentiment", "model": ai.model_id, **result.to_dict()}


@router.post("/tasks/analyze")
async def analyze(body: AnalyzeRequest, request: Request) -> dict[str, Any]:
    """The sentiment of ``text`` plus a reply to it (the original demo).

    Returns ``{"object": "analysis", "model", "session_id", "sentiment": {...},
    "reply": {"text", "finish_reason", "usage", "truncated"}}``. With ``tasks`` (names, or
    name -> parameters): ``{"object": "analysis", "model", "results": {name: result}}``, every
    task on the one text as ``ai.analyze(text, tasks=...)`` runs them (no session: nothing of
    it is a conversation turn to store).
    """
    server = server_state(request)
    ai = server.require_ai()
    if body.tasks is not None:
        for name in ("session_id", "system"):
            if getattr(body, name) is not None:
                raise InvalidInputError(f"{name} goes with the default analyze, not with tasks "
                                        "(give a generate task its system prompt in its parameters)", param=name)
        async with admitted(server):
            done = await blocking(lambda: ai.analyze(body.text, tasks=body.tasks, **body.sampling()))
        return {"object": "analysis", "model": ai.model_id, **done.to_dict()}
    async with admitted(server):
        history = await _history(server, body.session_id)
        result, chunks = await blocking(lambda: ai.analyze_stream(body.text, history, system=body.system,
                                                                  **body.sampling()))
        reply = await _collect_reply(server, request, chunks)
    await _store(server, body, reply, sentiment=result.to_dict())
    return {"object": "analysis", "model": ai.model_id, "session_id": body.session_id,
            "sentiment": result.to_dict(), "reply": reply.to_dict()}


@router.post("/tasks/chat")
async def chat(body: ChatTaskRequest, request: Request) -> dict[str, Any]:
    """A reply to ``text``, in a stored conversation when ``session_id`` is given.

    Returns ``{"object": "chat.reply", "model", "session_id", "reply": {"text", "finish_reason",
    "usage", "truncated"}}``.
    """
    server = server_state(request)
    ai = server.require_ai()
    async with admitted(server):
        history = await _history(server, body.session_id)
        reply = await _reply(server, request, history, body)
    await _store(server, body, reply)
    return {"object": "chat.reply", "model": ai.chat_model_id, "session_id": body.session_id, "reply": reply.to_dict()}


@router.post("/tokenize")
async def tokenize(body: TextRequest, request: Request) -> dict[str, Any]:
    """Token ids of ``text`` as plain text: control-token strings such as ``<|im_start|>`` are
    not parsed, exactly as user content is tokenized in a chat prompt.

    Returns ``{"object": "tokens", "model", "tokens": [int], "count"}``.
    """
    server = server_state(request)
    ai = server.require_ai()
    async with admitted(server):
        ids = await blocking(ai.tokenize, body.text)
    return {"object": "tokens", "model": ai.model_id, "tokens": ids, "count": len(ids)}


@router.get("/tasks")
async def list_tasks(request: Request) -> dict[str, Any]:
    """Every task: ``{"object": "list", "data": [{"name", "kind", "description", "input_schema",
    "output_schema", "method", "learned", ...}]}``: ``method`` is ``prompt`` or what the task
    learned for this model (``learned`` then says from which data, with its figures)."""
    ai = server_state(request).require_ai()
    return {"object": "list", "data": ai.list_tasks()}


# Declared after the fixed routes above, so sentiment/analyze/chat keep their own handlers.
@router.post("/tasks/{name}")
async def run_task(name: str, request: Request, body: dict[str, Any] = Body(...)) -> dict[str, Any]:
    """Run the declared task ``name`` on ``body["text"]``; the other keys are the task's
    parameters (see its ``input_schema`` at ``GET /v1/tasks``).

    Returns ``{"object": "task.result", "task", "model", ...}`` with the result's fields
    (classify: label, scores; extract: data, dropped, ...; generate: text, finish_reason, usage).
    404 for an unknown task, 400 for bad text or parameters.
    """
    server = server_state(request)
    ai = server.require_ai()
    ai.tasks.get(name)  # 404 before anything else
    params = dict(body)
    text = params.pop("text", None)
    if not isinstance(text, str):
        raise InvalidInputError("the body needs a 'text' string", param="text")
    if params.pop("stream", False) is not False:  # a generator has no JSON form (was a 500)
        raise InvalidInputError("this route answers with the whole result; for a streamed reply use "
                                "/v1/chat/completions (or ai.run(..., stream=True) in Python)", param="stream")
    async with admitted(server):
        result = await blocking(lambda: ai.run(name, text, **params))
    return {"object": "task.result", "task": name, "model": ai.model_id, **result.to_dict()}


async def _history(server: ServerState, session_id: str | None) -> list[dict[str, str]]:
    if session_id is None:
        return []
    return await blocking(server.store.history, session_id, server.settings.session_history_messages)


async def _reply(server: ServerState, request: Request, history: list[dict[str, str]],
                 body: ChatTaskRequest) -> ChatResult:
    ai = server.require_ai()
    if is_blank(body.text):  # the caller sent text, not messages: the error names what was sent
        raise InvalidInputError("text is empty", param="text")
    messages = [*history, {"role": "user", "content": body.text}]
    chunks = await blocking(lambda: ai.chat(messages, stream=True, system=body.system, **body.sampling()))
    return await _collect_reply(server, request, chunks)


async def _collect_reply(server: ServerState, request: Request, chunks) -> ChatResult:
    reply = await collect(request, ChunkStream(chunks))
    server.metrics.count_tokens(request.url.path, reply.usage.prompt_tokens, reply.usage.completion_tokens)
    return reply


async def _store(server: ServerState, body: ChatTaskRequest, reply: ChatResult,
                 sentiment: dict[str, Any] | None = None) -> None:
    if body.session_id is None:
        return
    user: dict[str, Any] = {"role": "user", "content": body.text}
    if sentiment is not None:
        user["sentiment"] = sentiment
    await blocking(server.store.append, body.session_id, [user, {"role": "assistant", "content": reply.text}])
