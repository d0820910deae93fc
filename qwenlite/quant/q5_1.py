"""Q5_1 (ggml type 7): 32-value blocks of 5-bit quants with an f16 scale and an f16 minimum.

Block layout (24 bytes): f16 ``d``, f16 ``m``, uint32 ``qh`` (bit j = fifth bit of value j), 16
bytes of nibbles (value j < 16 low nibble of byte j, value j + 16 high nibble); ``x = d*q + m``.

The quantizer reproduces ``quantize_row_q5_1_ref`` in strict float32: ``d = (max-min)/31``,
``q = (uint8)((x-min)/d + 0.5)`` (no clamp, as in ggml).
"""

import numpy as np
from llvmlite import ir
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.q5_0 import load_u32, store_u32
from qwenlite.quant.q8_0 import (
    c_float_to_int8,
    check_blocks,
    check_q8_0,
    fifth_bits,
    five_bit_units,
    legacy_x8,
    load_at,
    load_f16,
    nibbles,
    row_dot,
    store_f16,
)

TYPE = GGMLType.Q5_1
BLOCK_SIZE = 32
TYPE_SIZE = 24
ACT = "q8_0"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_F31 = np.float32(31.0)
_FLT_MAX = np.float32(np.finfo(np.float32).max)


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q5_1 bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` (``d*q + m``, no FMA)."""
    n = dst.shape[0]
    check_blocks(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        o = i * TYPE_SIZE
        d = load_f16(src, o)
        m = load_f16(src, o + 2)
        qh = np.int32(load_u32(src, o + 4))
        y = i * 32
        for j in range(16):
            b = np.int32(src[o + 8 + j])
            lo = (b & 15) | (((qh >> j) & 1) << 4)
            hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[y + j] = d * np.float32(lo) + m
            dst[y + 16 + j] = d * np.float32(hi) + m


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q5_1 bytes, byte-identical to ggml's ``quantize_row_q5_1_ref``."""
    n = src.shape[0]
    check_blocks(n, dst.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        x = src[i * 32 : i * 32 + 32]
        o = i * TYPE_SIZE
        mn = _FLT_MAX
        mx = -_FLT_MAX
        for j in range(32):
            if x[j] < mn:
                mn = x[j]
            if x[j] > mx:
                mx = x[j]
        d = (mx - mn) / _F31
        inv = _F1 / d if d != _F0 else _F0
        store_f16(dst, o, d)
        store_f16(dst, o + 2, mn)
        qh = np.int64(0)
        for j in range(16):
            lo = np.int32(c_float_to_int8((x[j] - mn) * inv + _HALF)) & 0xFF
            hi = np.int32(c_float_to_int8((x[j + 16] - mn) * inv + _HALF)) & 0xFF
            dst[o + 8 + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
            qh |= np.int64((lo >> 4) & 1) << j
            qh |= np.int64((hi >> 4) & 1) << (j + 16)
        store_u32(dst, o + 4, qh)


_V16I8 = ir.VectorType(ir.IntType(8), 16)
_V32I8 = ir.VectorType(ir.IntType(8), 32)
_I32 = ir.IntType(32)


def _values(context, builder, wty, w, o):
    """Block ``o``'s 32 five-bit values as an i8 vector (unsigned 0..31)."""
    low = nibbles(builder, load_at(context, builder, wty, w, o, _V16I8, 8))
    return fifth_bits(builder, load_at(context, builder, wty, w, o, _I32, 4), low), False


dot_rows = row_dot(TYPE_SIZE, _values, min_at=2)

FIELDS = ((0, 2), (2, 2), (4, 4), (8, 16))


def _values_x8(blk):
    """The block's five-bit values q (0..31) of 8 rows (``five_bit_units``)."""
    return five_bit_units(blk.builder, blk.words(4, 0), [blk.words(8, i) for i in range(4)]), False


dot_rows_x8 = legacy_x8(FIELDS, TYPE_SIZE, _values_x8, 0, min_at=2)


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q5_1 row . one Q8_0 activation row: d_w*d_a*sum(q*a) + m_w*d_a*sum(a) per block.

    The minimum term needs the activation block sums, which is why ``asum`` is part of every
    Q8_0 activation row.
    """
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 32)[0]
