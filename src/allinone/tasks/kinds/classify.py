"""``classify``: label scoring. Every label's continuation is scored after the prompt.

The answer is therefore always a label of the set and comes with a probability: for each
label, the probabilities of its verbalizers (e.g. "positive", "Positive") are summed, then
normalized over the label set. Labels that span several tokens are scored token by token (see
:meth:`Backend.score`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...engine import ScoreJob, ScoreOutput
from ...errors import InvalidInputError
from ...results import ClassifyResult
from ..prompting import ANSWER_WITH, TaskPrompt, compile_prompt, fill, pick
from .base import Limits, Request, TaskKind, named_list, resolve_lang

if TYPE_CHECKING:
    from ...types import Message
    from ..spec import TaskSpec

#: Content-free inputs of Zhao et al. (2021), "Calibrate Before Use", section 5.
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass
class ClassifyTask:
    """A compiled classification task.

    Attributes:
        name: task name.
        prompt: system prompt, template and few-shot examples.
        verbalizers: label -> the strings the model may answer for it (first one is canonical).
        calibrate: contextual calibration (Zhao et al. 2021, "Calibrate Before Use"): divide
            each label's probability by its mean probability for the content-free inputs
            :data:`CONTENT_FREE`, renormalize.
    """

    name: str
    prompt: TaskPrompt
    verbalizers: dict[str, tuple[str, ...]]
    calibrate: bool = False
    _prior: dict[str, float] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizers)

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(w for words in self.verbalizers.values() for w in words)

    def score_job(self, text: str, max_text_tokens: int | None) -> ScoreJob:
        return ScoreJob(self.prompt.prompt(text, max_text_tokens=max_text_tokens), self.continuations)

    def label_probs(self, logps: Sequence[float]) -> dict[str, float]:
        """Label -> probability: verbalizers' probabilities summed, normalized over the labels."""
        mass = dict.fromkeys(self.labels, 0.0)
        top = max(logps)
        pairs = [(label, w) for label, words in self.verbalizers.items() for w in words]
        for (label, _), lp in zip(pairs, logps):
            mass[label] += math.exp(lp - top)
        total = sum(mass.values())
        return {label: m / total for label, m in mass.items()}


class ClassifyKind(TaskKind):
    name = "classify"
    fields = frozenset({"labels"})

    def check_spec(self, spec: "TaskSpec") -> None:
        names = [lab.name for lab in spec.labels]
        for i, ex in enumerate(spec.examples):
            where = f"examples[{i}]"
            if ex.label is None or ex.output is not None:
                raise ValueError(f"{where}: a classify example needs 'label' (and no 'output')")
            if not spec.labels:
                raise ValueError(f"{where}: examples need declared labels")
            if ex.label not in names:
                raise ValueError(f"{where}.label: {ex.label!r} is not one of {names}")

    def params(self, spec: "TaskSpec") -> set[str]:
        return set(self.common_params) | {"labels", "calibrate"}

    def _request(self, spec: "TaskSpec", text: str, params: dict[str, Any], limits: Limits,
                 history: tuple["Message", ...]) -> Request:
        if "labels" in params:
            labels = named_list(params["labels"], "labels")
        elif spec.labels:
            labels = tuple((lab.name, lab.description) for lab in spec.labels)
        else:
            raise InvalidInputError(f"task {spec.name!r} has no label set of its own: give labels (CLI: --labels a,b,c)",
                                    param="labels")
        if len(labels) < 2:
            raise InvalidInputError("labels: give at least two", param="labels")
        calibrate = params.get("calibrate", spec.defaults.calibrate)
        if not isinstance(calibrate, bool):
            raise InvalidInputError("calibrate must be true or false", param="calibrate")
        return Request(lang=resolve_lang(params.get("lang", spec.defaults.lang), text), labels=labels,
                       calibrate=calibrate, max_input_tokens=limits.max_input_tokens)

    def compile(self, spec: "TaskSpec", req: Request, layout: str = "single") -> ClassifyTask:
        lang = req.lang
        names = [n for n, _ in req.labels]
        descriptions = dict(req.labels)
        declared = {lab.name: lab for lab in spec.labels}
        verbalizers = {n: declared[n].words() if n in declared else (n,) for n in names}
        instructions = pick(spec.instructions, lang)
        if names != [lab.name for lab in spec.labels] and not any(p in instructions for p in ("{labels}", "{label_list}")):
            instructions += "\n" + pick(ANSWER_WITH, lang)
            if any(descriptions.values()):
                instructions += "\n{label_list}"
        instructions = fill(instructions, lang, names, descriptions)
        question = fill(pick(spec.question, lang), lang, names, descriptions)
        examples = [(ex.text, verbalizers[ex.label][0]) for ex in spec.examples_for(lang) if ex.label in verbalizers]
        prompt = compile_prompt(spec, lang, layout, instructions, question, examples)
        return ClassifyTask(spec.name, prompt, verbalizers, calibrate=req.calibrate)

    def jobs(self, compiled: ClassifyTask, text: str, req: Request) -> list[ScoreJob]:
        jobs = [compiled.score_job(text, req.max_input_tokens)]
        if compiled.calibrate and compiled._prior is None:
            jobs += [compiled.score_job(cf, req.max_input_tokens) for cf in CONTENT_FREE]
        return jobs

    def result(self, compiled: ClassifyTask, outputs: Sequence[ScoreOutput], req: Request) -> ClassifyResult:
        main = outputs[0]
        scores = compiled.label_probs(main.logprobs)
        if compiled.calibrate:
            if len(outputs) > 1:
                runs = [compiled.label_probs(o.logprobs) for o in outputs[1:]]
                with compiled._lock:
                    compiled._prior = {lab: sum(r[lab] for r in runs) / len(runs) for lab in compiled.labels}
            prior = compiled._prior
            scores = {lab: p / max(prior[lab], 1e-6) for lab, p in scores.items()}
            total = sum(scores.values())
            scores = {lab: p / total for lab, p in scores.items()}
        label = max(scores, key=scores.__getitem__)
        return ClassifyResult(label=label, scores=scores, truncated=main.info.truncated)

    def input_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        schema = super().input_schema(spec)
        named = {"oneOf": [{"type": "array", "items": {"type": "string"}},
                           {"type": "object", "additionalProperties": {"type": "string"}}]}
        schema["properties"]["labels"] = {**named, "description": "the label set (names, or name: description); "
                                          + ("default: " + ", ".join(lab.name for lab in spec.labels)
                                             if spec.labels else "required")}
        schema["properties"]["calibrate"] = {"type": "boolean", "default": spec.defaults.calibrate,
                                             "description": "contextual calibration of label probabilities"}
        if not spec.labels:
            schema["required"] = ["text", "labels"]
        return schema

    def output_schema(self, spec: "TaskSpec") -> dict[str, Any]:
        label: dict[str, Any] = {"type": "string"}
        if spec.labels:
            label["description"] = "one of " + ", ".join(lab.name for lab in spec.labels) + " (or the requested labels)"
        return {"type": "object", "properties": {
            "label": label,
            "scores": {"type": "object", "additionalProperties": {"type": "number"},
                       "description": "label -> probability; they sum to 1"},
            "truncated": {"type": "boolean"}}, "required": ["label", "scores", "truncated"]}

    def describe(self, spec: "TaskSpec") -> dict[str, Any]:
        return {"labels": [lab.name for lab in spec.labels]}


