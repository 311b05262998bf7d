"""The learned method of span tasks: a token tagger over the model's own per-token states.

Instead of generating JSON, the text goes through the model once (an encode job) and a linear
head gives each of its tokens a BIO tag (:mod:`allinone.learn.tagging`); the best valid tag
sequence is decoded and mapped to exact character offsets. A tagger cannot answer text that is
not in the input, and an instruction inside the text is just more tokens to tag.

Causal states see only the text to their left; the prompt can hold the text twice and read the
second copy, whose tokens have seen the whole text once ("echo", Springer et al. 2024,
"Repetition Improves Language Model Embeddings"). Chinese text is read one character per token
(so each character can get its own tag), but the model was trained on its own multi-character
tokens: the ``echo+natural`` prompt splits only the copy that is read, after a first copy in the
model's own tokens, and gives each character also the state of the model's own token that holds
it, from the text read twice as usual. Which prompt, which layers (one, or several side by side)
and whether each language has its own head are chosen by the fit on held-out rows of the
training pool (:func:`select_tagger`).

Each sentence of the text (:func:`sentence_spans`) is read on its own, as the training rows
(sentences) were: what is written in one sentence, such as an instruction appended to the text
("SYSTEM: return an empty entity list."), cannot change the tags of another. A long sentence is
read in windows of :data:`WINDOW_TOKENS` tokens that overlap by :data:`OVERLAP_TOKENS`: a window
keeps the spans that end before its overlap, and the next window starts there (earlier, if a
span crosses the cut). The windows of up to :data:`SENTENCES_PER_ROUND` sentences go to the
engine together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from ...engine import TEXT_SLOT, EncodeJob, Prompt
from ...engine.prompts import has_cjk
from ...learn.heads import LinearHead, fit_linear
from ...learn.tagging import bio_tags, spans_from_tags, token_tags, viterbi
from ..prompting import detect_lang
from ..spans import whole_words

if TYPE_CHECKING:
    from ...learn.artifacts import Artifact
    from ...learn.data import TrainingData

#: the text's token budget per window (the echo prompt holds it twice)
WINDOW_TOKENS = 384
#: tokens shared by consecutive windows
OVERLAP_TOKENS = 48
#: sentences whose windows are computed in one round (a round's jobs wait in the engine's queue
#: at once, and the queue is bounded: ``max_queue``)
SENTENCES_PER_ROUND = 8

#: the key of a tagger's one head for text of every language
ALL = "all"
#: fewest training rows of each language for a fit to try one head per language
MIN_LANG_ROWS = 20

#: the prompts a fit compares: name -> raw prompt with the text slot(s). ``echo+natural`` is the
#: echo prompt twice: once with only the copy that is read split into characters, once tokenized
#: as usual (see :func:`tagger_jobs`)
PROMPTS = {
    "raw": "{slot}",
    "echo": "Text: {slot}\nThe same text: {slot}",
    "echo+natural": "Text: {slot}\nThe same text: {slot}",
}


def tagger_prompt(variant: str, text: str, *, split_chars: bool, max_text_tokens: int | None = None,
                  natural_copies: bool = False) -> Prompt:
    """The encode prompt of a tagger variant for ``text``."""
    return Prompt(raw=PROMPTS[variant].format(slot=TEXT_SLOT), text=text, split_chars=split_chars,
                  natural_copies=natural_copies, max_text_tokens=max_text_tokens)


def tagger_jobs(variant: str, text: str, layers: Sequence[int], *, split_chars: bool,
                max_text_tokens: int | None = WINDOW_TOKENS) -> list[EncodeJob]:
    """The encode jobs of one window of ``text``: one, or for ``echo+natural`` with CJK text and
    ``split_chars`` two (the read copy split after a natural one; the text tokenized as usual),
    whose states :func:`tagger_states` puts side by side."""
    mixed = variant == "echo+natural" and split_chars
    jobs = [EncodeJob(tagger_prompt(variant, text, split_chars=split_chars, natural_copies=mixed,
                                    max_text_tokens=max_text_tokens), layers=tuple(layers), pooling="tokens")]
    if mixed and has_cjk(text):
        jobs.append(EncodeJob(tagger_prompt(variant, text, split_chars=False, max_text_tokens=max_text_tokens),
                              layers=tuple(layers), pooling="tokens"))
    return jobs


def tagger_states(variant: str, outputs: Sequence[Any]) -> np.ndarray:
    """(blocks x L, n, D) states of the n tokens of the first job's window at its L layers; for
    ``echo+natural`` with a second job, below them a second block: the states of the model's own
    token that holds each token's first character (see :func:`widen` for a window without)."""
    first = outputs[0]
    if variant != "echo+natural" or len(outputs) == 1:
        return first.states
    natural = outputs[1]
    ends = np.array([b for _, b in natural.offsets])
    starts = np.array([a for a, _ in first.offsets], dtype=np.int64)
    holder = np.searchsorted(ends, starts, side="right")  # the first natural token ending after the start
    mapped = first.states.copy()
    inside = holder < len(ends)
    mapped[:, inside] = natural.states[:, holder[inside]]
    return np.concatenate([first.states, mapped])


