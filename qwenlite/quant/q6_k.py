"""Q6_K (ggml type 14): 256-value super-blocks of 6-bit quants with signed 8-bit scales per 16 values.

Block layout (210 bytes): 128 bytes ``ql`` (low 4 bits), 64 bytes ``qh`` (high 2 bits), 16 int8
scales, f16 ``d``. Value ``x = d*sc_j*(q - 32)``. Each 128-value half n uses ``ql[64n:64n+64]`` and
``qh[32n:32n+32]``: for l < 32, values l, l+32, l+64, l+96 take the low nibble of ql[l], ql[l+32],
the high nibble of ql[l], ql[l+32], and bits 0-1, 2-3, 4-5, 6-7 of qh[l].

The quantizer is ggml's ``quantize_row_q6_K_ref``: ``make_qx_quants`` (weights x^2) per 16 values,
then scales to int8 relative to the largest, in strict float32 so that the candidate search picks
the same scale as ggml.
"""

import numpy as np
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits
from qwenlite.quant.q4_k import check_q8k, check_row, nearest_int

TYPE = GGMLType.Q6_K
BLOCK_SIZE = 256
TYPE_SIZE = 210
ACT = "q8_k"

_F0 = np.float32(0.0)
_GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, error_model="numpy")
def make_qx_quants(nmax, x, L):
    """Symmetric fit of ``x`` to levels -nmax..nmax-1 weighted by x^2, as ggml's ``make_qx_quants``
    with ``rmse_type=1`` and no importance weights.

    Stores levels + nmax in ``L`` and returns the scale: the least-squares scale of the best of 19
    candidate inverse scales -(nmax + 0.1*k)/max, k = -9..9.
    """
    n = x.shape[0]
    mx = _F0
    amax = _F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < _GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return _F0
    fnmax = np.float32(nmax)
    iscale = -fnmax / mx
    sumlx = _F0
    suml2 = _F0
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _F0 else _F0
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = -(fnmax + np.float32(0.1) * np.float32(k)) / mx
        sumlx = _F0
        suml2 = _F0
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > _F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q6_K bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` and ggml."""
    n = dst.shape[0]
    check_row(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        d = f16_bits_to_f32(np.int32(src[o + 208]) | (np.int32(src[o + 209]) << 8))
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            sc = o + 192 + 8 * half
            y = i * 256 + 128 * half
            for g in range(4):
                nib = 4 * (g // 2)
                qlo = ql + 32 * (g % 2)
                for h in range(2):
                    ds = d * np.float32(np.int8(src[sc + 2 * g + h]))
                    for l in range(16 * h, 16 * h + 16):
                        v = ((src[qlo + l] >> nib) & 0xF) | (((src[qh + l] >> (2 * g)) & 3) << 4)
                        dst[y + 32 * g + l] = ds * np.float32(v - 32)


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q6_K bytes, byte-identical to ggml's ``quantize_row_q6_K_ref``."""
    n = src.shape[0]
    check_row(n, dst.shape[0], TYPE_SIZE)
    L = np.empty(256, np.int8)
    scales = np.empty(16, np.float32)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        x = src[i * 256 : i * 256 + 256]
        max_scale = _F0
        max_abs_scale = _F0
        for ib in range(16):
            scale = make_qx_quants(32, x[16 * ib : 16 * ib + 16], L[16 * ib : 16 * ib + 16])
            scales[ib] = scale
            if abs(scale) > max_abs_scale:
                max_abs_scale = abs(scale)
                max_scale = scale
        if max_abs_scale < _GROUP_MAX_EPS:
            for k in range(TYPE_SIZE):
                dst[o + k] = 0
            continue
        iscale = np.float32(-128.0) / max_scale
        dh = f32_to_f16_bits(np.float32(1.0) / iscale)
        dst[o + 208] = dh & 0xFF
        dst[o + 209] = dh >> 8
        for ib in range(16):
            dst[o + 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
        fd = f16_bits_to_f32(dh)
        for j in range(16):
            d = fd * np.float32(np.int8(dst[o + 192 + j]))
            if d == _F0:
                continue  # levels from make_qx_quants stay, as in ggml
            for ii in range(16):
                l = nearest_int(x[16 * j + ii] / d)
                L[16 * j + ii] = max(-32, min(31, l)) + 32
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            b = 128 * half
            for l in range(32):
                q1 = L[b + l]
                q2 = L[b + l + 32]
                q3 = L[b + l + 64]
                q4 = L[b + l + 96]
                dst[ql + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                dst[ql + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                dst[qh + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q6_K row . one Q8_K activation row, integer sums per super-block like ggml.

    Per super-block d_w*d_a*sum_j sc_j*(q_w . q_a)_j with q_w in -32..31: each pass over 16 bytes
    of ql/qh yields four 16-value partial sums (one per bit-plane group) in int32 registers.
    ``asum`` is not needed because Q6_K has no min term.
    """
    n = aq.shape[0]
    check_row(n, w.shape[0], TYPE_SIZE)
    check_q8k(n, ad, asum)
    total = 0.0
    for i in range(n // 256):
        o = i * TYPE_SIZE
        d = f16_bits_to_f32(np.int32(w[o + 208]) | (np.int32(w[o + 209]) << 8)) * ad[i]
        sumi = np.int32(0)
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            sc = o + 192 + 8 * half
            a = i * 256 + 128 * half
            for h in range(2):
                s0 = np.int32(0)
                s1 = np.int32(0)
                s2 = np.int32(0)
                s3 = np.int32(0)
                for l in range(16 * h, 16 * h + 16):
                    lo = np.int32(w[ql + l])
                    hi = np.int32(w[ql + l + 32])
                    hb = np.int32(w[qh + l])
                    v0 = ((lo & 15) | ((hb & 3) << 4)) - 32
                    v1 = ((hi & 15) | (((hb >> 2) & 3) << 4)) - 32
                    v2 = ((lo >> 4) | (((hb >> 4) & 3) << 4)) - 32
                    v3 = ((hi >> 4) | (((hb >> 6) & 3) << 4)) - 32
                    s0 = np.int32(s0 + v0 * np.int32(aq[a + l]))
                    s1 = np.int32(s1 + v1 * np.int32(aq[a + l + 32]))
                    s2 = np.int32(s2 + v2 * np.int32(aq[a + l + 64]))
                    s3 = np.int32(s3 + v3 * np.int32(aq[a + l + 96]))
                sumi = np.int32(
                    sumi
                    + np.int32(np.int8(w[sc + h])) * s0
                    + np.int32(np.int8(w[sc + h + 2])) * s1
                    + np.int32(np.int8(w[sc + h + 4])) * s2
                    + np.int32(np.int8(w[sc + h + 6])) * s3
                )
        total += np.float64(d) * np.float64(sumi)
    return np.float32(total)
