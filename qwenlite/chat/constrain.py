"""Constrained decoding: JSON schemas, grammars and regexes turned into per-token masks by llguidance.

llguidance (the engine llama.cpp uses; a Rust wheel with no torch dependency) compiles a JSON schema, a
Lark or GBNF grammar or a regex against our own vocabulary and, at each step, computes the set of
tokens that keep the output inside the language in about 0.1-0.3 ms for Qwen's 152k tokens (measured
in BENCHMARKS.md, "constrained decoding"). Writing our own JSON-schema-to-grammar compiler was the
alternative; llguidance is made for the job, covers far more of JSON Schema, and is fast.

A ``Grammar`` is compiled once and can be shared; each sequence gets its own ``Constraint`` (the
matcher's state), so batched sequences each follow their own grammar. The mask is applied to the logits
before the sampler's chain, so at temperature 0 the result is the argmax among allowed tokens, and the
end-of-turn tokens are allowed exactly when the grammar accepts what was generated.

The vocabulary is handed to llguidance as tiktoken ranks plus the special tokens (control and
user-defined), which makes ``<tool_call>`` a token that free text can never contain but a grammar can
name (``<tool_call>`` or ``<[151657]>`` in Lark).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenlite.errors import QwenliteError

# JSON whitespace between tokens: flexible (models pretty-print), but bounded, so that a small model
# cannot spend its whole budget on newlines, the classic failure of unbounded JSON grammars.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,48}"}

def _first_line(message: str) -> str:
    lines = message.strip().splitlines()
    return lines[0] if lines else "unknown error"


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _llg() -> Any:
    try:
        import llguidance
    except ImportError:
        raise QwenliteError("constrained output (JSON schema, grammar, tool calls) needs llguidance: "
                            "pip install 'qwenlite[constrained]'") from None
    return llguidance


def ll_tokenizer(tokenizer: Any) -> Any:
    """llguidance's view of our vocabulary, built once per tokenizer (about 0.6 s for Qwen's)."""
    cached = _TOKENIZERS.get(tokenizer)
    if cached is None:
        llg = _llg()
        vocab = tokenizer.vocab
        cached = llg.LLTokenizer.from_tiktoken(
            encoder=vocab.ranks, special_tokens={**vocab.control, **vocab.user_defined}, pattern=vocab.pattern,
            eos_token=sorted(tokenizer.eot_ids), n_vocab=tokenizer.n_vocab)
        _TOKENIZERS[tokenizer] = cached
    return cached


class Grammar:
    """A compiled constraint for one vocabulary. Construct with ``json_schema``, ``grammar`` or ``regex``."""

    def __init__(self, tokenizer: Any, spec: str, what: str) -> None:
        llg = _llg()
        self.tokenizer = tokenizer
        self.what = what
        self._ll = ll_tokenizer(tokenizer)
        error = llg.LLMatcher.validate_grammar(spec, self._ll)
        if error:
            raise QwenliteError(f"{what} cannot be compiled: {_first_line(error)}")
        self.spec = spec
        # A grammar can compile and still match nothing (``start: start``); that shows at the first
        # mask, which is computed here, so the caller hears it before any generation starts.
        probe = llg.LLMatcher(self._ll, spec, log_level=0)
        probe.compute_bitmask()
        if probe.is_error():
            raise QwenliteError(f"{what} cannot be compiled: it allows no output at all "
                                f"({_first_line(probe.get_error())})")

    @classmethod
    def json_schema(cls, tokenizer: Any, schema: Mapping[str, Any] | bool | None = None,
                    what: str = "the JSON schema") -> Grammar:
        """Output that parses as JSON and validates against ``schema`` (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, Mapping | bool):
            raise QwenliteError(f"{what} must be a JSON object (a schema), got {type(schema).__name__}")
        try:
            spec = _llg().LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS)
        except (TypeError, ValueError) as exc:
            raise QwenliteError(f"{what} cannot be compiled: {exc}") from None
        return cls(tokenizer, spec, what)

    @classmethod
    def grammar(cls, tokenizer: Any, text: str, what: str = "the grammar") -> Grammar:
        """A Lark grammar (llguidance's syntax) or a GBNF grammar (llama.cpp's ``--grammar`` files)."""
        if not isinstance(text, str) or not text.strip():
            raise QwenliteError(f"{what} is empty")
        try:
            spec = _llg().grammar_from("grammar", text)
        except ValueError as exc:
            raise QwenliteError(f"{what} cannot be compiled: {exc}") from None
        return cls(tokenizer, spec, what)

    @classmethod
    def regex(cls, tokenizer: Any, pattern: str, what: str = "the regex") -> Grammar:
        """Output that matches ``pattern`` (Rust regex syntax) as a whole."""
        if not isinstance(pattern, str):
            raise QwenliteError(f"{what} must be a string")
        return cls(tokenizer, _llg().LLMatcher.grammar_from_regex(pattern), what)

    def start(self) -> Constraint:
        """A fresh matcher for one sequence."""
        return Constraint(self)


class Constraint:
    """One sequence's position in a ``Grammar``: ``mask()`` before sampling, ``accept(tok)`` after."""

    def __init__(self, grammar: Grammar) -> None:
        llg = _llg()
        self.grammar = grammar
        self._m = llg.LLMatcher(grammar._ll, grammar.spec, log_level=0)
        if self._m.is_error():
            raise QwenliteError(f"{grammar.what} cannot be compiled: {_first_line(self._m.get_error())}")
        self.n_vocab = grammar.tokenizer.n_vocab
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    def mask(self) -> np.ndarray:
        """Bool ``[n_vocab]``: the tokens allowed next."""
        self._check()
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        return np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with the disallowed tokens at -inf."""
        mask = self.mask()
        n = min(len(mask), logits.shape[-1])
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        out[:n] = np.where(mask[:n], logits[:n], -np.inf)
        return out

    def accept(self, tok: int) -> None:
        """Advance past the sampled token (which the mask allowed)."""
        if not self._m.consume_token(int(tok)):
            self._check()
            raise QwenliteError(f"{self.grammar.what}: token {tok} was not allowed")

    @property
    def accepting(self) -> bool:
        """Whether what was generated so far is a complete sentence of the grammar."""
        return bool(self._m.is_accepting())

    def _check(self) -> None:
        if self._m.is_error():
            raise QwenliteError(f"{self.grammar.what}: the constraint failed: {_first_line(self._m.get_error())}")
