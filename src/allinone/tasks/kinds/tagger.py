"""The learned method of span tasks: a token tagger over the model's own per-token states.

Instead of generating JSON, the text goes through the model once (an encode job) and a linear
head gives each of its tokens a BIO tag (:mod:`allinone.learn.tagging`); the best valid tag
sequence is decoded and mapped to exact character offsets. A tagger cannot answer text that is
not in the input, and an instruction inside the text is just more tokens to tag.

Causal states see only the text to their left; the prompt can hold the text twice and read the
second copy, whose tokens have seen the whole text once ("echo", Springer et al. 2024,
"Repetition Improves Language Model Embeddings"). Which prompt, and which layer, is chosen by
the fit on held-out rows of the training pool (:func:`fit_spans`).

Long text is read in windows of :data:`WINDOW_TOKENS` tokens that overlap by
:data:`OVERLAP_TOKENS`: a window keeps the spans that end before its overlap, and the next
window starts there (earlier, if a span crosses the cut).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...engine import TEXT_SLOT, EncodeJob, Prompt
from ...learn.heads import LinearHead, fit_linear
from ...learn.tagging import bio_tags, spans_from_tags, token_tags, viterbi

if TYPE_CHECKING:
    from ...learn.artifacts import Artifact
    from ...learn.data import TrainingData

#: the text's token budget per window (the echo prompt holds it twice)
WINDOW_TOKENS = 384
#: tokens shared by consecutive windows
OVERLAP_TOKENS = 48

#: the prompts a fit compares: name -> (raw prompt with the text slot(s), instructions)
PROMPTS = {
    "raw": "{slot}",
    "echo": "Text: {slot}\nThe same text: {slot}",
}


def tagger_prompt(variant: str, text: str, *, split_chars: bool, max_text_tokens: int | None = None) -> Prompt:
    """The encode prompt of a tagger variant for ``text``."""
    return Prompt(raw=PROMPTS[variant].format(slot=TEXT_SLOT), text=text, split_chars=split_chars,
                  max_text_tokens=max_text_tokens)


@dataclass(frozen=True)
class Tagger:
    """A fitted tagger: prompt variant, layer, whether CJK text is read one character per token,
    the BIO tag set and the linear head over a token's state."""

    variant: str
    layer: int
    split_chars: bool
    tags: tuple[str, ...]
    head: LinearHead

    @property
    def types(self) -> list[str]:
        return [t[2:] for t in self.tags if t.startswith("B-")]

    def job(self, text: str) -> EncodeJob:
        return EncodeJob(tagger_prompt(self.variant, text, split_chars=self.split_chars,
                                       max_text_tokens=WINDOW_TOKENS), layers=(self.layer,), pooling="tokens")

    def decode(self, text: str, states: np.ndarray, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """Spans of one window: ``states`` (n, D) of its tokens, ``offsets`` into ``text``."""
        if len(offsets) == 0:
            return []
        logp = np.log(np.maximum(self.head.probs(states), 1e-12))
        return spans_from_tags(text, offsets, viterbi(logp, self.tags), self.tags)

    def plan(self, text: str):
        """Rounds of encode jobs over the windows of ``text``; returns (spans, prompt tokens)."""
        spans: list[tuple[int, int, str]] = []
        start, tokens = 0, 0
        while start < len(text) and text[start:].strip():
            (out,) = yield [self.job(text[start:])]
            tokens += out.info.prompt_tokens
            seen = out.info.text or ""
            found = self.decode(seen, out.states[0], out.offsets)
            if not out.info.truncated or len(out.offsets) <= OVERLAP_TOKENS:
                spans += [(start + a, start + b, t) for a, b, t in found]
                break
            cut = out.offsets[-OVERLAP_TOKENS][0]
            for a, b, _ in found:  # never cut through a span: start the next window before it
                if a < cut < b:
                    cut = a
            cut = max(cut, 1)
            spans += [(start + a, start + b, t) for a, b, t in found if b <= cut]
            start += cut
        return spans, tokens

    def tensors(self) -> dict[str, np.ndarray]:
        return self.head.tensors()

    def meta(self) -> dict[str, Any]:
        return {"method": "tagger", "types": self.types, "tags": list(self.tags),
                "features": {"prompt": self.variant, "layer": self.layer, "split_chars": self.split_chars,
                             "window_tokens": WINDOW_TOKENS, "overlap_tokens": OVERLAP_TOKENS}}

    @classmethod
    def from_artifact(cls, artifact: "Artifact") -> "Tagger":
        meta = artifact.meta
        f = meta["features"]
        return cls(f["prompt"], f["layer"], f["split_chars"], tuple(meta["tags"]),
                   LinearHead.from_tensors(meta["tags"], artifact.tensors))


def candidate_layers(n_layer: int) -> tuple[int, ...]:
    """Layers a tagger fit compares (fractions of the depth; see docs/evaluation.md)."""
    return tuple(sorted({max(1, round(d * n_layer)) for d in (0.5, 0.67, 0.83)}))


def fit_spans(data: "TrainingData", types: Sequence[str], *, run: Callable[[list[Any]], list[Any]],
              n_layer: int, variants: Sequence[str] = ("echo", "raw"), split_chars: bool = False,
              c: float = 0.05, holdout: float = 0.2, progress: Callable[[int, int], None] = lambda d, t: None,
              seed: int = 0) -> tuple[Tagger, dict[str, Any]]:
    """Fit a tagger: featurize the rows with every prompt variant, pick the variant and layer by
    entity F1 on a held-out share of the rows (fit on the rest), then fit that one on all rows.

    Returns:
        (the tagger, the report: per variant and layer, held-out precision/recall/F1).
    """
    from ...learn.tagging import span_scores

    tags = bio_tags(types)
    layers = candidate_layers(n_layer)
    n = len(data.texts)
    rng = np.random.default_rng(seed)
    held = np.zeros(n, dtype=bool)
    held[rng.permutation(n)[: max(1, int(holdout * n))]] = True
    report: dict[str, Any] = {"rows": n, "held_out": int(held.sum()), "c": c, "split_chars": split_chars}
    total = n * len(variants)
    done = 0
    best: tuple[float, str, int] | None = None
    features: dict[str, list] = {}
    for variant in variants:
        feats = []
        for start in range(0, n, 16):
            jobs = [EncodeJob(tagger_prompt(variant, t, split_chars=split_chars, max_text_tokens=WINDOW_TOKENS),
                              layers=layers, pooling="tokens") for t in data.texts[start:start + 16]]
            for out in run(jobs):
                feats.append((out.states.astype(np.float16), out.offsets, out.info.text or ""))
            done += len(jobs)
            progress(done, total)
        features[variant] = feats
        gold_tags = [token_tags(text, off, spans, tags) for (_, off, text), spans in zip(feats, data.spans)]
        by_layer = {}
        for k, layer in enumerate(layers):
            x = np.vstack([f[0][k] for f, h in zip(feats, held) if not h]).astype(np.float32)
            y = np.concatenate([g for g, h in zip(gold_tags, held) if not h])
            head = fit_linear(x, [tags[i] for i in y], tags, c=c, balanced=False)
            tagger = Tagger(variant, layer, split_chars, tuple(tags), head)
            pred = [tagger.decode(text, st[k].astype(np.float32), off)
                    for (st, off, text), h in zip(feats, held) if h]
            gold = [s for s, h in zip(data.spans, held) if h]
            by_layer[str(layer)] = span_scores(gold, pred)
            f1 = by_layer[str(layer)]["f1"]
            if best is None or f1 > best[0]:
                best = (f1, variant, layer)
        oracle = span_scores(data.spans, [spans_from_tags(text, off, g, tags)
                                          for (_, off, text), g in zip(feats, gold_tags)])["f1"]
        report[variant] = {"by_layer": by_layer, "token_alignment_f1": oracle}
    _, variant, layer = best
    k = layers.index(layer)
    feats = features[variant]
    x = np.vstack([f[0][k] for f in feats]).astype(np.float32)
    y = np.concatenate([token_tags(text, off, spans, tags) for (_, off, text), spans in zip(feats, data.spans)])
    head = fit_linear(x, [tags[i] for i in y], tags, c=c, balanced=False)
    report["chosen"] = {"prompt": variant, "layer": layer, **report[variant]["by_layer"][str(layer)]}
    return Tagger(variant, layer, split_chars, tuple(tags), head), report
