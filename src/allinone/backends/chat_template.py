"""Rendering chat messages with a model's own Jinja chat template, safely.

The template text comes from the model (GGUF metadata ``tokenizer.chat_template`` or the HF
tokenizer config) and is rendered in a sandbox, as Hugging Face transformers does. Message
contents are swapped for private-use sentinels before rendering, so after rendering the
template's own text (which holds control tokens like ``<|im_start|>``) can be tokenized with
control tokens parsed while the user's content is tokenized as plain text: typing
``<|im_start|>`` in a message can never open a new turn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import date

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidInputError
from ..types import Message, validate_messages

_SENTINEL = re.compile("\ue000(\\d+)\ue001")

# Used when a model ships no template: ChatML, the format of the Qwen family.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja template text; ``None`` selects ChatML.
        bos_token / eos_token: strings the template may reference.
    """

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: date.today().strftime(fmt)
        self.source = source or CHATML_TEMPLATE
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt as text (for display and tests; tokenize with :meth:`render_ids`)."""
        return self._render(validate_messages(messages), add_generation_prompt)

    def render_ids(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool,
        tokenize_text: Callable[[str], list[int]],
        tokenize_template: Callable[[str], list[int]],
        content_starts: list[int] | None = None,
    ) -> list[int]:
        """Token ids of the rendered prompt; contents through ``tokenize_text`` (no control tokens).

        Args:
            content_starts: if given, filled with the position in the result where each
                non-empty content's ids begin, in the order ``tokenize_text`` was called for them
                (left empty when the template transforms contents and they cannot be located).

        Raises:
            InvalidInputError: the messages are malformed or the template rejects them.
        """
        messages = validate_messages(messages)
        masked = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        rendered = self._render(masked, add_generation_prompt)
        pieces = _SENTINEL.split(rendered)
        seen = [int(x) for x in pieces[1::2]]
        if sorted(seen) != list(range(len(messages))):
            # The template transformed the contents (e.g. stripped them): render for real, with
            # control-token text in contents neutralized so it still cannot open a turn.
            return tokenize_template(self._render(_neutralized(messages), add_generation_prompt))
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                if piece:
                    ids += tokenize_template(piece)
            else:
                content = messages[int(piece)]["content"]
                if content:
                    if content_starts is not None:
                        content_starts.append(len(ids))
                    ids += tokenize_text(content)
        return ids

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise InvalidInputError(f"the model's chat template rejected these messages: {exc}") from exc


def _neutralized(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    # A zero-width space after "<|" breaks every "<|...|>" control token while keeping the text legible.
    return [{**m, "content": m["content"].replace("<|", "<\u200b|")} for m in messages]
