"""Classification by label scoring: every label's continuation is scored after the prompt.

The answer is therefore always a label of the set and comes with a probability: for each
label, the probabilities of its verbalizers (e.g. "positive", "Positive") are summed, then
normalized over the label set. Labels that span several tokens are scored token by token
(see :meth:`Backend.score`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidInputError
from ..results import ClassifyResult

if TYPE_CHECKING:
    from ..backends.base import Backend


@dataclass(frozen=True)
class ClassifyTask:
    """A classification task.

    Attributes:
        name: task name.
        system: the system prompt.
        template: the user message; ``{text}`` is replaced by the input.
        verbalizers: label -> the strings the model may answer for it (first one is canonical).
        answer_prefix: text the assistant's answer starts with, before the label.
    """

    name: str
    system: str
    template: str
    verbalizers: dict[str, tuple[str, ...]]
    answer_prefix: str = ""
    _label_ids: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizers)

    def messages(self, text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.template.replace("{text}", text)},
        ]

    def continuations(self, backend: "Backend") -> list[tuple[str, list[int]]]:
        """(label, token ids) for every verbalizer; cached per backend."""
        key = id(backend)
        if key not in self._label_ids:
            pairs = []
            for label, words in self.verbalizers.items():
                for word in words:
                    ids = backend.tokenize(self.answer_prefix + word)
                    if ids:
                        pairs.append((label, ids))
            self._label_ids.clear()
            self._label_ids[key] = pairs
        return self._label_ids[key]


def prepare_text(backend: "Backend", text: object, max_tokens: int) -> tuple[str, bool]:
    """Validate the input text and cut it to ``max_tokens`` tokens (keeping the start).

    Returns:
        (text, truncated).

    Raises:
        InvalidInputError: not a string, or empty / whitespace only.
    """
    if not isinstance(text, str):
        raise InvalidInputError("text must be a string", param="text")
    if not text.strip():
        raise InvalidInputError("text is empty", param="text")
    ids = backend.tokenize(text)
    if len(ids) <= max_tokens:
        return text, False
    return backend.detokenize(ids[:max_tokens]).rstrip("\ufffd"), True


def classify(backend: "Backend", task: ClassifyTask, text: str, *, max_input_tokens: int = 1024) -> ClassifyResult:
    """Score every label of ``task`` for ``text``; runs on the engine's worker thread.

    Raises:
        InvalidInputError: empty text.
    """
    text, truncated = prepare_text(backend, text, max_input_tokens)
    prefix = backend.render_chat(task.messages(text), add_generation_prompt=True)
    pairs = task.continuations(backend)
    logps = backend.score(prefix, [ids for _, ids in pairs])
    mass: dict[str, float] = {label: 0.0 for label in task.labels}
    top = max(logps)
    for (label, _), lp in zip(pairs, logps):
        mass[label] += math.exp(lp - top)
    total = sum(mass.values())
    scores = {label: m / total for label, m in mass.items()}
    label = max(scores, key=scores.__getitem__)
    return ClassifyResult(label=label, scores=scores, truncated=truncated)
