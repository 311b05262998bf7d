"""JSON-schema-constrained decoding with llguidance, shared by both backends.

llguidance (guidance-ai, MIT; the engine behind llama.cpp's ``--llguidance`` option and vLLM's
structured outputs) compiles a JSON schema to a grammar and, at each step, gives the set of
tokens that keep the output a prefix of a valid document, in well under a millisecond for a
150k vocabulary. The backend masks every other token's logit before sampling, and feeds the
sampled token back to the matcher.

JSON is laid out as ``json.dumps`` does by default (``", "`` and ``": "``, no other
whitespace): the layout the model has seen most, and the one the task prompts' examples use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import InvalidInputError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class JsonConstrainer:
    """Makes matchers for JSON schemas over one tokenizer; grammars are cached by schema.

    Args:
        make_tokenizer: builds the ``llguidance.LLTokenizer`` (called once, on first use:
            about 1-2 s for a 150k vocabulary).
    """

    def __init__(self, make_tokenizer: Callable[[], Any]) -> None:
        self._make_tokenizer = make_tokenizer
        self._tokenizer = None
        self._grammars: dict[str, str] = {}

    def matcher(self, schema: dict[str, Any]):
        """A fresh ``LLMatcher`` for ``schema``.

        Raises:
            InvalidInputError: the schema cannot be compiled.
        """
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(key, defaults=JSON_OPTIONS)
            if len(self._grammars) >= 32:
                self._grammars.pop(next(iter(self._grammars)))
            self._grammars[key] = grammar
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidInputError(f"cannot turn this JSON schema into a grammar: {matcher.get_error()}")
        return matcher


def allowed_tokens(matcher, n_vocab: int) -> np.ndarray:
    """Boolean array (n_vocab,): the tokens the matcher allows next (ids past its vocabulary: no).

    Raises:
        RuntimeError: nothing is allowed (the matcher is in an error state).
    """
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    allowed = np.zeros(n_vocab, dtype=bool)
    n = min(n_vocab, len(bits))
    allowed[:n] = bits[:n].astype(bool)
    if not allowed.any():  # pragma: no cover - a working matcher always allows a token or an end
        raise RuntimeError(f"constrained decoding reached a dead end: {matcher.get_error()}")
    return allowed
