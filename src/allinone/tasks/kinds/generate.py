"""``generate``: free text, such as a chat reply, streamed token by token."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ...engine import GenerateJob, GenerateOutput, GenerationStream
from ...errors import InvalidInputError
from ...results import ChatChunk, ChatResult, Usage
from ...types import check_text
from ..prompting import TaskPrompt, pick
from .base import FINISH_SCHEMA, GENERATION_PARAMS, USAGE_SCHEMA, Limits, Request, TaskKind, resolve_lang, sampling_from

if TYPE_CHECKING:
    from ...types import Message
    from ..spec import TaskSpec


class GenerateKind(TaskKind):
    name = "generate"
    streams = True
    fields = frozenset({"mood"})
    _sampling = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "repetition_penalty")

    def check_spec(self, spec: "TaskSpec") -> None:
        for i, ex in enumerate(spec.examples):
            if not isinstance(ex.output, str):
                raise ValueError(f"examples[{i}]: a generate example needs 'output' as a string")

    def params(self, spec: "TaskSpec") -> set[str]:
        return set(self.common_params) | set(self._sampling) | {"system"}

    def _request(self, spec: "TaskSpec", text: str, params: dict[str, Any], limits: Limits,
                 history: tuple["Message", ...]) -> Request:
        system = params.get("system")
        if system is not None and not isinstance(system, str):
            raise InvalidInputError("system must be a string", param="system")
        if system is not None:
            check_text(system, "system")
        sampling = sampling_from(spec, params, limits, keys=self._sampling)
        return Request(lang=resolve_lang(spec, params, text), sampling=sampling,
                       system=system, history=history, max_input_tokens=limits.max_input_tokens)

    def compile(self, spec: "TaskSpec", req: Request, layout: str = "single",
                artifact: Any = None) -> TaskPrompt:
        template = pick(spec.template, req.lang, "{text}")
        question = pick(spec.question, req.lang)
        if question:
            template += "\n" + question
        examples = [(ex.text, ex.output) for ex in spec.examples_for(req.lang)]
        return TaskPrompt(pick(spec.instructions, req.lang), template, tuple(examples))

    def jobs(self, compiled: TaskPrompt, text: str, req: Request) -> list[GenerateJob]:
        prompt = compiled if req.system is None else TaskPrompt(req.system, compiled.template, compiled.examples)
        return [GenerateJob(prompt.conversation(text, req.history), req.sampling)]

    def result(self, compiled: TaskPrompt, outputs: Sequence[GenerateOutput], req: Request) -> ChatResult:
        out = outputs[0]
        return ChatResult(text=out.text, finish_reason=out.finish_reason,
                          usage=Usage(out.info.prompt_tokens, out.completion_tokens), truncated=out.info.truncated)

    def chunks(self, compiled: TaskPrompt, stream: GenerationStream) -> Iterator[ChatChunk]:
        return reply_chunks(stream)

    def input_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        schema = super().input_schema(spec)
        defaults = {"max_tokens": spec.defaults.max_tokens, "temperature": spec.defaults.temperature,
                    "top_p": spec.defaults.top_p}
        for key, value in GENERATION_PARAMS.items():
            schema["properties"][key] = {**value, **({"default": defaults[key]} if key in defaults else {})}
        schema["properties"]["system"] = {"type": "string", "description": "replaces the task's system prompt"}
        schema["properties"]["stop"] = {"type": "array", "items": {"type": "string"}, "maxItems": 4}
        return schema

    def output_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        return {"type": "object", "properties": {"text": {"type": "string"}, "finish_reason": FINISH_SCHEMA,
                                                 "usage": USAGE_SCHEMA, "truncated": {"type": "boolean"}},
                "required": ["text", "finish_reason", "usage", "truncated"]}


def reply_chunks(stream: GenerationStream) -> Iterator[ChatChunk]:
    """Reply chunks from the engine's stream; the last one has the finish reason and usage.
    Closing this iterator cancels the reply."""
    try:
        for delta in stream:
            if delta.finish_reason is None:
                yield ChatChunk(delta.text)
            else:
                info = stream.info
                usage = Usage(prompt_tokens=info.prompt_tokens, completion_tokens=delta.completion_tokens)
                yield ChatChunk(delta.text, finish_reason=delta.finish_reason, usage=usage, truncated=info.truncated)
    finally:
        stream.close()


