"""The transformer's non-matmul ops as Numba kernels: RMSNorm, RoPE (NEOX), SwiGLU (attention over the KV cache
is in ``kernels.kv``).

All work on float32 rows ``[T, ...]`` (T tokens at once for prefill, T=1 for decode). The elementwise
ops are serial on purpose: at T=1 they take microseconds, less than waking a thread pool (measured
70-120 us a call when they were parallel), and in prefill they stay small next to the matmuls.
Reductions accumulate in float32 local scalars like ggml does on the CPU. Every op works row by row
with the same code for any T, so a token's result never depends on the other rows of the batch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from qwenlite.quant.halfprec import _u32_as_f32

# LLVM fast-math flags that keep a row's result independent of how its loop was compiled. "arcp" and
# "afn" (in fastmath=FASTMATH) let the vectorizer replace a division by an approximate reciprocal and
# Newton step that the scalar code does not use, so the same row computed by the serial driver (a
# decode step) and the parallel one (a prompt) differed by an ulp (measured in swiglu: 2.4e-7), and
# a sequence's logits then depended on how its prompt was split. Reassociation stays: it only
# reorders a reduction, the same way every time the same loop is compiled.
FASTMATH = {"nnan", "ninf", "nsz", "contract", "reassoc"}


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * weight, per row of ``x [T, d]``."""
    T, d = x.shape
    out = np.empty_like(x)
    for t in range(T):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(d) + np.float32(eps))
        for i in range(d):
            out[t, i] = x[t, i] * scale * weight[i]
    return out


def all_finite(x: np.ndarray) -> bool:
    """True when no value of ``x`` is NaN or inf. A float32 sum first (NaN / inf propagate into it:
    2 us on a decode row of 896, 0.1 ms on 512 x 896, 2.6 ms per 64 MiB, where a float64 sum takes
    18 ms), the exact test only when the sum is not finite, which a sum that merely overflowed also
    gives."""
    return bool(np.isfinite(x.sum())) or bool(np.isfinite(x).all())


def rope_tables(
    n_ctx: int, head_dim: int, base: float, scaling: str = "none", factor: float = 1.0, orig_ctx: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin ``[n_ctx, head_dim/2]`` for NEOX RoPE, computed like HF (float32 inverse frequencies).

    ``scaling`` "linear" divides every frequency by ``factor``; "yarn" (Qwen2-57B-A14B beyond 32k)
    interpolates only the low frequencies, with a linear ramp between the dimensions that rotate 32
    and 1 times over the original context, and scales cos/sin by 0.1 ln(factor) + 1.
    """
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    attn_factor = 1.0
    if scaling == "linear":
        inv_freq = inv_freq / np.float32(factor)
    elif scaling == "yarn" and factor > 1.0:

        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(32.0)), 0)
        high = min(math.ceil(correction_dim(1.0)), head_dim - 1)
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / max(high - low, 0.001), 0, 1)
        extrapolate = (1 - ramp).astype(np.float32)
        inv_freq = (inv_freq / np.float32(factor)) * (1 - extrapolate) + inv_freq * extrapolate
        attn_factor = 0.1 * math.log(factor) + 1.0
    angles = np.outer(np.arange(n_ctx, dtype=np.float32), inv_freq.astype(np.float32))
    return (np.cos(angles) * np.float32(attn_factor)).astype(np.float32), (
        np.sin(angles) * np.float32(attn_factor)
    ).astype(np.float32)


@njit(cache=True, nogil=True)
def rope_neox(x: np.ndarray, n_heads: int, pos: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
    """Rotate ``x [T, n_heads*hd]`` in place: pairs (i, i + hd/2) of each head, row t at position ``pos[t]``."""
    T = x.shape[0]
    hd = x.shape[1] // n_heads
    half = hd // 2
    for t in range(T):
        p = pos[t]
        for h in range(n_heads):
            base = h * hd
            for i in range(half):
                a = x[t, base + i]
                b = x[t, base + half + i]
                c = cos[p, i]
                s = sin[p, i]
                x[t, base + i] = a * c - b * s
                x[t, base + half + i] = a * s + b * c


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 split so that n*_LN2_HI is exact for |n| < 2**9
_LN2_LO = np.float32(1.428606765330187e-06)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _expf(x):
    """exp(x) in float32 to a few ulp, in operations LLVM vectorizes (libm's expf does not, and Numba
    has no vector math library here): x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-6
    Taylor polynomial (truncation < 2e-7 relative), 2**n built in the exponent bits. The clamp
    keeps 2**n a normal float; exp(-87) and exp(88) are as far as silu needs."""
    x = x if x > np.float32(-87.0) else np.float32(-87.0)
    x = x if x < np.float32(88.0) else np.float32(88.0)
    k = np.int32(x * _LOG2E + np.float32(128.5))  # floor(x log2 e + 0.5) + 128, truncating a positive
    n = np.float32(k - 128)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _u32_as_f32(np.uint32((k - 1) << 23))


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _swiglu_row(gate, up, out):
    """Two passes: LLVM vectorizes each, but not the fused loop (measured 12 vs 27 us per 8960 values)."""
    for i in range(gate.shape[0]):
        out[i] = _expf(-gate[i])
    for i in range(gate.shape[0]):
        out[i] = gate[i] * up[i] / (np.float32(1.0) + out[i])


@njit(cache=True, fastmath=FASTMATH, parallel=True, nogil=True)
def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, elementwise over ``[T, n_ff]``; rows in parallel for a prompt."""
    T = gate.shape[0]
    out = np.empty_like(gate)
    if T < 4:
        for t in range(T):
            _swiglu_row(gate[t], up[t], out[t])
    else:
        for t in prange(T):
            _swiglu_row(gate[t], up[t], out[t])
    return out
