"""Task heads over the trunk's final normed hidden states: scores, and the answer span of extractive
question answering.

The heads are transformers' ``Qwen2For{Sequence,Token}Classification`` and ``Qwen2ForQuestionAnswering``
(docs/task-heads.md): one linear layer ``cls.output`` applied to the last token's state (sequence
classification, which under causal attention has seen the whole text), to every token's state (token
classification), or to every token's state giving two logits, where the answer starts and where it ends
(question answering).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwenlite.backends.base import Backend
from qwenlite.model.weights import Linear

# transformers' question-answering pipeline defaults: at most 15 tokens in an answer.
MAX_ANSWER_TOKENS = 15


def scores(backend: Backend, head: Linear, states: np.ndarray) -> np.ndarray:
    """The head's logits ``float32 [n, n_labels]`` of hidden states ``[n, n_embd]``."""
    return backend.linear(head, np.ascontiguousarray(states, dtype=np.float32))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax along the last axis, in float64 then float32 (probabilities the CLI shows)."""
    z = np.asarray(x, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def best_span(start: np.ndarray, end: np.ndarray, max_tokens: int = MAX_ANSWER_TOKENS) -> tuple[int, int, float]:
    """The span ``(s, e)`` (inclusive token indices, ``s <= e < s + max_tokens``) maximizing
    ``p_start[s] * p_end[e]``, with the probabilities the softmax of each logit vector over the
    candidate tokens (the context), and that product: the score of transformers' QA pipeline."""
    ps, pe = softmax(start).astype(np.float64), softmax(end).astype(np.float64)
    n = ps.shape[0]
    pair = np.outer(ps, pe)
    allowed = np.triu(np.ones((n, n), bool)) & ~np.triu(np.ones((n, n), bool), k=max_tokens)
    pair = np.where(allowed, pair, -1.0)
    s, e = np.unravel_index(int(np.argmax(pair)), pair.shape)
    return int(s), int(e), float(pair[s, e])


def char_span(pieces: Sequence[bytes], s: int, e: int) -> tuple[int, int]:
    """Character offsets ``[start, end)`` in the text spelled by the token byte strings ``pieces`` that
    cover tokens ``s..e``; a token boundary inside a multi-byte character widens to the whole character."""
    raw = b"".join(pieces)
    b0 = sum(len(p) for p in pieces[:s])
    b1 = b0 + sum(len(p) for p in pieces[s : e + 1])

    def starts_before(off: int) -> int:  # characters that begin before byte ``off``
        return sum(1 for x in raw[:off] if x & 0xC0 != 0x80)

    inside = b0 < len(raw) and raw[b0] & 0xC0 == 0x80
    return starts_before(b0) - int(inside), starts_before(b1)
