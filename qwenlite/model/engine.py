"""The evaluation engine: a model plus its KV cache and position, the interface generation runs on."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.model.qwen2 import KVCache, Qwen2

PREFILL_BATCH = 256


class Engine:
    """``eval(ids)`` appends tokens to the cache and returns the last token's logits."""

    def __init__(self, model: Qwen2, n_ctx: int) -> None:
        self.model = model
        self.n_ctx = n_ctx
        self.cache = KVCache.empty(model.cfg, n_ctx)
        self.n_past = 0

    def reset(self) -> None:
        self.n_past = 0

    def truncate(self, n_keep: int) -> None:
        """Forget everything after the first ``n_keep`` tokens (a chat reusing its common prefix)."""
        self.n_past = max(0, min(n_keep, self.n_past))

    def _ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise QwenliteError("no tokens to evaluate")
        if arr.min() < 0 or arr.max() >= self.model.cfg.n_vocab:
            raise QwenliteError(f"token id out of range 0..{self.model.cfg.n_vocab - 1}")
        if self.n_past + arr.size > self.n_ctx:
            raise QwenliteError(
                f"{self.n_past + arr.size} tokens do not fit the context of {self.n_ctx} tokens"
            )
        return arr

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [n_vocab]`` after the last of ``ids``."""
        return self._run(self._ids(ids), all_logits=False)[-1]

    def eval_all(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [len(ids), n_vocab]`` at every position of ``ids``."""
        return self._run(self._ids(ids), all_logits=True)

    def _run(self, arr: np.ndarray, all_logits: bool) -> np.ndarray:
        outs = []
        for lo in range(0, arr.size, PREFILL_BATCH):
            chunk = arr[lo : lo + PREFILL_BATCH]
            last = lo + PREFILL_BATCH >= arr.size
            if all_logits or last:
                outs.append(self.model.forward(chunk, self.cache, self.n_past, all_logits=all_logits))
            else:
                self.model.forward(chunk, self.cache, self.n_past, all_logits=False)
            self.n_past += chunk.size
        return np.concatenate(outs) if len(outs) > 1 else outs[0]
