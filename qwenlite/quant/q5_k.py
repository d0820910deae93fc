"""Q5_K (ggml type 13): Q4_K plus a fifth bit per value.

Block layout (176 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of packed 6-bit scales/mins (as Q4_K),
32 bytes ``qh``, 128 bytes of nibbles. Value ``x = d*sc_j*(q | h<<4) - dmin*m_j`` where the fifth bit
of value l of sub-block j is bit j of ``qh[l]``. Quantization is Q4_K's procedure with levels 0..31
and ggml's Q5_K search parameters (rmin -0.5, 15 steps); the shared parts live in ``q4_k``.
"""

import numpy as np
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32
from qwenlite.quant.q4_k import check_q8k, check_row, get_scale_min, quantize_superblock_kx

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


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q5_K row . one Q8_K activation row, integer sums per super-block like ggml.

    Same structure as Q4_K's kernel; the fifth bit is folded in as 16*bit before the int32 products.
    """
    n = aq.shape[0]
    check_row(n, w.shape[0], TYPE_SIZE)
    check_q8k(n, ad, asum)
    total = 0.0
    for i in range(n // 256):
        o = i * TYPE_SIZE
        d = f16_bits_to_f32(np.int32(w[o]) | (np.int32(w[o + 1]) << 8)) * ad[i]
        dmin = f16_bits_to_f32(np.int32(w[o + 2]) | (np.int32(w[o + 3]) << 8)) * ad[i]
        qh = o + 16
        sumi = np.int32(0)
        summ = np.int32(0)
        for c in range(4):
            q = o + 48 + 32 * c
            a = i * 256 + 64 * c
            sh1 = 2 * c
            sh2 = 2 * c + 1
            s1 = np.int32(0)
            s2 = np.int32(0)
            for l in range(32):
                b = np.int32(w[q + l])
                h = np.int32(w[qh + l])
                v1 = (b & 15) | (((h >> sh1) & 1) << 4)
                v2 = (b >> 4) | (((h >> sh2) & 1) << 4)
                s1 = np.int32(s1 + v1 * np.int32(aq[a + l]))
                s2 = np.int32(s2 + v2 * np.int32(aq[a + 32 + l]))
            sc1, m1 = get_scale_min(w, o + 4, 2 * c)
            sc2, m2 = get_scale_min(w, o + 4, 2 * c + 1)
            s = i * 16 + 4 * c
            sumi = np.int32(sumi + sc1 * s1 + sc2 * s2)
            summ = np.int32(summ + m1 * (asum[s] + asum[s + 1]) + m2 * (asum[s + 2] + asum[s + 3]))
        total += np.float64(d) * np.float64(sumi) - np.float64(dmin) * np.float64(summ)
    return np.float32(total)
