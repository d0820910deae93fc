"""Embeddings: token lists through an engine's trunk, pooled.

One function serves ``Model.embed`` (over the model's own slots) and the server's ``/v1/embeddings``
(over an engine of its own, run inside the scheduler's thread between decode steps, so the slots of
streaming requests are never touched).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwenlite.runtime.engine import Engine

POOLINGS = ("mean", "last", "cls", "none")
# llama.cpp's <arch>.pooling_type enum. 4 (rank) is its classifier's: the head on the last token under
# causal attention, so a sequence classifier's embedding pools the last token too.
POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "last"}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1)).astype(np.float32)


def embed_lists(engine: Engine, lists: Sequence[Sequence[int]], pooling: str,
                normalize: bool) -> np.ndarray | list[np.ndarray]:
    """Final normed hidden states of each token list, each in a fresh context, ``engine.n_seq`` lists
    per shared forward pass, pooled ("mean", "last", "cls") into ``[len(lists), n_embd]`` or, for
    "none", a list of ``[n_tokens, n_embd]``. Clears every slot of ``engine`` before and after."""
    states: list[np.ndarray] = []
    try:
        for w in range(0, len(lists), engine.n_seq):
            wave = lists[w : w + engine.n_seq]
            engine.clear()
            ids = [t for ids in wave for t in ids]
            seq = [s for s, ids in enumerate(wave) for _ in ids]
            rows = engine.decode(ids, seq, logits=np.ones(len(ids), bool), hidden=True)
            states.extend(np.split(rows, np.cumsum([len(ids) for ids in wave])[:-1]))
    finally:
        engine.clear()
    if pooling == "none":
        return [unit(h) if normalize else h for h in states]
    pooled = np.stack([h.mean(axis=0, dtype=np.float64).astype(np.float32) if pooling == "mean"
                       else h[-1] if pooling == "last" else h[0] for h in states])
    return unit(pooled) if normalize else pooled
