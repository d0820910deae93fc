"""Q4_0 (ggml type 2): 32-value blocks of 4-bit quants with one f16 scale.

Block layout (18 bytes): f16 ``d``, 16 bytes of nibbles; value ``x = d*(q - 8)``. Value j < 16 is
the low nibble of byte j, value j + 16 its high nibble.

The quantizer reproduces ``quantize_row_q4_0_ref`` in strict float32: the signed value of largest
magnitude maps to -8 (``d = max/-8``), then ``q = min(15, (int8)(x/d + 8.5))``.
"""

import numpy as np
from llvmlite import ir
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.q8_0 import (
    c_float_to_int8,
    check_blocks,
    check_q8_0,
    legacy_x8,
    load_at,
    load_f16,
    nibble_units,
    nibbles,
    row_dot,
    store_f16,
)

TYPE = GGMLType.Q4_0
BLOCK_SIZE = 32
TYPE_SIZE = 18
ACT = "q8_0"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_OFFSET = np.float32(8.5)
_MINUS8 = np.float32(-8.0)


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q4_0 bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` (``d * (q-8)``)."""
    n = dst.shape[0]
    check_blocks(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        o = i * TYPE_SIZE
        d = load_f16(src, o)
        y = i * 32
        for j in range(16):
            b = np.int32(src[o + 2 + j])
            dst[y + j] = d * np.float32((b & 15) - 8)
            dst[y + 16 + j] = d * np.float32((b >> 4) - 8)


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q4_0 bytes, byte-identical to ggml's ``quantize_row_q4_0_ref``."""
    n = src.shape[0]
    check_blocks(n, dst.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        x = src[i * 32 : i * 32 + 32]
        o = i * TYPE_SIZE
        amax = _F0
        mx = _F0
        for j in range(32):
            if amax < abs(x[j]):
                amax = abs(x[j])
                mx = x[j]
        d = mx / _MINUS8
        inv = _F1 / d if d != _F0 else _F0
        store_f16(dst, o, d)
        for j in range(16):
            lo = min(np.int32(15), np.int32(c_float_to_int8(x[j] * inv + _OFFSET)))
            hi = min(np.int32(15), np.int32(c_float_to_int8(x[j + 16] * inv + _OFFSET)))
            dst[o + 2 + j] = np.uint8((lo & 0xFF) | ((hi << 4) & 0xFF))


_V16I8 = ir.VectorType(ir.IntType(8), 16)
_V32I8 = ir.VectorType(ir.IntType(8), 32)


def _values(context, builder, wty, w, o):
    """Block ``o``'s 32 values q-8 as a signed i8 vector (-8..7)."""
    q = nibbles(builder, load_at(context, builder, wty, w, o, _V16I8, 2))
    return builder.sub(q, ir.Constant(ir.VectorType(ir.IntType(8), 32), [8] * 32)), True


dot_rows = row_dot(TYPE_SIZE, _values)

FIELDS = ((0, 2), (2, 16))


def _values_x8(blk):
    """The block's nibbles q (0..15) of 8 rows: qs unit i pairs with activation bytes 4i and 16+4i."""
    units = []
    for i in range(4):
        for k, v in zip((4 * i, 16 + 4 * i), nibble_units(blk.builder, blk.words(2, i)), strict=True):
            units.append((blk.builder.bitcast(v, _V32I8), k))
    return units, False


dot_rows_x8 = legacy_x8(FIELDS, TYPE_SIZE, _values_x8, 8)


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q4_0 row . one Q8_0 activation row: d_w*d_a*sum (q-8)*a per block (``row_dot``)."""
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 32)[0]
