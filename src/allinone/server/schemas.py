"""Request bodies of the HTTP routes (pydantic models).

The models check types and shapes only, strictly (``"10"`` or ``true`` is not a number); value
ranges (temperature, max_tokens, text length, message roles...) are checked once, by the Python
API, so every surface applies the same rules.
Unknown fields are rejected (400) rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, WithJsonSchema

from ..errors import InvalidInputError
from ..sessions import SESSION_ID_PATTERN


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Body):
    """Decoding options shared by the chat routes (all optional; server defaults apply)."""

    temperature: StrictFloat | None = Field(None, description="0 = greedy; up to 2")
    top_p: StrictFloat | None = Field(None, description="nucleus mass in [0, 1]; 0 keeps the most likely token")
    top_k: StrictInt | None = Field(None, description="keep the k most likely tokens; 0 disables")
    max_tokens: StrictInt | None = Field(None, description="at most this many new tokens (>= 1)")
    seed: StrictInt | None = Field(None, description="reproducible sampling")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the reply")
    repetition_penalty: StrictFloat | None = Field(None, description="1.0 disables")
    min_tokens: StrictInt | None = Field(None, description="no end of the reply before this many tokens (vLLM's)")
    dry_multiplier: StrictFloat | None = Field(None, description="DRY penalty on a reply repeating itself (llama.cpp's); "
                                                           "0 disables, 0.8 by default")

    def sampling(self) -> dict[str, Any]:
        """The options that were given, as keyword arguments for ``AllInOne.chat``."""
        keys = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "repetition_penalty", "min_tokens",
                "dry_multiplier")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class TextRequest(_Body):
    text: str = Field(..., description="the input text (not empty; at most max_input_chars characters)")


class SentimentRequest(TextRequest):
    """``/v1/tasks/sentiment``: the text and the sentiment task's own parameters, as
    ``ai.run("sentiment", text, **params)`` and ``POST /v1/tasks/{name}`` take them."""

    labels: list[str] | None = Field(None, description="another label set (served by prompting)")
    lang: str | None = Field(None, description="prompt language: auto, en, zh ...")
    calibrate: StrictBool | None = Field(None, description="contextual calibration of the label scores")

    def params(self) -> dict[str, Any]:
        """The parameters that were given, as keyword arguments for ``AllInOne.run``."""
        return {k: v for k in ("labels", "lang", "calibrate") if (v := getattr(self, k)) is not None}


class ChatTaskRequest(Sampling):
    """``/v1/tasks/chat`` and ``/v1/tasks/analyze``: one new user message, optionally in a stored
    conversation."""

    text: str = Field(..., description="the user's new message")
    session_id: str | None = Field(None, pattern=SESSION_ID_PATTERN,
                                   description="keep the conversation on the server under this id")
    system: str | None = Field(None, description="a system prompt for this request (not stored)")


class AnalyzeRequest(ChatTaskRequest):
    """``/v1/tasks/analyze``: the original demo, or with ``tasks`` several tasks on one text (as
    ``ai.analyze(text, tasks=...)`` and ``allinone analyze -t``)."""

    tasks: list[str] | dict[str, dict[str, Any]] | None = Field(
        None, description="task names, or name -> that task's parameters; omitted: sentiment + a reply")


class ChatMessage(BaseModel):
    """An OpenAI chat message. Extra keys an OpenAI client echoes back (``refusal``,
    ``annotations``...) are ignored; roles and content are validated by the API."""

    model_config = ConfigDict(extra="ignore")

    role: str
    # checked by the API (types.content_text), whose error names the message and says what is
    # accepted; pydantic's would name a union member ("messages.1.content.str")
    content: Annotated[Any, WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}},
                                                      {"type": "null"}]})] = None
    name: str | None = None

    def to_message(self) -> dict[str, Any]:
        return {"role": self.role, "content": self.content}


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(None, description="ignored: no obfuscation padding is sent")


class ChatCompletionRequest(Sampling):
    """``POST /v1/chat/completions``, as in OpenAI's API (text only, ``n = 1``)."""

    model: str | None = Field(None, description="ignored: the server has one model")
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, description="OpenAI's newer name for max_tokens")
    n: StrictInt | None = 1
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="ignored")
    store: StrictBool | None = Field(None, description="ignored: nothing is stored")
    metadata: dict[str, str] | None = Field(None, description="ignored")
    service_tier: str | None = Field(None, description="ignored: one tier")
    prompt_cache_key: str | None = Field(None, description="ignored: prefixes are cached whatever the key")
    safety_identifier: str | None = Field(None, description="ignored")
    modalities: list[str] | None = Field(None, description="only [\"text\"]")
    # Refused with "... is not supported" (not "extra inputs"): OpenAI parameters this server lacks.
    reasoning_effort: Any = None
    verbosity: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # Accepted only at their neutral value, so clients that always send them keep working.
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def checked_sampling(self) -> dict[str, Any]:
        """Sampling keyword arguments, after rejecting what this server cannot do.

        Raises:
            InvalidInputError: ``n`` other than 1, tools or functions, logprobs, non-zero
                penalties, a non-text response format or modality, reasoning, audio,
                predictions, web search, or ``max_tokens`` and ``max_completion_tokens`` that
                disagree.
        """
        if self.stream_options is not None and not self.stream:
            raise InvalidInputError("stream_options is only allowed when stream is true", param="stream_options")
        if self.n is not None and self.n != 1:
            raise InvalidInputError(f"only n=1 is supported, got n={self.n}", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidInputError(f"{name} is not supported (use repetition_penalty)", param=name)
        if self.logprobs or self.top_logprobs:
            raise InvalidInputError("logprobs are not supported", param="logprobs")
        if self.logit_bias:
            raise InvalidInputError("logit_bias is not supported", param="logit_bias")
        if self.tools or self.tool_choice not in (None, "none"):
            raise InvalidInputError("tools are not supported", param="tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise InvalidInputError("only the 'text' response_format is supported", param="response_format")
        if self.modalities is not None and self.modalities != ["text"]:
            raise InvalidInputError("only the 'text' modality is supported", param="modalities")
        if self.functions:
            raise InvalidInputError("functions are not supported", param="functions")
        if self.function_call not in (None, "none"):
            raise InvalidInputError("function_call is not supported", param="function_call")
        for name in ("reasoning_effort", "verbosity", "audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                raise InvalidInputError(f"{name} is not supported", param=name)
        sampling = self.sampling()
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens < 1:  # named as sent, not as the "disagree" below
                raise InvalidInputError(f"max_completion_tokens must be an integer >= 1, got {self.max_completion_tokens}",
                                        param="max_completion_tokens")
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise InvalidInputError("max_tokens and max_completion_tokens disagree", param="max_tokens")
            sampling["max_tokens"] = self.max_completion_tokens
        return sampling