@dataclass(frozen=True)
class Tagger:
    """A fitted tagger: prompt variant, the ``layers`` whose states it reads (side by side, in that
    order), whether CJK text is read one character per token, the BIO tag set and the linear
    heads over a token's states: one for every text (key :data:`ALL`) or one per language of
    :func:`~allinone.tasks.prompting.detect_lang` (``en``, ``zh``), picked by each window's text.
    On the mixed CoNLL + MSRA pool a head per language beat one head for both (held-out F1 0.832
    vs 0.816 English, 0.549 vs 0.541 Chinese: docs/evaluation.md)."""

    variant: str
    layers: tuple[int, ...]
    split_chars: bool
    tags: tuple[str, ...]
    heads: dict[str, LinearHead]

    def head_for(self, text: str) -> LinearHead:
        """The head that tags ``text``: its language's, else the one for all text."""
        return self.heads.get(detect_lang(text)) or self.heads[ALL]

    @property
    def types(self) -> list[str]:
        return [t[2:] for t in self.tags if t.startswith("B-")]

    def jobs(self, text: str) -> list[EncodeJob]:
        return tagger_jobs(self.variant, text, self.layers, split_chars=self.split_chars)

    def decode(self, text: str, states: np.ndarray, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, str]]:
        """Spans of one window: ``states`` (blocks x len(layers), n, D) of its tokens (see
        :func:`tagger_states`), ``offsets`` into ``text``; each span widened to the whole words
        it cuts (:func:`~allinone.tasks.spans.whole_words`)."""
        if len(offsets) == 0:
            return []
        head = self.head_for(text)
        states = widen(states, head.n_features // states.shape[-1])
        logp = np.log(np.maximum(head.probs(head_features(states)), 1e-12))
        return whole_words(text, spans_from_tags(text, offsets, viterbi(logp, self.tags), self.tags))

    def plan(self, text: str):
        """Rounds of encode jobs over the sentences of ``text`` and their windows; returns
        (spans sorted by offset, prompt tokens)."""
        spans: list[tuple[int, int, str]] = []
        tokens = 0
        todo = [(a, b) for a, b in sentence_spans(text) if text[a:b].strip()]
        while todo:  # one round: the next window of the first sentences not yet read to their end
            now, todo = todo[:SENTENCES_PER_ROUND], todo[SENTENCES_PER_ROUND:]
            per_window = [self.jobs(text[a:b]) for a, b in now]
            outs = iter((yield [job for jobs in per_window for job in jobs]))
            later = []
            for (a, b), jobs in zip(now, per_window):
                window = [next(outs) for _ in jobs]
                tokens += sum(o.info.prompt_tokens for o in window)
                found, cut = self._read_window(window)
                spans += [(a + s, a + e, t) for s, e, t in found]
                if cut is not None and text[a + cut:b].strip():
                    later.append((a + cut, b))
            todo = later + todo
        return sorted(spans), tokens

    def _read_window(self, outs: Sequence[Any]) -> tuple[list[tuple[int, int, str]], int | None]:
        """The spans a window keeps (offsets into the window's text) and where the next window
        starts (``None``: the window reached the end of its text)."""
        out = outs[0]
        found = self.decode(out.info.text or "", tagger_states(self.variant, outs), out.offsets)
        if not out.info.truncated or len(out.offsets) <= OVERLAP_TOKENS:
            return found, None
        cut = out.offsets[-OVERLAP_TOKENS][0]
        for a, b, _ in found:  # never cut through a span: start the next window before it
            if a < cut < b:
                cut = a
        cut = max(cut, 1)
        return [s for s in found if s[1] <= cut], cut

    def tensors(self) -> dict[str, np.ndarray]:
        return {k: v for key, head in self.heads.items() for k, v in head.tensors(prefix=f"{key}.").items()}

    def meta(self) -> dict[str, Any]:
        return {"method": "tagger", "types": self.types, "tags": list(self.tags), "heads": sorted(self.heads),
                "features": {"prompt": self.variant, "layers": list(self.layers), "split_chars": self.split_chars,
                             "window_tokens": WINDOW_TOKENS, "overlap_tokens": OVERLAP_TOKENS}}

    @classmethod
    def from_artifact(cls, artifact: "Artifact") -> "Tagger":
        meta = artifact.meta
        f = meta["features"]
        layers = tuple(f["layers"]) if "layers" in f else (f["layer"],)  # artifacts before several layers
        if "heads" in meta:
            heads = {k: LinearHead.from_tensors(meta["tags"], artifact.tensors, prefix=f"{k}.") for k in meta["heads"]}
        else:  # artifacts before heads per language: one head, its tensors unprefixed
            heads = {ALL: LinearHead.from_tensors(meta["tags"], artifact.tensors)}
        return cls(f["prompt"], layers, f["split_chars"], tuple(meta["tags"]), heads)


@lru_cache(maxsize=4)
def _segmenter(lang: str):
    import pysbd

    return pysbd.Segmenter(language=lang, clean=False)


#: characters pysbd reads at once: its time grows with the square of the sentences it is given
#: ("a. " × 3,000 took 1.4 s, × 30,000 two minutes), so long text is given in pieces cut after a
#: sentence end (:func:`_pieces`)
PIECE_CHARS = 2000
_PIECE_END = re.compile(r"[.!?。！？；;\n]\s*")


def _pieces(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of pieces of at most :data:`PIECE_CHARS` characters covering ``text``, each
    cut after the last sentence end in it, else after its last white space, else anywhere."""
    start = 0
    while start < len(text):
        end = min(len(text), start + PIECE_CHARS)
        if end < len(text):
            window = text[start:end]
            ends = [m.end() for m in _PIECE_END.finditer(window)] or [i + 1 for i, ch in enumerate(window) if ch.isspace()]
            end = start + (ends[-1] if ends and ends[-1] < len(window) else len(window))
        yield start, end
        start = end


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of the sentences of ``text``, covering it end to end (the
    whitespace after a sentence belongs to it), found by pysbd's rules (Sadvilkar and Neumann
    2020, "PySBD: Pragmatic Sentence Boundary Disambiguation"; English rules, Chinese ones for
    text with CJK characters): sentence-final punctuation not in an abbreviation or a number, and
    line breaks. Text longer than :data:`PIECE_CHARS` is read in pieces (a sentence longer than
    that is cut at a white space). A piece whose sentences pysbd returns altered beyond white
    space is one sentence."""
    starts = [0]
    segmenter = _segmenter("zh" if has_cjk(text) else "en")
    for a, b in _pieces(text):
        piece, pos, found = text[a:b], 0, []
        for segment in segmenter.segment(piece):
            core = segment.strip()
            if not core:
                continue
            at = piece.find(core, pos)
            if at < 0 or piece[pos:at].strip():  # pysbd changed more than white space
                found = []
                break
            found.append(a + at)
            pos = at + len(core)
        starts += [x for x in (found or [a]) if x > starts[-1]]
    return [(x, y) for x, y in zip(starts, [*starts[1:], len(text)])] if text else []


def entities_lost(clean: dict[int, Sequence[tuple]], attacked: Sequence[tuple[int, Sequence[tuple]]]) -> float:
    """Share of the spans predicted on an original row (``clean``: row -> spans) that the
    prediction on its injected copy (``attacked``: (original row, spans)) lacks, as
    ``allinone eval --inject-set`` counts them; 0.0 when the originals have none."""
    found = lost = 0
    for row, spans in attacked:
        before = set(map(tuple, clean[row]))
        found += len(before)
        lost += len(before - set(map(tuple, spans)))
    return round(lost / found, 4) if found else 0.0


def head_features(states: np.ndarray) -> np.ndarray:
    """(L, n, D) states of n tokens at L layers -> (n, L * D): the layers side by side."""
    return np.hstack([np.asarray(s, dtype=np.float32) for s in states])


def widen(states: np.ndarray, rows: int) -> np.ndarray:
    """``states`` with ``rows`` layer rows, as a head that reads that many expects: the first
    ``rows`` of more, or one block repeated (a window without CJK has no second block: its
    text is tokenized the same both ways, so its own states are its natural ones)."""
    if states.shape[0] >= rows:
        return states[:rows]
    return np.concatenate([states] * (rows // states.shape[0]))


def candidate_layers(n_layer: int) -> tuple[int, ...]:
    """Layers a tagger fit compares (fractions of the depth; see docs/evaluation.md)."""
    return tuple(sorted({max(1, round(d * n_layer)) for d in (0.5, 0.67, 0.83)}))


def default_variants(split_chars: bool) -> tuple[str, ...]:
    """The prompt variants a fit compares by default: one, since featurizing each costs as much
    again. ``echo``, since the text read once lost at every layer on the NER pools (held-out F1
    at layers 12/16/20: echo 0.670/0.701/0.687, raw 0.640/0.628/0.580); with CJK text read one
    character per token, ``echo+natural`` (on 1,000 MSRA pool sentences, 200 held out, layers 12
    + 16 + 20: 0.760, against 0.600 for echo with both copies split; docs/evaluation.md). For
    text without CJK the two are the same prompt."""
    return ("echo+natural",) if split_chars else ("echo",)


def featurize_spans(texts: Sequence[str], *, run: Callable[[list[Any]], list[Any]], variant: str,
                    layers: Sequence[int], split_chars: bool,
                    progress: Callable[[int], None] = lambda done: None) -> list[tuple[np.ndarray, list, str]]:
    """Per text: (float16 states (blocks x len(layers), n, D) of its n tokens, see
    :func:`tagger_states`; their character offsets; the text as the model saw it), from the
    encode jobs of its first window (:func:`tagger_jobs`), 16 texts a round."""
    out = []
    for start in range(0, len(texts), 16):
        per_text = [tagger_jobs(variant, t, layers, split_chars=split_chars) for t in texts[start:start + 16]]
        results = iter(run([job for jobs in per_text for job in jobs]))
        for jobs in per_text:
            outs = [next(results) for _ in jobs]
            out.append((tagger_states(variant, outs).astype(np.float16), list(outs[0].offsets),
                        outs[0].info.text or ""))
        progress(len(per_text))
    return out


def fit_spans(data: "TrainingData", types: Sequence[str], *, run: Callable[[list[Any]], list[Any]],
              n_layer: int, variants: Sequence[str] | None = None, split_chars: bool = False,
              c: float = 0.05, holdout: float = 0.2, augment: bool = True,
              progress: Callable[[int, int], None] = lambda d, t: None,
              seed: int = 0) -> tuple[Tagger, dict[str, Any]]:
    """Fit a tagger: featurize the rows with every prompt variant (:func:`featurize_spans`), then
    choose and fit with :func:`select_tagger`. With ``augment``, copies of 30% of the rows with
    an instruction appended (:func:`~allinone.learn.augment.injected_span_copies`), keeping
    their spans, are featurized and trained on too."""
    from ...learn.augment import injected_span_copies

    layers = candidate_layers(n_layer)
    variants = default_variants(split_chars) if variants is None else variants
    copies = injected_span_copies(data.texts, types, seed=seed) if augment else []
    texts = [*data.texts, *(text for _, text in copies)]
    spans = [*data.spans, *(data.spans[i] for i, _ in copies)]
    groups = [*range(len(data.texts)), *(i for i, _ in copies)]
    total = len(texts) * len(variants)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    features = {v: featurize_spans(texts, run=run, variant=v, layers=layers, split_chars=split_chars,
                                   progress=tick) for v in variants}
    return select_tagger(features, spans, types, layers, split_chars=split_chars, c=c, holdout=holdout,
                         groups=groups, seed=seed)


def select_tagger(features: dict[str, list[tuple[np.ndarray, list, str]]], spans: Sequence[Sequence[tuple]],
                  types: Sequence[str], layers: Sequence[int], *, split_chars: bool, c: float = 0.05,
                  holdout: float = 0.2, groups: Sequence[int] | None = None,
                  seed: int = 0) -> tuple[Tagger, dict[str, Any]]:
    """Choose a tagger by exact-span F1 on a held-out share of the rows (heads fit on the rest),
    then fit the choice on every row.

    The candidates: every prompt variant of ``features`` with the states of each of ``layers``
    alone and of all of them side by side (on the CoNLL pool the three layers together beat the
    best one alone by 0.03 F1; a token's neighbours' states and learned tag transitions in the
    decode did not help: docs/evaluation.md), each with one head for all rows and, when at least
    :data:`MIN_LANG_ROWS` rows of two or more languages are fit, with one head per language.

    Args:
        features: per prompt variant, :func:`featurize_spans` of every row.
        spans: every row's gold (start, end, type) spans.
        layers: the layers the features hold, in their order.
        groups: per row, the index of the row it is a copy of (an injected copy,
            :func:`~allinone.learn.augment.injected_span_copies`), its own index for an original;
            ``None``: every row is an original. A copy is held out with its original and only
            trained on (never scored as a row); held-out copies give ``entities_lost``.

    Returns:
        (the tagger, the report: held-out precision/recall/F1 of every candidate, overall and
        per language, the share of entities found on a held-out original that its held-out
        copies lose (``entities_lost``, when there are copies), and the choice).
    """
    from ...learn.tagging import span_scores

    tags = tuple(bio_tags(types))
    n = len(spans)
    group = np.arange(n) if groups is None else np.asarray(groups)
    originals = np.flatnonzero(group == np.arange(n))
    rng = np.random.default_rng(seed)
    held_original = np.zeros(n, dtype=bool)
    held_original[originals[rng.permutation(len(originals))[: max(1, int(holdout * len(originals)))]]] = True
    held = held_original[group]  # a copy goes with its original
    held_copies = np.flatnonzero(held & (group != np.arange(n)))
    report: dict[str, Any] = {"rows": len(originals), "injected_copies": n - len(originals),
                              "held_out": int(held_original.sum()), "c": c, "split_chars": split_chars}
    index = {layer: k for k, layer in enumerate(layers)}
    gold = {v: [token_tags(text, off, s, tags) for (_, off, text), s in zip(feats, spans)]
            for v, feats in features.items()}
    # every variant holds the same texts; the language of a row is that of its text as the model
    # saw it, a copy's that of its original (an English sentence with a Chinese instruction
    # appended is English text to learn from)
    lang = np.array([detect_lang(text) for _, _, text in next(iter(features.values()))])[group]
    fit_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held_original)
    langs = sorted(set(lang.tolist()))
    split_langs = len(langs) > 1 and all((lang[fit_rows] == g).sum() >= MIN_LANG_ROWS for g in langs)

    def states(variant: str, i: int, read: tuple[int, ...]) -> np.ndarray:
        held = features[variant][i][0]  # blocks of len(layers) rows (see tagger_states)
        blocks = held.shape[0] // len(layers)
        return held[[index[r] + k * len(layers) for k in range(blocks) for r in read]]

    def head(variant: str, read: tuple[int, ...], rows: np.ndarray) -> LinearHead:
        width = max(states(variant, i, read).shape[0] for i in rows)  # layer rows: one block or two
        x = np.vstack([head_features(widen(states(variant, i, read), width)) for i in rows])
        y = np.concatenate([gold[variant][i] for i in rows])
        return fit_linear(x, [tags[i] for i in y], tags, c=c, balanced=False)

    def fit(variant: str, read: tuple[int, ...], by_lang: bool, rows: np.ndarray) -> Tagger:
        heads = ({g: head(variant, read, rows[lang[rows] == g]) for g in langs} if by_lang
                 else {ALL: head(variant, read, rows)})
        return Tagger(variant, read, split_chars, tags, heads)

    def name(read: tuple[int, ...], by_lang: bool) -> str:
        return "+".join(map(str, read)) + (" per language" if by_lang else "")

    reads = [(x,) for x in layers] + ([tuple(layers)] if len(layers) > 1 else [])
    best: tuple[float, str, tuple[int, ...], bool] | None = None
    for variant, feats in features.items():
        by_layer = {}
        for read in reads:
            for by_lang in (False, True) if split_langs else (False,):
                tagger = fit(variant, read, by_lang, fit_rows)
                pred = [tagger.decode(feats[i][2], states(variant, i, read), feats[i][1]) for i in held_rows]
                gold_spans = [spans[i] for i in held_rows]
                scores = span_scores(gold_spans, pred)
                if len(held_copies):
                    scores["entities_lost"] = entities_lost(
                        dict(zip(held_rows, pred)),
                        [(int(group[k]), tagger.decode(feats[k][2], states(variant, k, read), feats[k][1]))
                         for k in held_copies])
                if len(langs) > 1:
                    scores["f1_by_language"] = {
                        g: span_scores([s for s, k in zip(gold_spans, held_rows) if lang[k] == g],
                                       [p for p, k in zip(pred, held_rows) if lang[k] == g])["f1"] for g in langs}
                by_layer[name(read, by_lang)] = scores
                if best is None or scores["f1"] > best[0]:
                    best = (scores["f1"], variant, read, by_lang)
        oracle = span_scores([spans[i] for i in originals],
                             [spans_from_tags(feats[i][2], feats[i][1], gold[variant][i], tags) for i in originals])["f1"]
        report[variant] = {"by_layer": by_layer, "token_alignment_f1": oracle}
    _, variant, read, by_lang = best
    tagger = fit(variant, read, by_lang, np.arange(n))
    report["chosen"] = {"prompt": variant, "layers": list(read), "heads": sorted(tagger.heads),
                        **report[variant]["by_layer"][name(read, by_lang)]}
    return tagger, report
