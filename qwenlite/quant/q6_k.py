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
from llvmlite import ir
from numba import njit

from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits
from qwenlite.quant.interleave import row_dot_x8, splat
from qwenlite.quant.q4_k import check_q8k, check_row, load_ref, nearest_int, row_dot_k
from qwenlite.quant.q8_0 import broadcast, f16_to_f32, lane_dots, load_at, reduce_add

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


_I32 = ir.IntType(32)
_V8I32 = ir.VectorType(_I32, 8)
_V16I32 = ir.VectorType(_I32, 16)
_V32I8 = ir.VectorType(ir.IntType(8), 32)
_ZERO8 = ir.Constant(_V8I32, [0] * 8)


def _bytes(value):
    return ir.Constant(_V32I8, [value] * 32)


def _six_bits(builder, ql0, ql1, qh):
    """The four 32-byte vectors of 6-bit values (0..63) of one 128-value half, from its ``ql`` bytes
    0-31 and 32-63 and its ``qh`` bytes (whole vectors, or the matching 4-byte units of 8 rows):
    low nibbles of ql0/ql1, then high nibbles, each with its 2-bit pair of ``qh`` as bits 4-5.

    x86 has no byte shifts, so the bits move with 32-bit shifts: masking ``qh`` first (bits
    0-1,4-5 and 2-3,6-7) leaves zeros wherever a shifted neighbour byte would leak in above the nibble,
    and each value is then one constant bit-select of nibble and high bits (a ``vpternlog`` on
    AVX-512).
    """

    def shift(v, n):
        word = builder.bitcast(v, _V8I32)
        amount = ir.Constant(_V8I32, [abs(n)] * 8)
        return builder.bitcast(builder.shl(word, amount) if n > 0 else builder.lshr(word, amount), _V32I8)

    def select(nibble, high):
        return builder.or_(builder.and_(nibble, _bytes(0x0F)), builder.and_(high, _bytes(0xF0)))

    even = builder.and_(qh, _bytes(0x33))
    odd = builder.and_(qh, _bytes(0xCC))
    return (
        select(ql0, shift(even, 4)),
        select(ql1, shift(odd, 2)),
        select(shift(ql0, -4), even),
        select(shift(ql1, -4), shift(odd, -2)),
    )


def _sums(context, builder, wty, w, o, toks):
    """The ``row_dot_k`` emitter for Q6_K: sum_g sc_g * sum_{l<16} (q_l - 32) * a_l per row.

    The 6-bit values (0..63) are rebuilt in registers from 32-byte loads of ``ql``/``qh``, dotted
    unsigned with ``lane_dots`` and scaled lane-wise (lanes 0-3 and 4-7 of each 32-value vector
    are two 16-value groups with their own scale); the -32 offset is applied once per group as
    -32*sc_g*bsum_g. Bounds: |sum| <= 16*16*63*128*128 + 32*16*128*2048 < 2**31.
    """
    scales = builder.sext(load_at(context, builder, wty, w, o, ir.VectorType(ir.IntType(8), 16), 192), _V16I32)
    accs = [_ZERO8] * len(toks)
    for half in range(2):
        values = _six_bits(
            builder,
            *(load_at(context, builder, wty, w, o, _V32I8, at) for at in (64 * half, 64 * half + 32, 128 + 32 * half)),
        )
        for k, v in enumerate(values):
            g = 8 * half + 2 * k
            group_scales = broadcast(builder, scales, [g] * 4 + [g + 1] * 4)
            for t, (a, _) in enumerate(toks):
                av = load_ref(context, builder, a, _V32I8, 128 * half + 32 * k)
                accs[t] = builder.add(accs[t], builder.mul(lane_dots(builder, v, av, _ZERO8), group_scales))
    out = []
    for acc, (_, bs) in zip(accs, toks, strict=True):
        offset = reduce_add(builder, builder.mul(scales, load_ref(context, builder, bs, _V16I32)))
        out.append((builder.sub(reduce_add(builder, acc), builder.shl(offset, ir.Constant(_I32, 5))), None))
    return out


dot_rows = row_dot_k(TYPE_SIZE, 208, None, _sums)

# Scales first, then the 4-byte units in the order ``_sums_x8`` reads them (ql low, ql high, qh of
# unit i of each half): the kernel streams each block front to back (see quant.interleave).
FIELDS = ((208, 2), (192, 16)) + tuple(
    (off, 4) for h in range(2) for i in range(8) for off in (64 * h + 4 * i, 64 * h + 32 + 4 * i, 128 + 32 * h + 4 * i)
)


def _sums_x8(blk, n):
    """The ``row_dot_x8`` emitter for Q6_K (interleaved layout: lanes are rows).

    Unit i (0-7) of the three vectors of half h (``ql`` units 16h+i and 16h+8+i, ``qh`` unit
    8h+i) gives, through ``_six_bits``, values 4i..4i+3 of the four 32-value vectors k of that
    half for rows 0..7; they pair with the broadcast activation bytes 128h+32k+4i and belong to
    16-value group g = 8h+2k+i//4. Each group's dots accumulate in one vector that starts at
    -32*bsum_g (the -32 offset of every value, folded in for free), then get the per-row int8
    scale sc_g lane-wise. The total is sum_g sc_g*dot_g - 32*sum_g sc_g*bsum_g, the integer of
    ``_sums`` (int32 arithmetic wraps, so the order of the additions cannot change it).
    """
    b = blk.builder
    d = f16_to_f32(b, blk.halves(208))
    scale_words = [blk.words(192, u) for u in range(4)]
    isum = [_ZERO8] * n
    for half in range(2):
        accs = {}
        for i in range(8):
            units = (blk.unit(0, 16 * half + i), blk.unit(0, 16 * half + 8 + i), blk.unit(128, 8 * half + i))
            for k, v in enumerate(_six_bits(b, *units)):
                g = 8 * half + 2 * k + i // 4
                if g not in accs:
                    accs[g] = [splat(b, b.mul(blk.bsum(t, g), ir.Constant(_I32, -32)), _V8I32) for t in range(n)]
                for t in range(n):
                    accs[g][t] = lane_dots(b, v, blk.act(t, 128 * half + 32 * k + 4 * i), accs[g][t])
        for g, acc in sorted(accs.items()):
            shift = ir.Constant(_V8I32, [24 - 8 * (g % 4)] * 8)
            sc = b.ashr(b.shl(scale_words[g // 4], shift), ir.Constant(_V8I32, [24] * 8))
            for t in range(n):
                isum[t] = b.add(isum[t], b.mul(acc[t], sc))
    return [[(d, isum[t], False)] for t in range(n)]


dot_rows_x8 = row_dot_x8(FIELDS, TYPE_SIZE, 256, 16, _sums_x8)


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q6_K row . one Q8_K activation row, integer sums per super-block like ggml.

    Per super-block d_w*d_a*sum_g sc_g*(q_w . q_a)_g with q_w in -32..31, the integer sum formed
    in SIMD registers by ``_sums``.
    """
    n = aq.shape[0]
    check_row(n, w.shape[0], TYPE_SIZE)
    check_q8k(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 256)[0]
