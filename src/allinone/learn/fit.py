"""Choosing and fitting what a classify task learns, by cross-validation on its training rows.

The features come from one pass of the task's own prompt per row (the API computes them with
score jobs that also return hidden states): the label log-probabilities of the prompt path and
the hidden states of the prompt's last token, the position where the model is about to answer,
at a few layers. The methods compared:

* ``prompt``: the prompt path's own answer (nothing learned; the baseline);
* ``calibrate``: a linear head over the label log-probabilities only, i.e. a calibration of
  the prompt path fitted on the rows (a learned generalization of contextual calibration,
  Zhao et al. 2021, "Calibrate Before Use");
* ``head``: a linear head (logistic regression) over the hidden state of one layer, or of all
  the candidate layers side by side, chosen by cross-validation;
* ``head+logprobs``: the same with the label log-probabilities as further features.

Every method is scored by stratified k-fold cross-validation on the rows (out-of-fold
accuracy and macro-F1 on the rows as given; injected copies of rows, when present, are only
trained on and give the out-of-fold flip rate). ``auto`` keeps the best macro-F1 minus flip rate:
a prediction an appended instruction changes counts as an error on an attacked text, so a head
that is more accurate on clean rows but easier to steer does not win by the accuracy alone.
When a fold's copies use phrasings no other fold's copies use (``fit_classify`` makes them so),
the flip rate is measured on phrasings the head was never trained on, as at evaluation time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .heads import LinearHead, cross_val_predict, fit_linear, stratified_folds

METHODS = ("prompt", "calibrate", "head", "head+logprobs")
LEARNED = ("calibrate", "head", "head+logprobs")
#: inverse regularization strengths tried (scikit-learn's C); on the SST-2 pool's held-out rows
#: C 0.01 did best on 896-dimensional states (0.886, against 0.876 at 0.003 and 0.03)
C_GRID = (0.003, 0.01, 0.03)
#: cross-validation folds of a fit
FOLDS = 5


@dataclass(frozen=True)
class Features:
    """Per row: ``logp`` (N, C) log label probabilities of the prompt path; ``states`` (N, L, D)
    hidden states of the prompt's last token at ``layers``."""

    logp: np.ndarray
    states: np.ndarray
    layers: tuple[int, ...]

    def matrix(self, method: str, layers: tuple[int, ...]) -> np.ndarray:
        """(N, F) features of ``method`` reading the states at ``layers`` (side by side)."""
        if method == "calibrate":
            return self.logp
        state = self.states[:, [self.layers.index(x) for x in layers]].reshape(len(self.states), -1)
        return np.hstack([state, self.logp]) if method == "head+logprobs" else state


@dataclass(frozen=True)
class Choice:
    """A fitted method: its name, the layers whose states it reads (heads; ``()`` otherwise), the
    head (None for ``prompt``), and the cross-validation report of every method tried."""

    method: str
    layers: tuple[int, ...]
    c: float | None
    head: LinearHead | None
    report: dict[str, Any]


def _metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-label F1), as the evaluation reports them."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    f1 = []
    for label in labels:
        tp = float(np.sum((gold == label) & (pred == label)))
        predicted, actual = float(np.sum(pred == label)), float(np.sum(gold == label))
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"accuracy": round(float(np.mean(gold == pred)), 4), "macro_f1": round(float(np.mean(f1)), 4)}


def objective(scores: dict[str, float]) -> float:
    """What a fit maximizes: macro-F1 minus the flip rate (0 when no injected copies were scored)."""
    return scores["macro_f1"] - scores.get("flip_rate", 0.0)


def choose(features: Features, y: Sequence[str], labels: Sequence[str], *, clean: np.ndarray, groups: np.ndarray,
           methods: Sequence[str] = METHODS, folds: int = FOLDS, seed: int = 0,
           fold_ids: Sequence[np.ndarray] | None = None,
           note: Callable[[str], None] = lambda _: None) -> Choice:
    """Score ``methods`` by cross-validation and fit the best on every row.

    Args:
        features: the features of every row (the clean rows and their injected copies).
        y: every row's label.
        clean: bool (N,): the rows as given (the others are injected copies).
        groups: (N,) the index of the clean row each row comes from (a clean row: its own).
        methods: the candidates, from :data:`METHODS`; the best :func:`objective` wins (layers
            and C of a head are chosen by it too).
        fold_ids: the row indices of the clean rows in each fold; default ``folds`` stratified
            folds drawn with ``seed``.

    Raises:
        InvalidInputError: an unknown method.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise InvalidInputError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}",
                                param="method")
    y = np.asarray(y)
    labels = list(labels)
    clean_idx = np.flatnonzero(clean)
    if fold_ids is None:
        fold_ids = [clean_idx[f] for f in stratified_folds(y[clean_idx], folds, seed)]
    folds = len(fold_ids)
    copies = np.flatnonzero(~clean)
    report: dict[str, Any] = {"folds": folds, "rows": int(clean.sum()), "injected_copies": int(len(copies))}
    candidates: list[tuple[float, str, tuple[int, ...], float | None]] = []

    def scored(probs: np.ndarray) -> dict[str, float]:
        pred = np.array(labels)[probs.argmax(axis=1)]
        out = _metrics(y[clean], pred[clean], labels)
        if len(copies):
            out["flip_rate"] = round(float(np.mean(pred[copies] != pred[groups[copies]])), 4)
        return out

    prompt_probs = np.exp(features.logp - features.logp.max(axis=1, keepdims=True))
    if "prompt" in methods:
        report["prompt"] = scored(prompt_probs)
        candidates.append((objective(report["prompt"]), "prompt", (), None))
    for method in [m for m in methods if m in LEARNED]:
        note(method)
        reads: list[tuple[int, ...]] = [()] if method == "calibrate" else [(x,) for x in features.layers]
        if method != "calibrate" and len(features.layers) > 1:
            reads.append(tuple(features.layers))
        per_layer = {}
        for layer in reads:  # the layers by CV at the middle C, then C for those
            x = features.matrix(method, layer)
            per_layer[layer] = scored(cross_val_predict(x, y, labels, c=C_GRID[1], folds=fold_ids, groups=groups))
        best_layer = max(per_layer, key=lambda k: objective(per_layer[k]))
        per_c = {C_GRID[1]: per_layer[best_layer]}
        x = features.matrix(method, best_layer)
        for c in (C_GRID[0], C_GRID[2]):
            per_c[c] = scored(cross_val_predict(x, y, labels, c=c, folds=fold_ids, groups=groups))
        best_c = max(per_c, key=lambda k: objective(per_c[k]))
        entry = {**per_c[best_c], "c": best_c}
        if best_layer:
            entry["layers"] = list(best_layer)
            entry["by_layer"] = {"+".join(map(str, k)): v["macro_f1"] for k, v in per_layer.items()}
            if len(copies):
                entry["flip_by_layer"] = {"+".join(map(str, k)): v["flip_rate"] for k, v in per_layer.items()}
        report[method] = entry
        candidates.append((objective(entry), method, best_layer, best_c))
    _, method, layer, c = max(candidates, key=lambda t: (t[0], t[1] == "prompt"))
    head = None
    if method != "prompt":
        head = fit_linear(features.matrix(method, layer), y, labels, c=c)
    report["chosen"] = method
    return Choice(method, layer, c, head, report)
