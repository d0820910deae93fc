"""The evaluation engine: a model, its multi-sequence KV cache, and batches of tokens run over them.

``decode(tokens, seq)`` appends ``tokens[t]`` to sequence ``seq[t]`` for every t at once (llama.cpp's
``llama_decode`` of one batch): prompts of several sequences, or one new token of each of N decoding
sequences, go through the weights together. Positions follow each sequence's length; a batch longer
than ``n_batch`` tokens runs as several forward passes (ubatches) of at most that many, and
``cancel()`` from any thread stops it between two of them.

Determinism: every kernel works on each token's row by itself with the same code for any batch size
and thread count, and attention reads only the token's own sequence, so a sequence's logits are
bit-for-bit the same alone or batched with others, on 1 or 2 threads, and for any split of its prompt
into ubatches (``tests/test_batch.py`` checks it on the real model).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from qwenlite.errors import CancelledError, QwenliteError
from qwenlite.model.qwen2 import Qwen2
from qwenlite.runtime.kvcache import KVCache

# Tokens per forward pass of a long batch: big enough that prefill reads each weight once per 256
# tokens, small enough that the activations of a pass (T x n_ff floats) stay a few MB.
DEFAULT_N_BATCH = 256


class Engine:
    """A model plus a KV cache of ``n_seq`` sequence slots of ``n_ctx`` positions each."""

    def __init__(self, model: Qwen2, n_ctx: int, n_seq: int = 1, kv_type: str | None = None,
                 n_batch: int = DEFAULT_N_BATCH) -> None:
        cfg = model.cfg
        if n_batch < 1:
            raise QwenliteError(f"batch size must be >= 1, got {n_batch}")
        self.model = model
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_vocab = cfg.n_vocab
        self.cache = KVCache(model.backend, cfg.n_layer, cfg.n_head_kv, cfg.head_dim, n_seq, n_ctx, kv_type,
                             k_bias=model.k_bias(), rope=(model.cos, model.sin))
        self._cancel = threading.Event()
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]

    def tokens(self, seq: int) -> list[int]:
        """The token ids whose keys and values sequence ``seq`` holds, in order (a copy)."""
        self.cache.length(seq)
        return list(self._tokens[seq])

    def truncate(self, seq: int, n_keep: int) -> None:
        """Keep the first ``n_keep`` positions of ``seq``."""
        self.cache.truncate(seq, n_keep)
        del self._tokens[seq][self.cache.length(seq):]

    def clear(self, seq: int | None = None) -> None:
        """Forget one sequence, or all of them."""
        self.cache.clear(seq)
        for s in range(self.n_seq) if seq is None else (seq,):
            self._tokens[s].clear()

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` start with the first ``n`` positions of ``src`` (evaluated once, used twice)."""
        self.cache.copy_prefix(src, dst, n)
        self._tokens[dst] = self._tokens[src][:n]

    def cancel(self) -> None:
        """Ask the running ``decode`` (from any thread) to stop before its next forward pass."""
        self._cancel.set()

    def length(self, seq: int) -> int:
        return self.cache.length(seq)

    def _check(self, tokens: Sequence[int], seq: Sequence[int] | int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise QwenliteError("no tokens to evaluate")
        seqs = np.full(ids.size, seq, np.int64) if np.isscalar(seq) else np.asarray(seq, np.int64).reshape(-1)
        if seqs.size != ids.size:
            raise QwenliteError(f"{ids.size} tokens but {seqs.size} sequence ids")
        if seqs.min() < 0 or seqs.max() >= self.n_seq:
            raise QwenliteError(f"sequence id out of range: the cache has {self.n_seq} slots (0..{self.n_seq - 1})")
        bad = np.flatnonzero((ids < 0) | (ids >= self.n_vocab))
        if bad.size:
            raise QwenliteError(f"token id {int(ids[bad[0]])} out of range 0..{self.n_vocab - 1}")
        # Position of each token: its sequence's length plus the tokens of that sequence before it.
        pos = np.empty_like(ids)
        nxt = self.cache.lengths.copy()
        for t, s in enumerate(seqs):
            pos[t] = nxt[s]
            nxt[s] += 1
        over = np.flatnonzero(nxt > self.n_ctx)
        if over.size:
            s = int(over[0])
            raise QwenliteError(f"sequence {s}: {int(nxt[s])} tokens do not fit its context of {self.n_ctx} tokens")
        return ids, seqs, pos

    def decode(self, tokens: Sequence[int], seq: Sequence[int] | int = 0,
               logits: Sequence[bool] | np.ndarray | None = None, pos: Sequence[int] | None = None,
               hidden: bool = False) -> np.ndarray:
        """Append ``tokens[t]`` to sequence ``seq[t]``; logits ``float32 [n, n_vocab]`` of the rows where
        ``logits`` is true (default: the last token of each sequence in the batch), in batch order
        (with ``hidden``: their final normed hidden states ``[n, n_embd]``).

        ``pos``, when given, must be the positions the tokens take (each sequence's next ones); the
        check makes a caller's bookkeeping error one clear message instead of a corrupt cache. Checks
        run before anything is computed; a ``cancel()`` or KeyboardInterrupt between forward passes
        leaves the cache holding exactly the passes that completed.
        """
        ids, seqs, positions = self._check(tokens, seq)
        if pos is not None:
            given = np.asarray(pos, np.int64).reshape(-1)
            if given.shape != positions.shape or np.any(given != positions):
                raise QwenliteError("positions must continue each sequence: sequence s takes positions "
                                    "length(s), length(s)+1, ... in batch order")
        if logits is None:
            want = np.zeros(ids.size, bool)
            _, last = np.unique(seqs[::-1], return_index=True)
            want[ids.size - 1 - last] = True
        else:
            want = np.asarray(logits, bool).reshape(-1)
            if want.shape != ids.shape:
                raise QwenliteError(f"logits mask has {want.size} entries for {ids.size} tokens")
        self._cancel.clear()
        outs = []
        for lo in range(0, ids.size, self.n_batch):
            if lo and self._cancel.is_set():
                raise CancelledError("evaluation cancelled")
            sl = slice(lo, lo + self.n_batch)
            rows = np.flatnonzero(want[sl])
            out = self.model.forward(ids[sl], positions[sl], seqs[sl], rows, self.cache, hidden)
            self.cache.commit(seqs[sl], positions[sl])
            for t, s in zip(ids[sl].tolist(), seqs[sl].tolist()):
                self._tokens[s].append(t)
            if rows.size:
                outs.append(out)
        if not outs:
            return np.empty((0, self.model.cfg.n_embd if hidden else self.n_vocab), np.float32)
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def sequence(self, seq: int = 0) -> SequenceView:
        return SequenceView(self, seq)


class SequenceView:
    """One sequence of an engine with the single-sequence interface generation runs on."""

    def __init__(self, engine: Engine, seq: int) -> None:
        engine.cache.length(seq)  # checks the slot exists
        self.engine = engine
        self.seq = seq

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_past(self) -> int:
        return self.engine.cache.length(self.seq)

    @property
    def tokens(self) -> list[int]:
        return self.engine.tokens(self.seq)

    def reset(self) -> None:
        self.engine.clear(self.seq)

    def truncate(self, n_keep: int) -> None:
        """Forget everything after the first ``n_keep`` tokens (reusing a common prefix)."""
        self.engine.truncate(self.seq, n_keep)

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [n_vocab]`` after the last of ``ids``."""
        return self.engine.decode(ids, self.seq)[-1]

    def eval_all(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [len(ids), n_vocab]`` at every position of ``ids``."""
        n = len(ids)
        return self.engine.decode(ids, self.seq, logits=np.ones(n, bool))
