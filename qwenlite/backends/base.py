"""The backend interface: every kernel the model graph runs, and the KV cache's storage.

Activations cross the interface as float32 arrays ``[T, n]`` (one row per token of the batch); weights
are ``Linear`` objects built by the loader. A backend may keep activations elsewhere (a GPU) as long as
its methods take and return what this interface says; the model files never import a kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from qwenlite.model.weights import Linear


class Backend(Protocol):
    """Kernels of one device."""

    name: str

    def linear(self, w: Linear, x: np.ndarray) -> np.ndarray:
        """``x @ W^T + b`` for ``x [T, n_in]``: ``[T, n_out]``."""

    def linear_experts(self, w: Linear, x: np.ndarray, starts: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Rows ``starts[j]:starts[j+1]`` of ``x`` through expert ``experts[j]`` of a stacked weight."""

    def embed(self, w: Linear, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of an embedding table, float32 ``[T, n_embd]``."""

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """``x / sqrt(mean(x^2) + eps) * weight`` per row."""

    def rope(self, x: np.ndarray, n_heads: int, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """NEOX rotary embedding in place, row t at position ``pos[t]``."""

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """``silu(gate) * up``."""

    def moe_route(self, logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids ``[T, k]``, weights ``[T, k]`` float32): softmax, top-k, optional renormalization."""

    def all_finite(self, x: np.ndarray) -> bool:
        """True when no value of ``x`` is NaN or infinite."""

    def kv_alloc(self, kind: str, n_layer: int, n_seq: int, n_kv: int, n_ctx: int, head_dim: int, *,
                 k_bias: np.ndarray, rope: tuple[np.ndarray, np.ndarray]) -> Any:
        """Zeroed storage for the KV cache in element type ``kind``; ``k_bias [n_layer, n_kv*hd]`` and the
        RoPE tables are there for a quantized type to keep keys without their bias."""

    def kv_store(self, storage: Any, layer: int, k: np.ndarray, v: np.ndarray, seq: np.ndarray,
                 pos: np.ndarray) -> None:
        """Write rows of ``k``/``v [T, n_kv*hd]`` at (seq[t], pos[t]) of ``layer``."""

    def kv_attend(self, storage: Any, layer: int, q: np.ndarray, seq: np.ndarray, pos: np.ndarray,
                  n_heads: int) -> np.ndarray:
        """Causal GQA attention, token t over positions 0..pos[t] of sequence seq[t]: ``[T, n_heads*hd]``."""

    def kv_copy(self, storage: Any, src: int, dst: int, n: int) -> None:
        """Copy positions 0..n-1 of sequence ``src`` to ``dst`` in every layer."""
