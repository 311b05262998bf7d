"""``classify``: label scoring. Every label's continuation is scored after the prompt.

The answer is therefore always a label of the set and comes with a probability: for each
label, the probabilities of its verbalizers (e.g. "positive", "Positive") are summed, then
normalized over the label set. Labels that span several tokens are scored token by token (see
:meth:`Backend.score`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ...engine import ScoreJob, ScoreOutput
from ...errors import InvalidInputError
from ...learn.artifacts import Artifact
from ...learn.augment import injected_copies
from ...learn.fit import FOLDS, Choice, Features, choose
from ...learn.heads import LinearHead, stratified_folds
from ...results import LOW_COVERAGE, ClassifyResult
from ..prompting import ANSWER_WITH, TaskPrompt, compile_prompt, fill, pick
from .base import Limits, Request, TaskKind, named_list, resolve_lang

if TYPE_CHECKING:
    from ...learn.data import TrainingData
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
    #: what the task learned for this model, when it applies (see :class:`LearnedHead`)
    learned: "LearnedHead | None" = None
    _prior: dict[str, float] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizers)

    @property
    def continuations(self) -> tuple[str, ...]:
        return tuple(w for words in self.verbalizers.values() for w in words)

    def score_job(self, text: str, max_text_tokens: int | None, layers: tuple[int, ...] = ()) -> ScoreJob:
        return ScoreJob(self.prompt.prompt(text, max_text_tokens=max_text_tokens), self.continuations, layers=layers)

    def log_label_probs(self, logps: Sequence[float]) -> np.ndarray:
        """The label distribution of the prompt path, as log-probabilities (C,): a head's features."""
        probs = self.label_probs(logps)
        return np.log(np.maximum([probs[lab] for lab in self.labels], 1e-12))

    def label_probs(self, logps: Sequence[float]) -> dict[str, float]:
        """Label -> probability: verbalizers' probabilities summed, normalized over the labels."""
        mass = dict.fromkeys(self.labels, 0.0)
        top = max(logps)
        pairs = [(label, w) for label, words in self.verbalizers.items() for w in words]
        for (label, _), lp in zip(pairs, logps):
            mass[label] += math.exp(lp - top)
        total = sum(mass.values())
        return {label: m / total for label, m in mass.items()}


@dataclass(frozen=True)
class LearnedHead:
    """A classify task's learned method: ``method`` (``calibrate``, ``head``, ``head+logprobs``),
    the layers whose last-token states it reads side by side (``()`` for ``calibrate``) and the
    linear head over those features (see :mod:`allinone.learn.fit`).

    ``min_prompt_tokens``: prompt language -> the fewest prompt tokens of a row it was fit on. A
    shorter prompt (a text shorter than every training row of its language) is scored by the
    prompt path instead: a head has never seen such states and can be confidently wrong on them
    (the SST-2 pool holds rows of 6 words or more, and the head read "I hate it" and "awful" as
    positive 0.83 and 0.84, where the prompt answers negative).
    """

    method: str
    layers: tuple[int, ...]
    head: LinearHead
    min_prompt_tokens: dict[str, int] = field(default_factory=dict)

    def serves(self, lang: str, prompt_tokens: int) -> bool:
        """Whether the head scores a prompt of ``prompt_tokens`` tokens in ``lang``."""
        return prompt_tokens >= self.min_prompt_tokens.get(lang, 0)

    def features(self, log_label_probs: np.ndarray, states: np.ndarray | None) -> np.ndarray:
        """(C,) label log-probs and (len(layers), D) states -> the head's (F,) features."""
        if self.method == "calibrate":
            return log_label_probs
        state = np.asarray(states).reshape(-1)
        if self.method == "head":
            return state
        return np.concatenate([state, log_label_probs])

    @classmethod
    def from_artifact(cls, artifact: Artifact) -> "LearnedHead":
        meta = artifact.meta
        f = meta["features"]
        layers = f["layers"] if "layers" in f else [f["layer"]] if f.get("layer") is not None else []
        return cls(meta["method"], tuple(layers), LinearHead.from_tensors(meta["labels"], artifact.tensors),
                   dict(f.get("min_prompt_tokens", {})))


