"""Q8_0 (ggml type 8): 32-value blocks of int8 quants with one f16 scale.

Block layout (34 bytes): f16 ``d``, 32 x int8 ``q``; value ``x = d*q``.

This module also holds the small pieces the other 32-value ("legacy") formats share with it:
block-size checks, little-endian f16 fields, and C's ``roundf`` / float-to-int8 conversions that
ggml's reference quantizers rely on. The quantizer reproduces ``quantize_row_q8_0_ref`` in strict
float32 (no fastmath): ``d = amax/127``, ``q = roundf(x * (1/d))``.
"""

import numpy as np
from numba import njit

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits

TYPE = GGMLType.Q8_0
BLOCK_SIZE = 32
TYPE_SIZE = 34
ACT = "q8_0"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_F127 = np.float32(127.0)


@njit(cache=True, error_model="numpy")
def check_blocks(n, nbytes, type_size):
    """Raise QwenliteError unless ``n`` values are whole 32-blocks and ``nbytes`` holds them.

    Kernels index raw bytes without bounds checks, so a short buffer must be refused up front.
    """
    if n % 32 != 0:
        raise QwenliteError("row length must be a multiple of the 32-value block size")
    if nbytes < (n // 32) * type_size:
        raise QwenliteError("quantized buffer is shorter than the row it should hold")


@njit(cache=True, error_model="numpy")
def check_q8_0(n, ad, asum):
    """Raise QwenliteError unless the Q8_0 activation scales and sums cover ``n`` values."""
    if ad.shape[0] < n // 32 or asum.shape[0] < n // 32:
        raise QwenliteError("Q8_0 activation row is missing scales or block sums")


@njit(cache=True, inline="always", error_model="numpy")
def load_f16(buf, o):
    """The little-endian f16 at byte offset ``o`` of ``buf``, as float32."""
    return f16_bits_to_f32(np.uint16(np.uint32(buf[o]) | (np.uint32(buf[o + 1]) << np.uint32(8))))


@njit(cache=True, inline="always", error_model="numpy")
def store_f16(buf, o, value):
    """Round ``value`` to f16 like ggml and store it little-endian at byte offset ``o``."""
    h = f32_to_f16_bits(value)
    buf[o] = np.uint8(h & np.uint16(0xFF))
    buf[o + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, inline="always", error_model="numpy")
def roundf(x):
    """C ``roundf``: nearest integer, halves away from zero (numba's ``round`` rounds to even)."""
    t = np.trunc(x)
    if abs(x - t) >= _HALF:
        t += np.float32(1.0) if x > _F0 else np.float32(-1.0)
    return t


@njit(cache=True, inline="always", error_model="numpy")
def c_float_to_int8(x):
    """C's ``(int8_t)x`` as x86 compilers emit it: truncate to int32 (cvttss2si), keep the low byte."""
    return np.int8(np.int32(x) & np.int32(0xFF))


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q8_0 bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` (``q * d`` in float32)."""
    n = dst.shape[0]
    check_blocks(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        o = i * TYPE_SIZE
        d = load_f16(src, o)
        for j in range(32):
            dst[i * 32 + j] = np.float32(np.int8(src[o + 2 + j])) * d


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q8_0 bytes, byte-identical to ggml's ``quantize_row_q8_0_ref``."""
    n = src.shape[0]
    check_blocks(n, dst.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        x = src[i * 32 : i * 32 + 32]
        o = i * TYPE_SIZE
        amax = _F0
        for j in range(32):
            av = abs(x[j])
            amax = amax if amax > av else av  # ggml's MAX macro, including its NaN behaviour
        d = amax / _F127
        inv = _F1 / d if d != _F0 else _F0
        store_f16(dst, o, d)
        for j in range(32):
            dst[o + 2 + j] = np.uint8(c_float_to_int8(roundf(x[j] * inv)))


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q8_0 row . one Q8_0 activation row: int32 sums per block, one float multiply per block.

    ``asum`` is unused (Q8_0 has no offset term); it is part of the shared signature.
    """
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    total = 0.0
    for i in range(n // 32):
        o = i * TYPE_SIZE + 2
        a = i * 32
        s = np.int32(0)
        for j in range(32):
            s = np.int32(s + np.int32(np.int8(w[o + j])) * np.int32(aq[a + j]))
        total += np.float64(load_f16(w, o - 2) * ad[i]) * np.float64(s)
    return np.float32(total)
