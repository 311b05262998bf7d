"""Classification by label scoring: every label's continuation is scored after the prompt.

The answer is therefore always a label of the set and comes with a probability: for each
label, the probabilities of its verbalizers (e.g. "positive", "Positive") are summed, then
normalized over the label set. Labels that span several tokens are scored token by token
(see :meth:`Backend.score`).
"""

from __future__ import annotations

import json
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
        examples: few-shot (input text, answer) pairs, rendered as earlier turns.
        calibrate: contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): divide
            each label's probability by its probability for content-free inputs, renormalize.
        delimiters: strings (e.g. ``</text>``) broken up inside the input text so it cannot
            close its own delimiting.
    """

    name: str
    system: str
    template: str
    verbalizers: dict[str, tuple[str, ...]]
    answer_prefix: str = ""
    examples: tuple[tuple[str, str], ...] = ()
    calibrate: bool = False
    delimiters: tuple[str, ...] = ()
    _label_ids: dict = field(default_factory=dict, compare=False, repr=False)
    _prior: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizers)

    def messages(self, text: str) -> list[dict[str, str]]:
        """System prompt, few-shot turns (``examples``: input text, answer), then the input."""
        return few_shot_messages(self.system, self.examples, self.render, text)

    def render(self, text: str) -> str:
        """The user message for ``text``: ``{text}`` is the text with any delimiter inside it
        neutralized; ``{text_json}`` is the text as a JSON string literal (quoted, escaped)."""
        return render_text(self.template, text, self.delimiters)

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
    """Score every label of ``task`` for ``text`` on its own (the engine batches the same two
    steps, :func:`classify_request` and :func:`classify_result`, across requests).

    Raises:
        InvalidInputError: empty text.
    """
    request, truncated = classify_request(backend, task, text, max_input_tokens=max_input_tokens)
    return classify_result(backend, task, backend.score(*request), truncated)


def classify_request(backend: "Backend", task: ClassifyTask, text: str, *,
                     max_input_tokens: int = 1024) -> tuple[tuple[list[int], list[list[int]]], bool]:
    """The prompt and label continuations to score for ``text``.

    Returns:
        ((prompt ids, continuation ids per verbalizer), truncated).

    Raises:
        InvalidInputError: empty text.
    """
    text, truncated = prepare_text(backend, text, max_input_tokens)
    prefix = backend.render_chat(task.messages(text), add_generation_prompt=True)
    return (prefix, [ids for _, ids in task.continuations(backend)]), truncated


def classify_result(backend: "Backend", task: ClassifyTask, logps: list[float], truncated: bool) -> ClassifyResult:
    """The label and probabilities from the verbalizers' log-probs (calibrated if the task says so)."""
    scores = _label_mass(task, task.continuations(backend), logps)
    if task.calibrate:
        prior = content_free_prior(backend, task)
        scores = {label: p / max(prior[label], 1e-6) for label, p in scores.items()}
        total = sum(scores.values())
        scores = {label: p / total for label, p in scores.items()}
    label = max(scores, key=scores.__getitem__)
    return ClassifyResult(label=label, scores=scores, truncated=truncated)


def label_probs(backend: "Backend", task: ClassifyTask, text: str) -> dict[str, float]:
    """Label -> probability (verbalizers summed, normalized over the label set) for ``text``."""
    prefix = backend.render_chat(task.messages(text), add_generation_prompt=True)
    pairs = task.continuations(backend)
    return _label_mass(task, pairs, backend.score(prefix, [ids for _, ids in pairs]))


def _label_mass(task: ClassifyTask, pairs, logps: list[float]) -> dict[str, float]:
    mass: dict[str, float] = {label: 0.0 for label in task.labels}
    top = max(logps)
    for (label, _), lp in zip(pairs, logps):
        mass[label] += math.exp(lp - top)
    total = sum(mass.values())
    return {label: m / total for label, m in mass.items()}


#: Content-free inputs of Zhao et al. (2021), section 5.
CONTENT_FREE = ("N/A", "", "[MASK]")


def content_free_prior(backend: "Backend", task: ClassifyTask) -> dict[str, float]:
    """The mean label distribution over :data:`CONTENT_FREE` inputs; cached per backend."""
    key = id(backend)
    if key not in task._prior:
        runs = [label_probs(backend, task, cf) for cf in CONTENT_FREE]
        task._prior.clear()
        task._prior[key] = {label: sum(r[label] for r in runs) / len(runs) for label in task.labels}
    return task._prior[key]


def render_text(template: str, text: str, delimiters: tuple[str, ...]) -> str:
    """Put ``text`` into ``template`` at ``{text}`` (delimiters neutralized) or ``{text_json}``."""
    if "{text_json}" in template:
        return template.replace("{text_json}", json.dumps(text, ensure_ascii=False))
    return template.replace("{text}", neutralize(text, delimiters))


def neutralize(text: str, delimiters: tuple[str, ...]) -> str:
    """Break every occurrence of each delimiter in ``text`` with a zero-width space after its
    first character, so user text cannot close (or reopen) the block it is quoted in."""
    for d in delimiters:
        if d in text:
            text = text.replace(d, d[0] + "\u200b" + d[1:])
    return text


def few_shot_messages(system: str, examples, render, text: str) -> list[dict[str, str]]:
    """``[system, (user example, assistant answer)*, user text]`` with each user turn rendered
    by ``render``; shared by every task kind that prompts with few-shot turns."""
    msgs = [{"role": "system", "content": system}]
    for example, answer in examples:
        msgs.append({"role": "user", "content": render(example)})
        msgs.append({"role": "assistant", "content": answer})
    msgs.append({"role": "user", "content": render(text)})
    return msgs