class ClassifyKind(TaskKind):
    name = "classify"
    fields = frozenset({"labels"})

    def check_spec(self, spec: "TaskSpec") -> None:
        names = [lab.name for lab in spec.labels]
        if len(names) == 1:  # every request would fail with "give at least two"
            raise ValueError("labels: declare at least two (or none, and give them per request)")
        said: dict[str, str] = {}
        for lab in spec.labels:  # a word two labels share scores both the same: a tie on every text
            for word in lab.words():
                if said.setdefault(word, lab.name) != lab.name:
                    raise ValueError(f"labels: {said[word]!r} and {lab.name!r} both answer {word!r}")
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
        return Request(lang=resolve_lang(spec, params, text), labels=labels,
                       calibrate=calibrate, max_input_tokens=limits.max_input_tokens)

    def applies(self, artifact: Artifact | None, req: Request) -> bool:
        """Whether a learned artifact serves this request: fit for this label set (in any
        order), and no prompt-path option (calibration) asked for."""
        return (artifact is not None and artifact.meta.get("kind") == self.name and not req.calibrate
                and sorted(artifact.meta.get("labels", ())) == sorted(n for n, _ in req.labels))

    def compile(self, spec: "TaskSpec", req: Request, layout: str = "single",
                artifact: Artifact | None = None) -> ClassifyTask:
        learned = LearnedHead.from_artifact(artifact) if self.applies(artifact, req) else None
        if learned is not None:
            # The head reads the states of the prompt it was fit on: the same layout, and the
            # labels listed in the fit's order with the fit's descriptions (the declared ones,
            # or none), whatever order and descriptions this request gives.
            layout = "single"
            fit_order = list(learned.head.labels)
            if [lab.name for lab in spec.labels] == fit_order:
                req = replace(req, labels=tuple((lab.name, lab.description) for lab in spec.labels))
            else:
                req = replace(req, labels=tuple((name, "") for name in fit_order))
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
        return ClassifyTask(spec.name, prompt, verbalizers, calibrate=req.calibrate, learned=learned)

    def jobs(self, compiled: ClassifyTask, text: str, req: Request) -> list[ScoreJob]:
        layers = compiled.learned.layers if compiled.learned is not None else ()
        jobs = [compiled.score_job(text, req.max_input_tokens, layers)]
        if compiled.calibrate and compiled._prior is None:
            jobs += [compiled.score_job(cf, req.max_input_tokens) for cf in CONTENT_FREE]
        return jobs

    def result(self, compiled: ClassifyTask, outputs: Sequence[ScoreOutput], req: Request) -> ClassifyResult:
        main = outputs[0]
        scores = compiled.label_probs(main.logprobs)
        if compiled.learned is not None and compiled.learned.serves(req.lang, main.info.prompt_tokens):
            learned = compiled.learned
            probs = learned.head.probs(learned.features(compiled.log_label_probs(main.logprobs), main.hidden))
            scores = dict(zip(learned.head.labels, (float(p) for p in probs)))
        elif compiled.calibrate:
            if len(outputs) > 1:
                runs = [compiled.label_probs(o.logprobs) for o in outputs[1:]]
                with compiled._lock:
                    compiled._prior = {lab: sum(r[lab] for r in runs) / len(runs) for lab in compiled.labels}
            prior = compiled._prior
            scores = {lab: p / max(prior[lab], 1e-6) for lab, p in scores.items()}
            total = sum(scores.values())
            scores = {lab: p / total for lab, p in scores.items()}
        label = max(scores, key=scores.__getitem__)
        coverage = float(sum(math.exp(lp) for lp in main.logprobs))
        warning = None
        if coverage < LOW_COVERAGE:
            warning = (f"the labels hold only {coverage:.2g} of the model's probability for this text "
                       f"(below {LOW_COVERAGE}): they may not fit it")
        return ClassifyResult(label=label, scores=scores, truncated=main.info.truncated,
                              coverage=round(min(coverage, 1.0), 6), warning=warning)

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
            "truncated": {"type": "boolean"},
            "coverage": {"type": ["number", "null"], "description": "the labels' share of the model's probability"},
            "warning": {"type": ["string", "null"], "description": "set when coverage is low"}},
            "required": ["label", "scores", "truncated"]}

    def describe(self, spec: "TaskSpec") -> dict[str, Any]:
        return {"labels": [lab.name for lab in spec.labels]}




