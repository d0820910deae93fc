"""Q5_K (ggml type 13): Q4_K plus a fifth bit per value.

Block layout (176 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of packed 6-bit scales/mins (as Q4_K),
32 bytes ``qh``, 128 bytes of nibbles. Value ``x = d*sc_j*(q | h<<4) - dmin*m_j`` where the fifth bit
of value l of sub-block j is bit j of ``qh[l]``. Quantization is Q4_K's procedure with levels 0..31
and ggml's Q5_K search parameters (rmin -0.5, 15 steps); the shared parts live in ``q4_k``.
"""

import numpy as np
from llvmlite import ir
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32
from qwenlite.quant.interleave import row_dot_x8
from qwenlite.quant.q4_k import (
    check_q8k,
    check_row,
    get_scale_min,
    kx_sums,
    kx_sums_x8,
    quantize_superblock_kx,
    row_dot_k,
)
from qwenlite.quant.q8_0 import load_at

TYPE = GGMLType.Q5_K
BLOCK_SIZE = 256
TYPE_SIZE = 176
ACT = "q8_k"


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q5_K bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` and ggml."""
    n = dst.shape[0]
    check_row(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        d = f16_bits_to_f32(np.int32(src[o]) | (np.int32(src[o + 1]) << 8))
        dmin = f16_bits_to_f32(np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8))
        qh = o + 16
        for c in range(4):
            sc1, m1 = get_scale_min(src, o + 4, 2 * c)
            sc2, m2 = get_scale_min(src, o + 4, 2 * c + 1)
            d1 = d * np.float32(sc1)
            dm1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            dm2 = dmin * np.float32(m2)
            q = o + 48 + 32 * c
            y = i * 256 + 64 * c
            for l in range(32):
                v = (src[q + l] & 0xF) | (((src[qh + l] >> (2 * c)) & 1) << 4)
                dst[y + l] = d1 * np.float32(v) - dm1
            for l in range(32):
                v = (src[q + l] >> 4) | (((src[qh + l] >> (2 * c + 1)) & 1) << 4)
                dst[y + 32 + l] = d2 * np.float32(v) - dm2


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q5_K bytes, byte-identical to ggml's ``quantize_row_q5_K_ref``."""
    n = src.shape[0]
    check_row(n, dst.shape[0], TYPE_SIZE)
    L = np.empty(256, np.uint8)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        quantize_superblock_kx(src[i * 256 : i * 256 + 256], 31, np.float32(-0.5), 15, L, dst, o)
        for l in range(32):
            dst[o + 16 + l] = 0
        for c in range(4):
            for l in range(32):
                lo = L[64 * c + l]
                hi = L[64 * c + 32 + l]
                dst[o + 16 + l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))
                dst[o + 48 + 32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4)


_V32I8 = ir.VectorType(ir.IntType(8), 32)


def _bytes(value):
    return ir.Constant(_V32I8, [value] * 32)


def _with_fifth_bits(builder, wv, qh, c):
    """Sub-blocks 2c and 2c+1 from 32 nibble-pair bytes ``wv`` and the matching ``qh`` bytes (whole
    vectors, or the same 4-byte unit of 8 rows): nibbles plus bit j of ``qh`` moved to bit 4."""
    h1 = builder.and_(builder.lshr(qh, _bytes(2 * c)), _bytes(1))
    h2 = builder.and_(builder.lshr(qh, _bytes(2 * c + 1)), _bytes(1))
    return (
        builder.or_(builder.and_(wv, _bytes(15)), builder.shl(h1, _bytes(4))),
        builder.or_(builder.lshr(wv, _bytes(4)), builder.shl(h2, _bytes(4))),
    )


def _values(context, builder, wty, w, o, c):
    """Sub-blocks 2c and 2c+1 of the row-major block at ``o`` as 32-value i8 vectors."""
    qh = load_at(context, builder, wty, w, o, _V32I8, 16)
    wv = load_at(context, builder, wty, w, o, _V32I8, 48 + 32 * c)
    return _with_fifth_bits(builder, wv, qh, c)


dot_rows = row_dot_k(TYPE_SIZE, 0, 2, kx_sums(_values))

FIELDS = ((0, 2), (2, 2), (4, 12), (16, 32), (48, 128))


def _values_x8(blk, c, i):
    """Unit i of sub-blocks 2c and 2c+1 for rows 0..7: nibble unit 8c+i with ``qh`` unit i, whose
    bytes are the fifth bits of the same 4 values of every sub-block."""
    return _with_fifth_bits(blk.builder, blk.unit(48, 8 * c + i), blk.unit(16, i), c)


dot_rows_x8 = row_dot_x8(FIELDS, TYPE_SIZE, 256, 16, kx_sums_x8(_values_x8))


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q5_K row . one Q8_K activation row, integer sums per super-block like ggml.

    Same structure as Q4_K's kernel; the fifth bit is folded in as 16*bit inside the SIMD sums.
    """
    n = aq.shape[0]
    check_row(n, w.shape[0], TYPE_SIZE)
    check_q8k(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 256)[0]
