"""Q5_0 (ggml type 6): 32-value blocks of 5-bit quants with one f16 scale.

Block layout (22 bytes): f16 ``d``, uint32 ``qh`` (bit j = fifth bit of value j, little-endian),
16 bytes of nibbles (value j < 16 low nibble of byte j, value j + 16 high nibble); ``x = d*(q - 16)``.

The quantizer reproduces ``quantize_row_q5_0_ref`` in strict float32: the signed value of largest
magnitude maps to -16 (``d = max/-16``), then ``q = min(31, (int8)(x/d + 16.5))``.
"""

import numpy as np
from llvmlite import ir
from numba import njit

from qwenlite.gguf.constants import GGMLType
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

TYPE = GGMLType.Q5_0
BLOCK_SIZE = 32
TYPE_SIZE = 22
ACT = "q8_0"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_OFFSET = np.float32(16.5)
_MINUS16 = np.float32(-16.0)


@njit(cache=True, inline="always", error_model="numpy")
def load_u32(buf, o):
    """The little-endian uint32 at byte offset ``o`` of ``buf``, as int64 (no sign surprises)."""
    return (
        np.int64(buf[o])
        | (np.int64(buf[o + 1]) << 8)
        | (np.int64(buf[o + 2]) << 16)
        | (np.int64(buf[o + 3]) << 24)
    )


@njit(cache=True, inline="always", error_model="numpy")
def store_u32(buf, o, v):
    """Store the low 32 bits of ``v`` little-endian at byte offset ``o``."""
    for k in range(4):
        buf[o + k] = np.uint8((v >> (8 * k)) & 0xFF)


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q5_0 bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` (``d * (q-16)``)."""
    n = dst.shape[0]
    check_blocks(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 32):
        o = i * TYPE_SIZE
        d = load_f16(src, o)
        qh = np.int32(load_u32(src, o + 2))
        y = i * 32
        for j in range(16):
            b = np.int32(src[o + 6 + j])
            lo = (b & 15) | (((qh >> j) & 1) << 4)
            hi = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            dst[y + j] = d * np.float32(lo - 16)
            dst[y + 16 + j] = d * np.float32(hi - 16)


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q5_0 bytes, byte-identical to ggml's ``quantize_row_q5_0_ref``."""
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
        d = mx / _MINUS16
        inv = _F1 / d if d != _F0 else _F0
        store_f16(dst, o, d)
        qh = np.int64(0)
        for j in range(16):
            lo = min(np.int32(31), np.int32(c_float_to_int8(x[j] * inv + _OFFSET))) & 0xFF
            hi = min(np.int32(31), np.int32(c_float_to_int8(x[j + 16] * inv + _OFFSET))) & 0xFF
            dst[o + 6 + j] = np.uint8((lo & 15) | ((hi & 15) << 4))
            qh |= np.int64((lo >> 4) & 1) << j
            qh |= np.int64((hi >> 4) & 1) << (j + 16)
        store_u32(dst, o + 2, qh)


_V16I8 = ir.VectorType(ir.IntType(8), 16)
_V32I8 = ir.VectorType(ir.IntType(8), 32)
_I32 = ir.IntType(32)


def _values(context, builder, wty, w, o):
    """Block ``o``'s 32 values q-16 as a signed i8 vector (-16..15)."""
    low = nibbles(builder, load_at(context, builder, wty, w, o, _V16I8, 6))
    q = fifth_bits(builder, load_at(context, builder, wty, w, o, _I32, 2), low)
    return builder.sub(q, ir.Constant(ir.VectorType(ir.IntType(8), 32), [16] * 32)), True


dot_rows = row_dot(TYPE_SIZE, _values)

FIELDS = ((0, 2), (2, 4), (6, 16))


def _values_x8(blk):
    """The block's five-bit values q (0..31) of 8 rows (``five_bit_units``)."""
    return five_bit_units(blk.builder, blk.words(2, 0), [blk.words(6, i) for i in range(4)]), False


dot_rows_x8 = legacy_x8(FIELDS, TYPE_SIZE, _values_x8, 16)


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q5_0 row . one Q8_0 activation row: d_w*d_a*sum (q-16)*a per block (``row_dot``)."""
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 32)[0]
