"""Metrics: classification (accuracy, per-label P/R/F1, macro-F1, confusion matrix), exact-span
micro P/R/F1 for NER, and keyphrase F1@k after normalisation."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
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
    confusion = {g: dict.fromkeys(labels, 0) for g in labels}
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


# -- spans (NER) ----------------------------------------------------------------------------
Span = tuple[int, int, str]  # (start, end, type)


@dataclass(frozen=True)
class SpanReport:
    """Exact-span micro precision/recall/F1: a predicted span counts only if its start, end and
    type all equal a gold span's. ``per_type[type]`` has precision, recall, f1, support (gold)
    and predicted; the overall figures are micro-averaged over all documents and types."""

    n: int
    precision: float
    recall: float
    f1: float
    tp: int
    predicted: int
    gold: int
    per_type: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prf(tp: int, predicted: int, gold: int) -> tuple[float, float, float]:
    p = tp / predicted if predicted else 0.0
    r = tp / gold if gold else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def span_report(gold: Sequence[Iterable[Span]], pred: Sequence[Iterable[Span]]) -> SpanReport:
    """Score predicted spans against gold spans, one collection per document.

    Duplicates within a document count once. Raises ValueError on different lengths or none.
    """
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of the same length")
    counts: dict[str, list[int]] = {}  # type -> [tp, predicted, gold]
    for g_doc, p_doc in zip(gold, pred):
        g, p = set(map(tuple, g_doc)), set(map(tuple, p_doc))
        for span in g:
            counts.setdefault(span[2], [0, 0, 0])[2] += 1
        for span in p:
            c = counts.setdefault(span[2], [0, 0, 0])
            c[1] += 1
            c[0] += span in g
    per_type = {}
    for t in sorted(counts):
        tp, npred, ngold = counts[t]
        prec, rec, f1 = _prf(tp, npred, ngold)
        per_type[t] = {"precision": prec, "recall": rec, "f1": f1, "support": ngold, "predicted": npred}
    tp, npred, ngold = (sum(c[i] for c in counts.values()) for i in range(3))
    prec, rec, f1 = _prf(tp, npred, ngold)
    return SpanReport(n=len(gold), precision=prec, recall=rec, f1=f1, tp=tp, predicted=npred, gold=ngold,
                      per_type=per_type)


# -- keyphrases -----------------------------------------------------------------------------
def s_stem(word: str) -> str:
    """The "S" stemmer of Harman (1991), "How effective is suffixing?", JASIS 42(1), 7-15.

    Three rules, and only the first whose ending matches is used (its exceptions leave the
    word as it is): -ies -> -y, except -eies, -aies; -es -> -e, except -aes, -ees, -oes;
    -s -> (nothing), except -us, -ss. Only plural forms are conflated.
    """
    if word.endswith("ies") and len(word) > 3:
        return word if word.endswith(("eies", "aies")) else word[:-3] + "y"
    if word.endswith("es") and len(word) > 2:
        return word if word.endswith(("aes", "ees", "oes")) else word[:-1]
    if word.endswith("s") and len(word) > 1:
        return word if word.endswith(("us", "ss")) else word[:-1]
    return word


def normalize_phrase(phrase: str, *, stem: bool = True) -> str:
    """Keyphrase normalisation for matching: NFKC, case-fold, punctuation and symbols to spaces,
    whitespace collapsed, and (``stem``) each ASCII-letter word through :func:`s_stem`.
    Chinese text is only NFKC-normalised, case-folded and stripped of punctuation."""
    text = unicodedata.normalize("NFKC", phrase).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PSZC" else ch for ch in text)
    words = text.split()
    if stem:
        words = [s_stem(w) if w.isascii() and w.isalpha() else w for w in words]
    return " ".join(words)


@dataclass(frozen=True)
class KeywordReport:
    """Keyphrase extraction at a cut-off k (default 10), macro-averaged over documents.

    Per document, the first k predicted phrases (after normalisation and de-duplication) are
    compared with the normalised gold set: precision = matches / number predicted (at most k; 0
    with no prediction), recall = matches / number of gold phrases, F1 their harmonic mean.
    ``f1`` is the mean of the per-document F1 (as in Meng et al. 2017, "Deep Keyphrase
    Generation"); ``micro_f1`` pools the matches over all documents.
    """

    n: int
    k: int
    precision: float
    recall: float
    f1: float
    micro_f1: float
    stem: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def keyword_report(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], *, k: int = 10,
                   stem: bool = True) -> KeywordReport:
    """Score ranked predicted keyphrases against gold ones (see :class:`KeywordReport`)."""
    if len(gold) != len(pred) or not gold:
        raise ValueError("gold and pred must be non-empty and of the same length")
    ps, rs, fs = [], [], []
    tp_all = pred_all = gold_all = 0
    for g_doc, p_doc in zip(gold, pred):
        g = {x for x in (normalize_phrase(s, stem=stem) for s in g_doc) if x}
        p = list(dict.fromkeys(x for x in (normalize_phrase(s, stem=stem) for s in p_doc) if x))[:k]
        tp = sum(x in g for x in p)
        prec, rec, f1 = _prf(tp, len(p), len(g))
        ps.append(prec)
        rs.append(rec)
        fs.append(f1)
        tp_all, pred_all, gold_all = tp_all + tp, pred_all + len(p), gold_all + len(g)
    n = len(gold)
    return KeywordReport(n=n, k=k, precision=sum(ps) / n, recall=sum(rs) / n, f1=sum(fs) / n,
                         micro_f1=_prf(tp_all, pred_all, gold_all)[2], stem=stem)