#: the layers whose last-token states a fit compares, as fractions of the model's depth (of 24
#: layers in the 0.5B model: 12, 16, 18, 20, 24). On 2000 SST-2 pool rows (1500 to fit, 500 held
#: out) a head on the task prompt's last-token state scored 0.83 (layer 11), 0.87 (16), 0.88
#: (19), 0.86 (21), 0.85 (23) against 0.86 for the prompt itself; the bare text's mean state
#: reached 0.82 and the text fed twice ("echo", second copy's mean) 0.84 (docs/evaluation.md).
CANDIDATE_DEPTHS = (0.5, 0.67, 0.75, 0.83, 1.0)


def candidate_layers(n_layer: int) -> tuple[int, ...]:
    """The layers a fit tries, for a model of ``n_layer`` layers."""
    return tuple(sorted({max(1, round(d * n_layer)) for d in CANDIDATE_DEPTHS}))


def fit_classify(kind: ClassifyKind, spec: "TaskSpec", data: "TrainingData", labels: Sequence[str], *,
                 compile_for: Callable[[Request], ClassifyTask], run: Callable[[list[Any]], list[Any]],
                 limits: Limits, n_layer: int, methods: Sequence[str], augment: bool = True,
                 progress: Callable[[int, int], None] = lambda done, total: None) -> tuple[Choice, dict[str, Any]]:
    """Featurize the rows with the task's own prompt, compare ``methods`` by cross-validation
    (:func:`allinone.learn.fit.choose`) and fit the best.

    Args:
        compile_for: the compiled prompt task for a request (the caller's cache).
        run: runs a list of engine jobs and returns their outputs.
        augment: also train on injected copies of 30% of the rows (:mod:`allinone.learn.augment`).
        progress: called with (rows done, rows in all).

    Returns:
        (the choice, the artifact's ``features`` description).
    """
    texts, y = list(data.texts), list(data.labels)
    groups = list(range(len(texts)))
    fold_ids = stratified_folds(data.labels, FOLDS)
    fold_of = np.zeros(len(texts), dtype=int)
    for k, rows in enumerate(fold_ids):
        fold_of[rows] = k
    if augment:  # a fold's copies get phrasings of their own: its flip rate is on unseen phrasings
        for i, text in injected_copies(data.texts, data.labels, labels, phrase_groups=fold_of, n_groups=FOLDS):
            texts.append(text)
            y.append(data.labels[i])
            groups.append(i)
    clean = np.arange(len(texts)) < len(data.texts)
    layers = candidate_layers(n_layer)
    params = {} if [lab.name for lab in spec.labels] == list(labels) else {"labels": list(labels)}
    logp, states = [], []
    shortest: dict[str, int] = {}  # prompt language -> fewest prompt tokens of a clean row
    chunk = 32
    for start in range(0, len(texts), chunk):
        batch = texts[start:start + chunk]
        compiled = []
        for text in batch:
            req = kind.request(spec, text, params, limits)
            compiled.append((compile_for(req), req))
        outs = run([task.score_job(text, req.max_input_tokens, layers) for text, (task, req) in zip(batch, compiled)])
        for row, ((task, req), out) in enumerate(zip(compiled, outs), start):
            logp.append(task.log_label_probs(out.logprobs))
            states.append(out.hidden)
            if row < len(data.texts):
                shortest[req.lang] = min(shortest.get(req.lang, out.info.prompt_tokens), out.info.prompt_tokens)
        progress(min(start + chunk, len(texts)), len(texts))
    features = Features(np.stack(logp), np.stack(states), layers)
    choice = choose(features, y, labels, clean=clean, groups=np.array(groups), methods=methods, fold_ids=fold_ids)
    described = {"prompt": "the task's own prompt, state of its last token", "layers": list(choice.layers),
                 "logprobs": choice.method in ("calibrate", "head+logprobs"), "min_prompt_tokens": shortest}
    return choice, described
