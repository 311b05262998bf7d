"""Classification metrics: accuracy, per-label precision/recall/F1, macro-F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ClassifyReport:
    """Scores of predictions against gold labels.

    ``confusion[gold][pred]`` counts examples; ``per_label[label]`` has precision, recall, f1
    and support. Macro-F1 is the unweighted mean of per-label F1 over the label set.
    """

    n: int
    accuracy: float
    macro_f1: float
    labels: list[str]
    per_label: dict[str, dict[str, float]]
    confusion: dict[str, dict[str, int]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def confusion_table(self) -> str:
        """The confusion matrix as a markdown table (rows: gold, columns: predicted)."""
        head = "| gold \\ predicted | " + " | ".join(self.labels) + " |"
        sep = "|---" * (len(self.labels) + 1) + "|"
        rows = [f"| {g} | " + " | ".join(str(self.confusion[g][p]) for p in self.labels) + " |" for g in self.labels]
        return "\n".join([head, sep, *rows])


def classification_report(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str] | None = None) -> ClassifyReport:
    """Compare ``pred`` with ``gold`` (same length, at least one example).

    Raises:
        ValueError: different lengths or no examples.
    """
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of the same length")
    labels = list(labels) if labels else sorted(set(gold) | set(pred))
    for extra in sorted((set(gold) | set(pred)) - set(labels)):
        labels.append(extra)
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_label = {}
    for lab in labels:
        tp = confusion[lab][lab]
        predicted = sum(confusion[g][lab] for g in labels)
        support = sum(confusion[lab].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    scored = [lab for lab in labels if per_label[lab]["support"] or any(confusion[g][lab] for g in labels)]
    macro_f1 = sum(per_label[lab]["f1"] for lab in scored) / len(scored)
    accuracy = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    return ClassifyReport(n=len(gold), accuracy=accuracy, macro_f1=macro_f1, labels=labels,
                          per_label=per_label, confusion=confusion)
