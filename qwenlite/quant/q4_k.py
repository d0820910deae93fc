"""Q4_K (ggml type 12): 256-value super-blocks of 4-bit quants with 6-bit sub-block scales and mins.

Block layout (144 bytes): f16 ``d``, f16 ``dmin``, 12 bytes of packed 6-bit scales/mins for the eight
32-value sub-blocks, 128 bytes of nibbles. Value ``x = d*sc_j*q - dmin*m_j``. Each 64-value chunk c
keeps sub-block 2c in the low nibbles and sub-block 2c+1 in the high nibbles of the same 32 bytes.

This module also holds the pieces Q5_K shares with it (the 6-bit scale packing, ``make_qkx2_quants``
and the super-block scale search), because both formats are quantized by the same ggml procedure
and differ only in the number of bits per value.

Everything that decides bytes runs in strict float32 in ggml's loop order with no fastmath: the
reference quantizer is a search over candidate scales, and one ulp of difference can pick another
candidate and change the file.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_as_u32, f32_to_f16_bits
from qwenlite.quant.interleave import act_rows_ok, row_dot_x8, splat
from qwenlite.quant.q8_0 import broadcast, f16_to_f32, lane_dots, load_at, reduce_add

TYPE = GGMLType.Q4_K
BLOCK_SIZE = 256
TYPE_SIZE = 144
ACT = "q8_k"

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F63 = np.float32(63.0)
_U15 = np.uint8(15)
_U4 = np.uint8(4)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it leaves round-half-even(x) in the low mantissa bits


@njit(cache=True, inline="always", error_model="numpy")
def nearest_int(fval):
    """ggml's ``nearest_int``: round half to even through the 1.5*2**23 addition trick.

    Reproduced bit for bit (not with ``rint``) so that out-of-range inputs (inf, NaN, |x| >= 2**22,
    which only the adversarial rows reach) give the same garbage-but-deterministic integers as ggml.
    """
    val = np.float32(fval) + _MAGIC
    return np.int64(f32_as_u32(val) & 0x007FFFFF) - 0x00400000


@njit(cache=True, inline="always", error_model="numpy")
def get_scale_min(sb, o, j):
    """Unpack the 6-bit scale and min of sub-block ``j`` from the 12 scale bytes at ``sb[o:]``.

    Sub-blocks 0-3 keep their low 6 bits in bytes j and j+4; sub-blocks 4-7 keep their low 4 bits
    in the nibbles of byte j+4 and their top 2 bits in the top bits of bytes j-4 and j.
    """
    if j < 4:
        return np.int32(sb[o + j] & 63), np.int32(sb[o + j + 4] & 63)
    sc = (sb[o + j + 4] & 0xF) | ((sb[o + j - 4] >> 6) << 4)
    m = (sb[o + j + 4] >> 4) | ((sb[o + j] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(nmax, x, weights, L, Laux, rmin, rdelta, nstep):
    """Weighted (scale, min) fit of ``x`` to levels 0..nmax, as ggml's ``make_qkx2_quants`` (no MAD).

    Fills ``L`` with the chosen levels and returns ``(scale, -min)``. It tries ``nstep+1`` scales
    around ``nmax/(max-min)`` and keeps the least-squares (scale, min) of the best one.
    """
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > _F0:
        mn = _F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F0, -mn
    fnmax = np.float32(nmax)
    iscale = fnmax / (mx - mn)
    scale = _F1 / iscale
    best_error = _F0
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, l))
        diff = scale * np.float32(L[i]) + mn - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fnmax) / (mx - mn)
        sum_l = _F0
        sum_l2 = _F0
        sum_xl = _F0
        for i in range(n):
            l = nearest_int(iscale * (x[i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = np.float32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _F0:
                this_min = _F0
                this_scale = sum_xl / sum_l2
            cur_error = _F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True, error_model="numpy")
def quantize_superblock_kx(x, nmax, rmin, nstep, L, dst, o):
    """The Q4_K/Q5_K super-block procedure shared by ``quantize_row_q{4,5}_K_ref``.

    Fits every 32-value sub-block with ``make_qkx2_quants`` (weights av_x + |x|), quantizes the
    eight scales and mins to 6 bits relative to their maxima, writes f16 d, f16 dmin and the 12
    packed scale bytes at ``dst[o:o+16]`` and leaves the final levels (0..nmax) in ``L``.
    """
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    weights = np.empty(32, np.float32)
    Laux = np.empty(32, np.uint8)
    max_scale = _F0
    max_min = _F0
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = _F0
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        sc, mn = make_qkx2_quants(nmax, xs, weights, L[32 * j : 32 * j + 32], Laux, rmin, np.float32(0.1), nstep)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = _F63 / max_scale if max_scale > _F0 else _F0
    inv_min = _F63 / max_min if max_min > _F0 else _F0
    sb = o + 4
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            dst[sb + j] = ls
            dst[sb + j + 4] = lm
        else:
            dst[sb + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            dst[sb + j - 4] |= (ls >> 4) << 6
            dst[sb + j] |= (lm >> 4) << 6
    dh = f32_to_f16_bits(max_scale / _F63)
    mh = f32_to_f16_bits(max_min / _F63)
    dst[o] = dh & 0xFF
    dst[o + 1] = dh >> 8
    dst[o + 2] = mh & 0xFF
    dst[o + 3] = mh >> 8
    fd = f16_bits_to_f32(dh)
    fdmin = f16_bits_to_f32(mh)
    for j in range(8):
        sc, m = get_scale_min(dst, sb, j)
        d = fd * np.float32(sc)
        if d == _F0:
            continue  # levels from make_qkx2_quants stay, as in ggml
        dm = fdmin * np.float32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(cache=True, error_model="numpy")
def check_row(n, nbytes, type_size):
    """Raise QwenliteError unless ``n`` values are whole super-blocks and ``nbytes`` holds them.

    Kernels index raw bytes without bounds checks, so a short buffer must be refused up front.
    """
    if n % 256 != 0:
        raise QwenliteError("k-quant row length must be a multiple of 256")
    if nbytes < (n // 256) * type_size:
        raise QwenliteError("k-quant buffer is shorter than the row it should hold")


@njit(cache=True, error_model="numpy")
def check_q8k(n, ad, asum):
    """Raise QwenliteError unless the Q8_K scale and 16-sum arrays cover ``n`` activations."""
    if ad.shape[0] < n // 256 or asum.shape[0] < n // 16:
        raise QwenliteError("Q8_K activation row is missing scales or block sums")


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Q4_K bytes -> float32, bitwise equal to ``gguf.quants.dequantize`` and ggml."""
    n = dst.shape[0]
    check_row(n, src.shape[0], TYPE_SIZE)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        d = f16_bits_to_f32(np.int32(src[o]) | (np.int32(src[o + 1]) << 8))
        dmin = f16_bits_to_f32(np.int32(src[o + 2]) | (np.int32(src[o + 3]) << 8))
        for c in range(4):
            sc1, m1 = get_scale_min(src, o + 4, 2 * c)
            sc2, m2 = get_scale_min(src, o + 4, 2 * c + 1)
            d1 = d * np.float32(sc1)
            dm1 = dmin * np.float32(m1)
            d2 = d * np.float32(sc2)
            dm2 = dmin * np.float32(m2)
            q = o + 16 + 32 * c
            y = i * 256 + 64 * c
            for l in range(32):
                dst[y + l] = d1 * np.float32(src[q + l] & 0xF) - dm1
            for l in range(32):
                dst[y + 32 + l] = d2 * np.float32(src[q + l] >> 4) - dm2


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> Q4_K bytes, byte-identical to ggml's ``quantize_row_q4_K_ref``."""
    n = src.shape[0]
    check_row(n, dst.shape[0], TYPE_SIZE)
    L = np.empty(256, np.uint8)
    for i in range(n // 256):
        o = i * TYPE_SIZE
        quantize_superblock_kx(src[i * 256 : i * 256 + 256], 15, np.float32(-1.0), 20, L, dst, o)
        for c in range(4):
            for l in range(32):
                dst[o + 16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


_I32 = ir.IntType(32)
_V8I32 = ir.VectorType(_I32, 8)
_V16I32 = ir.VectorType(_I32, 16)
_V32I8 = ir.VectorType(ir.IntType(8), 32)
_ZERO8 = ir.Constant(_V8I32, [0] * 8)


def _const32(value, lanes=32):
    return ir.Constant(ir.VectorType(ir.IntType(8), lanes), [value] * lanes)


def row_dot_k(type_size, d_at, dmin_at, sums):
    """Build the row dot intrinsic of a K-quant format:
    ``(w, aqs, ads, asums, nb) -> (float32,) * n`` for ``n`` Q8_K activation rows given as tuples.

    ``sums(context, builder, wty, w, o, toks)`` emits the integer sums of super-block ``o``
    against each activation row of ``toks`` (``(aq, ao, asum, so)`` tuples of (type, value)
    pairs): a list of ``(sum sc*dot, sum m*bsum or None)`` int32 pairs. The f16 ``d`` (and
    ``dmin`` when ``dmin_at`` is not None) sit at those byte offsets of the super-block.

    The row is one IR loop over super-blocks; per row it accumulates
    d_w*d_a*sumi - dmin_w*d_a*summ in float64, exactly like ggml's per-super-block float step.
    The weight bits are unpacked once per super-block for all ``n`` rows (prefill).
    """

    @intrinsic
    def dot(typingctx, w, aqs, ads, asums, nb):  # noqa: ARG001 - signature fixed by numba
        ok = (
            isinstance(w, types.Array) and w.dtype == types.uint8
            and act_rows_ok(aqs, ads, asums) and isinstance(nb, types.Integer)
        )
        if not ok:
            return None
        n = aqs.count

        def codegen(context, builder, sig, args):
            wty, w = sig.args[0], args[0]
            aq, ad, asum = (
                list(zip((ty.dtype,) * n, cgutils.unpack_tuple(builder, val, n), strict=True))
                for ty, val in zip(sig.args[1:4], args[1:4], strict=True)
            )
            intp = context.get_value_type(types.intp)
            f64 = ir.DoubleType()
            nb = context.cast(builder, args[4], sig.args[4], types.intp)
            totals = [cgutils.alloca_once_value(builder, ir.Constant(f64, 0.0)) for _ in range(n)]
            with cgutils.for_range(builder, nb) as loop:
                i = loop.index
                o = builder.mul(i, ir.Constant(intp, type_size))
                ao = builder.mul(i, ir.Constant(intp, 256))
                so = builder.mul(i, ir.Constant(intp, 16))
                toks = [((*aq[t], ao), (*asum[t], so)) for t in range(n)]
                dw = f16_to_f32(builder, load_at(context, builder, wty, w, o, ir.IntType(16), d_at))
                if dmin_at is not None:
                    mw = f16_to_f32(builder, load_at(context, builder, wty, w, o, ir.IntType(16), dmin_at))
                for t, (sumi, summ) in enumerate(sums(context, builder, wty, w, o, toks)):
                    da = load_at(context, builder, *ad[t], i, ir.FloatType())
                    acc = builder.fadd(
                        builder.load(totals[t]),
                        builder.fmul(builder.fpext(builder.fmul(dw, da), f64), builder.sitofp(sumi, f64)),
                    )
                    if summ is not None:
                        term = builder.fmul(builder.fpext(builder.fmul(mw, da), f64), builder.sitofp(summ, f64))
                        acc = builder.fsub(acc, term)
                    builder.store(acc, totals[t])
            results = [builder.fptrunc(builder.load(tot), ir.FloatType()) for tot in totals]
            return context.make_tuple(builder, sig.return_type, results)

        return types.UniTuple(types.float32, n)(w, aqs, ads, asums, nb), codegen

    return dot


def load_ref(context, builder, ref, vecty, extra=0):
    """``load_at`` for an (array type, array value, intp element offset) triple."""
    return load_at(context, builder, *ref, vecty, extra)


def kx_words(builder, u0, u1, u2):
    """The 6-bit scales and mins packed in three little-endian 32-bit words (an i32 each, or 8 x i32
    lane-wise for the interleaved layout), as four words of one byte per sub-block.

    Same unpacking as ``get_scale_min``: bytes 0-3 hold scales 0-3 (and the top bits of scales
    4-7), bytes 4-7 mins 0-3 (and the top bits of mins 4-7), bytes 8-11 the low nibbles of scales
    4-7 (low) and mins 4-7 (high). Returns (scales 0-3, scales 4-7, mins 0-3, mins 4-7).
    """
    lanes = u0.type.count if isinstance(u0.type, ir.VectorType) else None

    def c(v):
        return ir.Constant(u0.type, v if lanes is None else [v] * lanes)

    sc_lo = builder.and_(u0, c(0x3F3F3F3F))
    m_lo = builder.and_(u1, c(0x3F3F3F3F))
    top_sc = builder.shl(builder.and_(builder.lshr(u0, c(6)), c(0x03030303)), c(4))
    top_m = builder.shl(builder.and_(builder.lshr(u1, c(6)), c(0x03030303)), c(4))
    sc_hi = builder.or_(builder.and_(u2, c(0x0F0F0F0F)), top_sc)
    m_hi = builder.or_(builder.and_(builder.lshr(u2, c(4)), c(0x0F0F0F0F)), top_m)
    return sc_lo, sc_hi, m_lo, m_hi


def kx_scales_mins(context, builder, wty, w, sb):
    """The eight 6-bit scales and mins packed in the 12 bytes at ``w[sb:]``, as two 8 x i32 vectors."""
    words = (load_at(context, builder, wty, w, sb, _I32, 4 * k) for k in range(3))
    sc_lo, sc_hi, m_lo, m_hi = kx_words(builder, *words)

    def widen(lo, hi):
        pair = ir.Constant(ir.VectorType(_I32, 2), None)
        pair = builder.insert_element(pair, lo, ir.Constant(_I32, 0))
        pair = builder.insert_element(pair, hi, ir.Constant(_I32, 1))
        return builder.zext(builder.bitcast(pair, ir.VectorType(ir.IntType(8), 8)), _V8I32)

    return widen(sc_lo, sc_hi), widen(m_lo, m_hi)


def kx_byte(builder, words, j):
    """Lane-wise byte ``j`` (0-7) of the (low, high) pair of 8 x i32 words from ``kx_words``."""
    word = words[j // 4]
    shifted = builder.lshr(word, ir.Constant(_V8I32, [8 * (j % 4)] * 8))
    return builder.and_(shifted, ir.Constant(_V8I32, [0xFF] * 8))


def kx_min_term(context, builder, bsums, mins):
    """sum_j m_j * (bsum[2j] + bsum[2j+1]) over the 16 activation sums ``bsums`` (a type/value/offset triple)."""
    bs = load_ref(context, builder, bsums, _V16I32)
    even = builder.shuffle_vector(bs, bs, ir.Constant(_V8I32, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(bs, bs, ir.Constant(_V8I32, list(range(1, 16, 2))))
    return reduce_add(builder, builder.mul(builder.add(even, odd), mins))


def kx_sums(values):
    """The ``sums`` emitter of ``row_dot_k`` for Q4_K/Q5_K: ``values(context, builder, wty, w, o, c)``
    gives the two 32-value vectors (sub-blocks 2c and 2c+1) of 64-value chunk c.

    Each sub-block's products accumulate per lane (``lane_dots``), get the sub-block scale as a
    lane-wise int32 multiply and are reduced once per super-block; the mins term reuses the
    activation's 16-value sums. Bounds: |sum| <= 8*32*31*63*128 < 2**31.
    """

    def sums(context, builder, wty, w, o, toks):
        scales, mins = kx_scales_mins(context, builder, wty, w, builder.add(o, ir.Constant(o.type, 4)))
        accs = [_ZERO8] * len(toks)
        for c in range(4):
            chunk = values(context, builder, wty, w, o, c)
            for j, v in enumerate(chunk):
                sc = broadcast(builder, scales, [2 * c + j] * 8)
                for t, (a, _) in enumerate(toks):
                    av = load_ref(context, builder, a, _V32I8, 64 * c + 32 * j)
                    accs[t] = builder.add(accs[t], builder.mul(lane_dots(builder, v, av, _ZERO8), sc))
        return [
            (reduce_add(builder, acc), kx_min_term(context, builder, bs, mins))
            for acc, (_, bs) in zip(accs, toks, strict=True)
        ]

    return sums


def _values(context, builder, wty, w, o, c):
    wv = load_at(context, builder, wty, w, o, _V32I8, 16 + 32 * c)
    return builder.and_(wv, _const32(15)), builder.lshr(wv, _const32(4))


dot_rows = row_dot_k(TYPE_SIZE, 0, 2, kx_sums(_values))

FIELDS = ((0, 2), (2, 2), (4, 12), (16, 128))


def kx_sums_x8(values):
    """The ``row_dot_x8`` emitter for Q4_K/Q5_K (interleaved layout: lanes are rows).

    ``values(blk, c, i)`` gives the two 32-byte vectors of unit ``i`` (0-7) of 64-value chunk
    ``c``: lane r holds values 4i..4i+3 of sub-blocks 2c and 2c+1 of row r, which pair with the
    broadcast activation bytes 64c+4i and 64c+32+4i. Each sub-block's dots accumulate in one
    vector, get the per-row sub-block scale lane-wise, and the mins term is the per-row mins times
    the activation's 16-value sums: the integers of ``kx_sums``, so results are bit-identical.
    """

    def emit(blk, n):
        b = blk.builder
        d, dmin = (f16_to_f32(b, blk.halves(off)) for off in (0, 2))
        sc_lo, sc_hi, m_lo, m_hi = kx_words(b, *(blk.words(4, k) for k in range(3)))
        isum = [_ZERO8] * n
        for c in range(4):
            accs = [[_ZERO8] * n, [_ZERO8] * n]
            for i in range(8):
                for j, v in enumerate(values(blk, c, i)):
                    for t in range(n):
                        accs[j][t] = lane_dots(b, v, blk.act(t, 64 * c + 32 * j + 4 * i), accs[j][t])
            for j in range(2):
                sc = kx_byte(b, (sc_lo, sc_hi), 2 * c + j)
                for t in range(n):
                    isum[t] = b.add(isum[t], b.mul(accs[j][t], sc))
        out = []
        for t in range(n):
            msum = _ZERO8
            for j in range(8):
                pair = b.add(blk.bsum(t, 2 * j), blk.bsum(t, 2 * j + 1))
                msum = b.add(msum, b.mul(kx_byte(b, (m_lo, m_hi), j), splat(b, pair, _V8I32)))
            out.append([(d, isum[t], False), (dmin, msum, True)])
        return out

    return emit


def _values_x8(blk, c, i):
    wv = blk.unit(16, 8 * c + i)
    return blk.builder.and_(wv, _const32(15)), blk.builder.lshr(wv, _const32(4))


dot_rows_x8 = row_dot_x8(FIELDS, TYPE_SIZE, 256, 16, kx_sums_x8(_values_x8))


@njit(cache=True, error_model="numpy")
def dot_row(w, aq, ad, asum):
    """One Q4_K row . one Q8_K activation row, integer sums per super-block like ggml.

    Per super-block: d_w*d_a*sum_j sc_j*(q_w . q_a)_j - dmin_w*d_a*sum_j m_j*bsum_j, both integer
    sums formed in SIMD registers (``kx_sums``), the nibbles split in registers from one 32-byte
    load per 64 values.
    """
    n = aq.shape[0]
    check_row(n, w.shape[0], TYPE_SIZE)
    check_q8k(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 256)[0]
