"""F16 (ggml type 1): IEEE half values, one per 2 bytes (little-endian).

ggml converts float32 to F16 with round-to-nearest-even (``ggml_fp32_to_fp16_row``), which is what
``qwenlite.quant.halfprec.f32_to_f16_bits`` reproduces bit for bit. The dot kernel takes the float
activation row (``ACT = "f32"``).
"""

import numpy as np
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.f32 import check_bytes
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits

TYPE = GGMLType.F16
BLOCK_SIZE = 1
TYPE_SIZE = 2
ACT = "f32"

_F0 = np.float32(0.0)


@njit(cache=True, inline="always", error_model="numpy")
def _load(buf, j):
    return f16_bits_to_f32(np.uint16(np.uint32(buf[2 * j]) | (np.uint32(buf[2 * j + 1]) << np.uint32(8))))


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """F16 bytes -> float32 (exact)."""
    n = dst.shape[0]
    check_bytes(n, src.shape[0], TYPE_SIZE)
    for j in range(n):
        dst[j] = _load(src, j)


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> F16 bytes, round to nearest even like ggml."""
    n = src.shape[0]
    check_bytes(n, dst.shape[0], TYPE_SIZE)
    for j in range(n):
        h = f32_to_f16_bits(src[j])
        dst[2 * j] = np.uint8(h & np.uint16(0xFF))
        dst[2 * j + 1] = np.uint8(h >> np.uint16(8))


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
def dot_row(w, x):
    """One F16 weight row . one float32 activation row."""
    n = x.shape[0]
    check_bytes(n, w.shape[0], TYPE_SIZE)
    total = _F0
    for j in range(n):
        total += _load(w, j) * x[j]
    return total
