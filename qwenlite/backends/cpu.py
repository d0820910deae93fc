"""The CPU backend: Numba kernels on the host (``kernels.matmul``, ``kernels.ops``, ``kernels.kv``).

KV storage lives in anonymous mappings of 4 KiB pages, which become resident only as positions fill
(numpy's allocator asks for 2 MiB huge pages on large arrays: the first token of each layer and head
would make 2 MiB resident, 224 MB for the 1.5B model at 4096 positions), so reserving ``n_seq`` slots
of a long context costs address space, not memory, until they are used.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from qwenlite import quant
from qwenlite.errors import QwenliteError
from qwenlite.kernels import kv as kvk
from qwenlite.kernels.matmul import matmul, matmul_experts, matmul_x8_trusted
from qwenlite.kernels.ops import all_finite, rms_norm, rope_neox, swiglu
from qwenlite.model.weights import Linear

# Below this many multiply-adds of attention a thread pool wake-up costs more than it saves.
PARALLEL_ATTENTION_WORK = 1 << 18


def _zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    try:
        buf = mmap.mmap(-1, max(nbytes, 1))
    except (OSError, OverflowError, MemoryError) as e:
        raise QwenliteError(f"cannot reserve {nbytes / 2**20:.0f} MiB for the KV cache {shape} "
                            f"({getattr(e, 'strerror', None) or e}); lower the context size (-c) or the "
                            "sequence slots (--parallel), or use a smaller --kv-type") from None
    return np.frombuffer(buf, dtype, count=int(np.prod(shape))).reshape(shape)


@dataclass
class CPUKV:
    """K and V of every layer: ``[n_layer, n_seq, n_kv, n_ctx, hd]`` (plus per-32 scales for q8_0)."""

    kind: str
    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray | None = None
    v_scale: np.ndarray | None = None
    k_bias: np.ndarray | None = None  # q8_0: [n_layer, n_kv*hd], subtracted (rotated) from stored keys
    v_bias: np.ndarray | None = None  # q8_0: zeros, values keep everything
    cos: np.ndarray | None = None
    sin: np.ndarray | None = None

    def arrays(self) -> list[np.ndarray]:
        return [a for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None]


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class CPUBackend:
    """The ``Backend`` interface on the host CPU."""

    name = "cpu"

    def linear(self, w: Linear, x: np.ndarray) -> np.ndarray:
        if w.interleaved and x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous and x.shape[1] == w.n_in:
            y = matmul_x8_trusted(w.w, w.qtype, x)  # the loader checked the weight
        else:
            y = matmul(w.w, w.qtype, x, interleaved=w.interleaved)
        if w.bias is not None:
            y += w.bias
        return y

    def linear_experts(self, w: Linear, x: np.ndarray, starts: np.ndarray, experts: np.ndarray) -> np.ndarray:
        return matmul_experts(w.w, w.qtype, x, starts, experts, interleaved=w.interleaved)

    def embed(self, w: Linear, ids: np.ndarray) -> np.ndarray:
        raw = quant.deinterleave_rows(w.w, w.qtype, ids) if w.interleaved else w.w[ids]
        return quant.dequantize(raw, w.qtype, w.n_in)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return rms_norm(x, weight, eps)

    def rope(self, x: np.ndarray, n_heads: int, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        rope_neox(x, n_heads, pos, cos, sin)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return swiglu(gate, up)

    def moe_route(self, logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        # Row-wise numpy reductions: each token's routing depends on its own row only.
        probs = _softmax_rows(logits)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        weights = np.take_along_axis(probs, top, axis=1)
        if normalize:
            weights = weights / weights.sum(axis=1, keepdims=True)
        return top, weights.astype(np.float32)

    def all_finite(self, x: np.ndarray) -> bool:
        # After every layer: ~0.3% of a decode step of the 0.5B model (BENCHMARKS.md).
        return all_finite(x)

    def kv_alloc(self, kind: str, n_layer: int, n_seq: int, n_kv: int, n_ctx: int, head_dim: int, *,
                 k_bias: np.ndarray, rope: tuple[np.ndarray, np.ndarray]) -> CPUKV:
        shape = (n_layer, n_seq, n_kv, n_ctx, head_dim)
        if kind == "f32":
            return CPUKV(kind, _zeros(shape, np.float32), _zeros(shape, np.float32))
        if kind == "f16":
            return CPUKV(kind, _zeros(shape, np.uint16), _zeros(shape, np.uint16))
        if kind == "q8_0":
            sshape = (*shape[:-1], head_dim // 32)
            return CPUKV(kind, _zeros(shape, np.int8), _zeros(shape, np.int8),
                         _zeros(sshape, np.uint16), _zeros(sshape, np.uint16),
                         k_bias, np.zeros_like(k_bias[0]), *rope)
        raise QwenliteError(f"the CPU backend has no KV cache type {kind!r}")

    def kv_store(self, storage: CPUKV, layer: int, k: np.ndarray, v: np.ndarray, seq: np.ndarray,
                 pos: np.ndarray) -> None:
        if storage.kind == "f32":
            kvk.store_f32(storage.k[layer], k, seq, pos)
            kvk.store_f32(storage.v[layer], v, seq, pos)
        elif storage.kind == "f16":
            kvk.store_f16(storage.k[layer], k, seq, pos)
            kvk.store_f16(storage.v[layer], v, seq, pos)
        else:
            st = storage
            kvk.store_q8_0(st.k[layer], st.k_scale[layer], k, seq, pos, st.k_bias[layer], st.cos, st.sin)
            kvk.store_q8_0(st.v[layer], st.v_scale[layer], v, seq, pos, st.v_bias, st.cos, st.sin)

    def kv_attend(self, storage: CPUKV, layer: int, q: np.ndarray, seq: np.ndarray, pos: np.ndarray,
                  n_heads: int) -> np.ndarray:
        hd = storage.k.shape[-1]
        out = np.zeros((q.shape[0], n_heads * hd), np.float32)
        parallel = int(n_heads * hd * 2 * int(pos.sum() + pos.shape[0])) >= PARALLEL_ATTENTION_WORK
        if storage.kind == "f32":
            kvk.attend_f32(q, storage.k[layer], storage.v[layer], seq, pos, n_heads, parallel, out)
        elif storage.kind == "f16":
            kvk.attend_f16(q, storage.k[layer], storage.v[layer], seq, pos, n_heads, parallel, out)
        else:
            st = storage
            kvk.attend_q8_0(q, st.k[layer], st.k_scale[layer], st.v[layer], st.v_scale[layer], st.k_bias[layer],
                            st.cos, st.sin, seq, pos, n_heads, parallel, out)
        return out

    def kv_copy(self, storage: CPUKV, src: int, dst: int, n: int) -> None:
        for a in storage.arrays():
            a[:, dst, :, :n] = a[:, src, :, :n]
