"""Task heads: small linear models over features the one model computes (hidden states, label
log-probs). Applying a head is a matrix product in numpy; fitting one uses scikit-learn's
logistic regression (the ``fit`` extra).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearHead:
    """``softmax(((x - mean) / scale) @ weight.T + bias)`` over ``labels``.

    Attributes:
        labels: the C labels, in the order of the weight rows.
        mean, scale: (F,) feature standardization fitted on the training rows.
        weight: (C, F); bias: (C,). A two-label head has two rows (the second is the negated
            first, as multinomial logistic regression gives for two classes).
    """

    labels: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, F) or (F,) features -> (N, C) or (C,) logits."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def probs(self, x: np.ndarray) -> np.ndarray:
        """(N, F) or (F,) features -> label probabilities, rows summing to 1."""
        z = self.logits(x)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)

    @property
    def n_features(self) -> int:
        return int(self.weight.shape[1])

    def tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}mean": self.mean.astype(np.float32), f"{prefix}scale": self.scale.astype(np.float32),
                f"{prefix}weight": self.weight.astype(np.float32), f"{prefix}bias": self.bias.astype(np.float32)}

    @classmethod
    def from_tensors(cls, labels: Sequence[str], tensors: dict[str, np.ndarray], prefix: str = "") -> "LinearHead":
        return cls(tuple(labels), *(tensors[f"{prefix}{k}"].astype(np.float64) for k in ("mean", "scale", "weight", "bias")))


def fit_linear(x: np.ndarray, y: Sequence[str], labels: Sequence[str], *, c: float = 0.1,
               balanced: bool = True) -> LinearHead:
    """Standardize ``x`` (N, F) and fit an L2-regularized multinomial logistic regression.

    ``c`` is the inverse regularization strength (scikit-learn's ``C``); with ``balanced`` the
    rows are weighted so that every label weighs the same (``class_weight="balanced"``). A label
    no row has gets a bias of -30 (it is never predicted).

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'allinone[fit]'``).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-8] = 1.0
    z = (x - mean) / scale
    index = {label: i for i, label in enumerate(labels)}
    target = np.array([index[v] for v in y])
    model = LogisticRegression(C=c, max_iter=5000, class_weight="balanced" if balanced else None)
    model.fit(z, target)
    weight = np.zeros((len(labels), x.shape[1]))
    bias = np.full(len(labels), -30.0)
    classes = list(model.classes_)
    if len(classes) == 2 and model.coef_.shape[0] == 1:  # binary: one row, for the second class
        weight[classes[1]], bias[classes[1]] = model.coef_[0] / 2, model.intercept_[0] / 2
        weight[classes[0]], bias[classes[0]] = -model.coef_[0] / 2, -model.intercept_[0] / 2
    else:
        for row, cls in enumerate(classes):
            weight[cls], bias[cls] = model.coef_[row], model.intercept_[row]
    return LinearHead(tuple(labels), mean, scale, weight, bias)


def stratified_folds(y: Sequence[str], k: int, seed: int = 0) -> list[np.ndarray]:
    """``k`` disjoint index arrays, each with about the same share of every label."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    folds: list[list[int]] = [[] for _ in range(k)]
    for label in sorted(set(y.tolist())):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.array(sorted(f)) for f in folds]


def cross_val_predict(x: np.ndarray, y: Sequence[str], labels: Sequence[str], *, c: float, folds: list[np.ndarray],
                      groups: np.ndarray | None = None) -> np.ndarray:
    """Out-of-fold probabilities (N, C): each row predicted by a head fit without its fold.

    ``groups``: rows sharing a group id (a text and its augmented copies) are trained on
    together or not at all; the folds hold group ids then.
    """
    y = np.asarray(y)
    out = np.zeros((len(y), len(labels)))
    ids = np.arange(len(y)) if groups is None else groups
    for held in folds:
        test = np.isin(ids, held)
        head = fit_linear(x[~test], y[~test], labels, c=c)
        out[test] = head.probs(x[test])
    return out
