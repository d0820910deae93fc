"""Activation quantization shared by every integer dot kernel (Q8_0 and Q8_K rows).

llama.cpp's CPU matmul quantizes each activation row once, then every weight row is dotted with it
in integer arithmetic. We do the same, with ggml's reference rounding so the integer sums are the
ones ggml would form:

- Q8_0 (blocks of 32, ``quantize_row_q8_0_ref``): ``d = amax/127``, ``q = roundf(x * (1/d))``.
  ``ad`` keeps ``d`` in float32 (ggml stores it as f16; the f32 scale is the more accurate of the
  two and costs nothing). ``asum`` holds each block's sum of ``q`` for the offset/min terms of
  Q4_0 / Q5_0 / Q5_1.
- Q8_K (blocks of 256, ``quantize_row_q8_K_ref``): ``iscale = -127/max`` with ``max`` the signed
  value of largest magnitude, ``q = min(127, nearest_int(iscale*x))``, ``d = 1/iscale``; ``asum``
  holds the 16 sums of 16 values per block that the K-quants' min terms use.
"""

import numpy as np
from numba import njit, prange

from qwenlite.errors import QwenliteError
from qwenlite.quant.halfprec import f32_as_u32
from qwenlite.quant.q8_0 import roundf

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F127 = np.float32(127.0)
_MINUS127 = np.float32(-127.0)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: x + MAGIC leaves round-half-even(x) in the mantissa

# Below this many rows a parallel region costs more than the quantization it would split.
_PARALLEL_MIN_ROWS = 8


@njit(cache=True, inline="always", error_model="numpy")
def _nearest_int(x):
    """ggml's ``nearest_int``: round half to even through the 1.5*2**23 trick (|x| < 2**22)."""
    return np.int32(f32_as_u32(x + _MAGIC) & np.uint32(0x007FFFFF)) - np.int32(0x00400000)


@njit(cache=True, error_model="numpy")
def quantize_q8_0(x, aq, ad, asum):
    """One float32 row -> Q8_0 activation (``aq`` int8[n], ``ad`` f32[n/32], ``asum`` i32[n/32])."""
    n = x.shape[0]
    if n % 32 != 0:
        raise QwenliteError("Q8_0 activation length must be a multiple of 32")
    if aq.shape[0] < n or ad.shape[0] < n // 32 or asum.shape[0] < n // 32:
        raise QwenliteError("Q8_0 activation buffers are too small")
    for i in range(n // 32):
        b = i * 32
        amax = _F0
        for j in range(b, b + 32):
            av = abs(x[j])
            amax = amax if amax > av else av
        d = amax / _F127
        inv = _F1 / d if d != _F0 else _F0
        s = np.int32(0)
        for j in range(b, b + 32):
            q = np.int32(roundf(x[j] * inv))
            aq[j] = np.int8(q)
            s += q
        ad[i] = d
        asum[i] = s


@njit(cache=True, error_model="numpy")
def quantize_q8_k(x, aq, ad, asum):
    """One float32 row -> Q8_K activation (``aq`` int8[n], ``ad`` f32[n/256], ``asum`` i32[n/16])."""
    n = x.shape[0]
    if n % 256 != 0:
        raise QwenliteError("Q8_K activation length must be a multiple of 256")
    if aq.shape[0] < n or ad.shape[0] < n // 256 or asum.shape[0] < n // 16:
        raise QwenliteError("Q8_K activation buffers are too small")
    for i in range(n // 256):
        b = i * 256
        amax = _F0
        mx = _F0
        for j in range(b, b + 256):
            av = abs(x[j])
            if av > amax:
                amax = av
                mx = x[j]
        if amax == _F0:
            ad[i] = _F0
            for j in range(b, b + 256):
                aq[j] = 0
            for g in range(16):
                asum[i * 16 + g] = 0
            continue
        iscale = _MINUS127 / mx
        for g in range(16):
            s = np.int32(0)
            for j in range(b + 16 * g, b + 16 * g + 16):
                q = min(np.int32(127), _nearest_int(iscale * x[j]))
                aq[j] = np.int8(q)
                s += q
            asum[i * 16 + g] = s
        ad[i] = _F1 / iscale


@njit(cache=True, error_model="numpy", parallel=True)
def _rows_q8_0(x, aq, ad, asum):
    if x.shape[0] < _PARALLEL_MIN_ROWS:
        for t in range(x.shape[0]):
            quantize_q8_0(x[t], aq[t], ad[t], asum[t])
    else:
        for t in prange(x.shape[0]):
            quantize_q8_0(x[t], aq[t], ad[t], asum[t])


@njit(cache=True, error_model="numpy", parallel=True)
def _rows_q8_k(x, aq, ad, asum):
    if x.shape[0] < _PARALLEL_MIN_ROWS:
        for t in range(x.shape[0]):
            quantize_q8_k(x[t], aq[t], ad[t], asum[t])
    else:
        for t in prange(x.shape[0]):
            quantize_q8_k(x[t], aq[t], ad[t], asum[t])


@njit(cache=True, error_model="numpy")
def quantize_rows_q8_0(x):
    """A float32 ``[T, K]`` matrix -> Q8_0 rows ``(aq int8[T,K], ad f32[T,K/32], asum i32[T,K/32])``."""
    T, K = x.shape
    aq = np.empty((T, K), np.int8)
    ad = np.empty((T, K // 32), np.float32)
    asum = np.empty((T, K // 32), np.int32)
    _rows_q8_0(x, aq, ad, asum)
    return aq, ad, asum


@njit(cache=True, error_model="numpy")
def quantize_rows_q8_k(x):
    """A float32 ``[T, K]`` matrix -> Q8_K rows ``(aq int8[T,K], ad f32[T,K/256], asum i32[T,K/16])``."""
    T, K = x.shape
    aq = np.empty((T, K), np.int8)
    ad = np.empty((T, K // 256), np.float32)
    asum = np.empty((T, K // 16), np.int32)
    _rows_q8_k(x, aq, ad, asum)
    return aq, ad, asum
