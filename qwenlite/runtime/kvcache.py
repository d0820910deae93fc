"""The KV cache: ``n_seq`` sequence slots of ``n_ctx`` positions each, in one of three element types.

The runtime owns the logical cache (which slot holds how many positions, truncation, prefix copies,
the checks); the backend owns the storage and the kernels that write and read it (``Backend.kv_*``),
so a second backend brings its own memory (a GPU's) without changing this class or the model.

Positions are appended in order: a sequence of length n takes its next token at position n. Slots are
independent: attention of a token in slot s reads only slot s, positions 0..its own.

Element types (``KV_TYPES``, llama.cpp's ``-ctk``/``-ctv`` names): ``f32``, ``f16`` (the default) and
``q8_0`` (keys stored without their bias, see ``kernels.kv``). Measured on the real
0.5B model against transformers (``tests/test_model_vs_hf.py``, 317 positions): see BENCHMARKS.md,
"KV cache"; f16 is the default because it matches f32's accuracy at half the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from qwenlite.errors import QwenliteError

if TYPE_CHECKING:
    from qwenlite.backends.base import Backend


@dataclass(frozen=True)
class KVType:
    """An element type of the cache: its name and its storage cost."""

    name: str
    bytes_per_block: int  # bytes for ``block`` values of one head
    block: int

    def nbytes(self, n_values: int) -> int:
        return n_values // self.block * self.bytes_per_block


KV_TYPES: dict[str, KVType] = {
    "f32": KVType("f32", 4, 1),
    "f16": KVType("f16", 2, 1),
    "q8_0": KVType("q8_0", 34, 32),
}
DEFAULT_KV_TYPE = "f16"


def kv_type(name: str | None) -> KVType:
    """The KV type called ``name`` (case-insensitive; None gives the default), or one clear error."""
    key = (name or DEFAULT_KV_TYPE).strip().lower()
    if key not in KV_TYPES:
        raise QwenliteError(f"unknown KV cache type {name!r}: choose one of {', '.join(KV_TYPES)}")
    return KV_TYPES[key]


class KVCache:
    """Keys and values of ``n_seq`` sequences, ``n_ctx`` positions each, for every layer."""

    def __init__(self, backend: Backend, n_layer: int, n_head_kv: int, head_dim: int, n_seq: int, n_ctx: int,
                 kind: str | None = None, k_bias: np.ndarray | None = None,
                 rope: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``k_bias [n_layer, n_kv*hd]`` and the RoPE tables ``rope = (cos, sin)`` let a quantized cache
        store keys without their (large) bias and add its share of each score exactly (``kernels.kv``)."""
        self.type = kv_type(kind)
        if n_seq < 1:
            raise QwenliteError(f"the cache needs at least one sequence slot, got {n_seq}")
        if n_ctx < 1:
            raise QwenliteError(f"context size must be >= 1, got {n_ctx}")
        if head_dim % self.type.block:
            raise QwenliteError(f"KV type {self.type.name} needs a head size divisible by {self.type.block}, "
                                f"this model's is {head_dim}")
        self.backend = backend
        self.n_layer, self.n_head_kv, self.head_dim = n_layer, n_head_kv, head_dim
        self.n_seq, self.n_ctx = n_seq, n_ctx
        self.lengths = np.zeros(n_seq, np.int64)
        if k_bias is None:
            k_bias = np.zeros((n_layer, n_head_kv * head_dim), np.float32)
        if rope is None:
            rope = (np.ones((n_ctx, head_dim // 2), np.float32), np.zeros((n_ctx, head_dim // 2), np.float32))
        self.storage = backend.kv_alloc(self.type.name, n_layer, n_seq, n_head_kv, n_ctx, head_dim,
                                        k_bias=np.ascontiguousarray(k_bias, np.float32), rope=rope)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V that one position of one sequence takes, over all layers."""
        return 2 * self.n_layer * self.n_head_kv * self.type.nbytes(self.head_dim)

    def length(self, seq: int) -> int:
        return int(self.lengths[self._slot(seq)])

    def _slot(self, seq: int) -> int:
        if not 0 <= seq < self.n_seq:
            raise QwenliteError(
                f"sequence {seq} does not exist: the cache has {self.n_seq} slots (0..{self.n_seq - 1})")
        return seq

    def store(self, layer: int, k: np.ndarray, v: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> None:
        """Keys and values ``[T, n_kv*hd]`` of layer ``layer`` at (seq[t], pos[t]); lengths move in ``commit``."""
        self.backend.kv_store(self.storage, layer, k, v, seq, pos)

    def attend(self, layer: int, q: np.ndarray, seq: np.ndarray, pos: np.ndarray, n_head: int) -> np.ndarray:
        """Causal attention of queries ``q [T, n_head*hd]``: token t over its sequence's positions 0..pos[t]."""
        return self.backend.kv_attend(self.storage, layer, q, seq, pos, n_head)

    def commit(self, seq: np.ndarray, pos: np.ndarray) -> None:
        """Record that the positions of a finished forward pass are filled."""
        np.maximum.at(self.lengths, seq, pos + 1)

    def truncate(self, seq: int, n: int) -> None:
        """Keep the first ``n`` positions of ``seq`` (a prefix to reuse); later ones are forgotten."""
        s = self._slot(seq)
        self.lengths[s] = max(0, min(int(n), int(self.lengths[s])))

    def clear(self, seq: int | None = None) -> None:
        """Forget one sequence, or all of them."""
        if seq is None:
            self.lengths[:] = 0
        else:
            self.lengths[self._slot(seq)] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make ``dst`` hold the first ``n`` positions of ``src`` (a shared system prompt evaluated once)."""
        s, d = self._slot(src), self._slot(dst)
        if not 0 <= n <= self.lengths[s]:
            raise QwenliteError(f"sequence {src} holds {int(self.lengths[s])} positions, cannot copy {n}")
        if s != d:
            self.backend.kv_copy(self.storage, s, d, int(n))
        self.lengths[d] = n
