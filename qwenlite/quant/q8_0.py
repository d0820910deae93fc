"""Q8_0 (ggml type 8): 32-value blocks of int8 quants with one f16 scale.

Block layout (34 bytes): f16 ``d``, 32 x int8 ``q``; value ``x = d*q``.

This module also holds the small pieces the other 32-value ("legacy") formats share with it:
block-size checks, little-endian f16 fields, C's ``roundf`` / float-to-int8 conversions that
ggml's reference quantizers rely on, and the 32-value integer block dot products
(``dot_q8_block``, ``dot_q4_block``, ``dot_q5_block``).

The block dots are Numba intrinsics that emit LLVM vector IR directly: load 32 weight values
(unpacking nibbles and fifth bits in registers), widen, multiply by the 32 int8 activations and
reduce. A plain Numba loop over a fixed 32-value block gets fully unrolled into scalar code before
LLVM's loop vectorizer sees it; the explicit vector form compiles to a handful of SIMD
instructions (``vpdpbusd`` on AVX-512 VNNI, ``pmaddwd`` on AVX2, NEON on ARM) and made the dot
kernels 3-6x faster. The quantizer reproduces ``quantize_row_q8_0_ref`` in strict
float32 (no fastmath): ``d = amax/127``, ``q = roundf(x * (1/d))``.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits
from qwenlite.quant.interleave import act_rows_ok, row_dot_x8, splat

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


_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_V16I8 = ir.VectorType(_I8, 16)
_V32I8 = ir.VectorType(_I8, 32)
_V32I32 = ir.VectorType(_I32, 32)


def _load_vector(context, builder, aryty, ary, offty, off, vecty):
    """Unaligned load of ``vecty`` from ``ary`` at element offset ``off`` (no bounds check)."""
    data = context.make_array(aryty)(context, builder, ary).data
    ptr = builder.gep(data, [context.cast(builder, off, offty, types.intp)])
    return builder.load(builder.bitcast(ptr, vecty.as_pointer()), align=1, typ=vecty)


def target_features() -> frozenset[str]:
    """The CPU features Numba compiles for (``NUMBA_CPU_FEATURES`` if set, else the host's)."""
    flat = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return frozenset(f[1:] for f in flat.split(",") if f.startswith("+"))


def simd_isa(features: frozenset[str]) -> str:
    """Which u8 x i8 dot instruction ``lane_dots`` emits for a target with ``features``.

    "vnni": ``vpdpbusd`` (AVX-512 VNNI with VL, or AVX-VNNI); "avx2": ``vpmaddubsw`` + ``vpmaddwd``;
    "generic": portable widening multiplies that LLVM lowers for any target (NEON, SSE, ...).
    """
    if "avxvnni" in features or {"avx512vnni", "avx512vl"} <= features:
        return "vnni"
    if "avx2" in features:
        return "avx2"
    return "generic"


SIMD_ISA = simd_isa(target_features())

_V8I32 = ir.VectorType(_I32, 8)
_V16I16 = ir.VectorType(ir.IntType(16), 16)


def lane_dots(builder, wv, av, acc, isa=SIMD_ISA, signed=False):
    """``acc`` (8 x i32) plus, in lane i, sum_{k<4} w[4i+k]*a[4i+k] for 32 ``wv`` and signed ``av``.

    Unsigned weights must be at most 127 so that the AVX2 path's saturating 16-bit pair sums
    cannot clip (2*127*128 < 2**15). ``signed`` weights go through the u8 x i8 instructions as
    |w| times a with w's sign (``vpsignb``), which needs activations above -128, as every
    activation quantizer here produces (|q| <= 127). Lane i covers bytes 4i..4i+3 on every path,
    so callers may give the lower and upper halves (bytes 0-15, 16-31) different scales.
    """
    if signed and isa != "generic":
        psign = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]), "llvm.x86.avx2.psign.b"
        )
        absb = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V32I8, [_V32I8, ir.IntType(1)]), "llvm.abs.v32i8"
        )
        av = builder.call(psign, [av, wv])
        wv = builder.call(absb, [wv, ir.Constant(ir.IntType(1), 0)])
        signed = False
    if isa == "vnni":
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I32, [_V8I32] * 3), "llvm.x86.avx512.vpdpbusd.256"
        )
        return builder.call(fn, [acc, builder.bitcast(wv, _V8I32), builder.bitcast(av, _V8I32)])
    if isa == "avx2":
        maddubs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16I16, [_V32I8, _V32I8]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8I32, [_V16I16, _V16I16]), "llvm.x86.avx2.pmadd.wd"
        )
        pairs = builder.call(maddubs, [wv, av])
        return builder.add(acc, builder.call(maddwd, [pairs, ir.Constant(_V16I16, [1] * 16)]))
    wide = builder.sext(wv, _V32I32) if signed else builder.zext(wv, _V32I32)
    prod = builder.mul(wide, builder.sext(av, _V32I32))
    for k in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, ir.Constant(_V8I32, [4 * i + k for i in range(8)])))
    return acc


def broadcast(builder, vec, lanes):
    """An 8 x i32 vector whose lane i is ``vec[lanes[i]]`` (lanes: 8 constant indices)."""
    return builder.shuffle_vector(vec, vec, ir.Constant(_V8I32, list(lanes)))


def reduce_add(builder, vec):
    """Sum of the lanes of an integer vector, in its element type."""
    name = f"llvm.vector.reduce.add.v{vec.type.count}i{vec.type.element.width}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec.type.element, [vec.type]), name)
    return builder.call(fn, [vec])


def load_at(context, builder, aryty, ary, off, vecty, extra=0):
    """Unaligned load of ``vecty`` from array ``ary`` (numba type ``aryty``) at the intp element
    offset ``off + extra``."""
    intp = context.get_value_type(types.intp)
    if extra:
        off = builder.add(off, ir.Constant(intp, extra))
    return _load_vector(context, builder, aryty, ary, types.intp, off, vecty)


_F32T = ir.FloatType()
_F64T = ir.DoubleType()


def f16_to_f32(builder, bits):
    """IR: the float32 value of the f16 bit pattern ``bits`` (i16, or a vector of i16 lane-wise), exact
    for every pattern.

    Integer-only for normal, infinite and NaN halves (rebias the exponent by 112); subnormal
    halves are their mantissa times 2**-24, a product of normal floats. Two faster-looking forms
    lose here: ``fpext half`` (vcvtph2ps) is lowered with a vpinsrw into whatever register is
    free, a false dependency that chained each block's scale to the previous block's accumulator
    (about 3x slower row loops), and the multiply-by-2**112 decode of ``halfprec`` feeds float32
    subnormals to the multiplier for small scales (K-quant mins), which costs a microcode assist.
    """

    lanes = bits.type.count if isinstance(bits.type, ir.VectorType) else None
    i32, f32 = (_I32, _F32T) if lanes is None else (ir.VectorType(_I32, lanes), ir.VectorType(_F32T, lanes))

    def c(v, ty=i32):
        return ir.Constant(ty, v if lanes is None else [v] * lanes)

    hb = builder.zext(bits, i32)
    sign = builder.shl(builder.and_(hb, c(0x8000)), c(16))
    em = builder.and_(hb, c(0x7FFF))
    body = builder.shl(em, c(13))
    normal = builder.add(body, c(112 << 23))
    special = builder.or_(body, c(0x7F800000))
    tiny = builder.bitcast(builder.fmul(builder.sitofp(em, f32), c(2.0**-24, f32)), i32)
    out = builder.select(builder.icmp_unsigned("<", em, c(0x0400)), tiny, normal)
    out = builder.select(builder.icmp_unsigned(">=", em, c(0x7C00)), special, out)
    return builder.bitcast(builder.or_(out, sign), f32)


def nibbles(builder, packed):
    """16 packed bytes -> 32 values: low nibbles are values 0..15, high nibbles values 16..31."""
    lo = builder.and_(packed, ir.Constant(_V16I8, [15] * 16))
    hi = builder.lshr(packed, ir.Constant(_V16I8, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_V32I32, list(range(32))))


def fifth_bits(builder, qh, values):
    """``values`` with 16 added to value j wherever bit j of the i32 ``qh`` is set."""
    bits = builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32))
    fifth = builder.select(bits, ir.Constant(_V32I8, [16] * 32), ir.Constant(_V32I8, [0] * 32))
    return builder.or_(values, fifth)


_V4F64 = ir.VectorType(_F64T, 4)


def _fmuladd(builder, a, b, c):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V4F64, [_V4F64] * 3), "llvm.fmuladd.v4f64"
    )
    return builder.call(fn, [a, b, c])


def _check_dot_args(w, a):
    return (
        isinstance(w, types.Array)
        and isinstance(a, types.Array)
        and w.dtype in (types.uint8, types.int8)
        and a.dtype == types.int8
    )


def row_dot(type_size, values, min_at=None):
    """Build the row dot intrinsic of a 32-value block format:
    ``(w, aqs, ads, asums, nb) -> (float32,) * n`` for ``n`` activation rows given as tuples.

    ``values(context, builder, wty, w, o) -> (vector, signed)`` gives block ``o``'s 32 weight
    integers as an i8 vector (the f16 scale ``d`` is at ``w[o]``), offsets already applied (Q4_0
    gives q-8: centred values keep each lane's partial sum small, where q*a and -8*sum(a) kept in
    separate float32 lanes cancelled only at the end of the row and lost precision on real
    activations with outliers); ``min_at`` is the byte offset of an f16 minimum ``m`` in the
    block (Q5_1: ``x = d*q + m``), whose term m*d_a*sum(a) is accumulated in float64.

    The whole row is one IR loop: per block, ``lane_dots`` gives 8 int32 lanes per activation
    row, folded exactly to 4, converted and scaled by d_w*d_a into 4 float64 accumulators per row
    (two sets, alternating blocks, so the adds do not wait on each other). float64 as in the
    previous scalar kernels: float32 lanes moved top-1 logits at near-ties on the real model.
    Only the end of the row reduces across lanes. Each weight block is unpacked once for all
    ``n`` rows, which is what makes prefill compute-efficient.
    """

    @intrinsic
    def dot(typingctx, w, aqs, ads, asums, nb):  # noqa: ARG001 - signature fixed by numba
        ok = (
            isinstance(w, types.Array) and w.dtype in (types.uint8, types.int8)
            and act_rows_ok(aqs, ads, asums) and isinstance(nb, types.Integer)
        )
        if not ok:
            return None
        n = aqs.count

        def codegen(context, builder, sig, args):
            wty = sig.args[0]
            w = args[0]
            rows = [
                list(zip((ty.dtype,) * n, cgutils.unpack_tuple(builder, val, n), strict=True))
                for ty, val in zip(sig.args[1:4], args[1:4], strict=True)
            ]
            intp = context.get_value_type(types.intp)
            nb = context.cast(builder, args[4], sig.args[4], types.intp)
            zero = ir.Constant(_V4F64, [0.0] * 4)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(n)] for _ in range(2)]
            maccs = [cgutils.alloca_once_value(builder, ir.Constant(_F64T, 0.0)) for _ in range(n)]

            def block(i, acc):
                o = builder.mul(i, ir.Constant(intp, type_size))
                dw = f16_to_f32(builder, load_at(context, builder, wty, w, o, ir.IntType(16)))
                if min_at is not None:
                    mo = builder.add(o, ir.Constant(intp, min_at))
                    mw = f16_to_f32(builder, load_at(context, builder, wty, w, mo, ir.IntType(16)))
                wv, signed = values(context, builder, wty, w, o)
                for t in range(n):
                    da = load_at(context, builder, *rows[1][t], i, _F32T)
                    av = load_at(context, builder, *rows[0][t], builder.mul(i, ir.Constant(intp, 32)), _V32I8)
                    lanes = lane_dots(builder, wv, av, ir.Constant(_V8I32, [0] * 8), signed=signed)
                    halves = [ir.Constant(ir.VectorType(_I32, 4), list(range(k, k + 4))) for k in (0, 4)]
                    quads = builder.add(*(builder.shuffle_vector(lanes, lanes, h) for h in halves))
                    d = splat(builder, builder.fpext(builder.fmul(dw, da), _F64T), _V4F64)
                    builder.store(_fmuladd(builder, builder.sitofp(quads, _V4F64), d, builder.load(acc[t])), acc[t])
                    if min_at is not None:
                        bsum = load_at(context, builder, *rows[2][t], i, _I32)
                        m = builder.fpext(builder.fmul(mw, da), _F64T)
                        term = builder.fmul(m, builder.sitofp(bsum, _F64T))
                        builder.store(builder.fadd(builder.load(maccs[t]), term), maccs[t])

            two = ir.Constant(intp, 2)
            with cgutils.for_range(builder, builder.sdiv(nb, two)) as loop:
                i0 = builder.mul(loop.index, two)
                block(i0, accs[0])
                block(builder.add(i0, ir.Constant(intp, 1)), accs[1])
            odd = builder.icmp_signed("!=", builder.srem(nb, two), ir.Constant(intp, 0))
            with builder.if_then(odd):
                block(builder.sub(nb, ir.Constant(intp, 1)), accs[0])
            results = []
            for t in range(n):
                wide = builder.fadd(builder.load(accs[0][t]), builder.load(accs[1][t]))
                for width in (2, 1):
                    halves = [ir.Constant(ir.VectorType(_I32, width), list(range(k, k + width))) for k in (0, width)]
                    wide = builder.fadd(*(builder.shuffle_vector(wide, wide, h) for h in halves))
                result = builder.extract_element(wide, ir.Constant(_I32, 0))
                result = builder.fadd(result, builder.load(maccs[t]))
                results.append(builder.fptrunc(result, _F32T))
            return context.make_tuple(builder, sig.return_type, results)

        return types.UniTuple(types.float32, n)(w, aqs, ads, asums, nb), codegen

    return dot


def _q8_values(context, builder, wty, w, o):
    return load_at(context, builder, wty, w, o, _V32I8, 2), True


dot_rows = row_dot(TYPE_SIZE, _q8_values)


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
    """One Q8_0 row . one Q8_0 activation row: int32 sums per block, one float multiply-add per
    block (``row_dot``). ``asum`` is unused (Q8_0 has no offset term); it is part of the shared
    signature."""
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    return dot_rows(w, (aq,), (ad,), (asum,), n // 32)[0]


FIELDS = ((0, 2), (2, 32))

_ZERO8 = ir.Constant(_V8I32, [0] * 8)


def _words(value: int) -> ir.Constant:
    return ir.Constant(_V8I32, [value] * 8)


def nibble_units(builder, unit):
    """A 4-byte unit of 16-byte nibble data (8 x i32, lanes are rows) -> (low, high) nibbles as 8 x i32:
    for qs unit i these are values 4i..4i+3 and 16+4i..16+4i+3 of each row, one byte each."""
    low = builder.and_(unit, _words(0x0F0F0F0F))
    high = builder.and_(builder.lshr(unit, _words(4)), _words(0x0F0F0F0F))
    return low, high


def _byte_consts(values) -> ir.Constant:
    return ir.Constant(_V32I8, [v - 256 if v > 127 else v for v in values])


_VBMI = {"avx512vbmi", "avx512vl"} <= target_features()


def _fifth_bits_shuffled(builder, qh, first):
    """Bit 4 of byte k of each lane = bit ``first + k`` of the lane's ``qh`` (other bits: the
    caller masks them), for any target.

    The bit sits in byte ``first // 8`` of qh: a byte shuffle (within the lane) copies that byte
    into all four bytes of the lane and a mask keeps bit ``first % 8 + k`` in byte k, leaving 0 or
    a power of two per byte: +15 carries bits 0..3 into bit 4, ``min(x, 16)`` folds bits 4..7 onto it.
    """
    j, s = divmod(first, 8)
    qb = builder.bitcast(qh, _V32I8)
    rep = builder.shuffle_vector(qb, qb, ir.Constant(_V32I32, [4 * r + j for r in range(8) for _ in range(4)]))
    bit = builder.and_(rep, _byte_consts([1 << (s + k) for _ in range(8) for k in range(4)]))
    if s == 0:
        return builder.bitcast(builder.add(bit, _byte_consts([15] * 32)), _V8I32)
    sixteen = _byte_consts([16] * 32)
    return builder.bitcast(builder.select(builder.icmp_unsigned("<", bit, sixteen), bit, sixteen), _V8I32)


def _fifth_bits_multishift(builder, qh):
    """Bit 4 of byte k of each lane = bit ``first + k`` of the lane's ``qh``, for first = 0, 4, ..., 28,
    in one ``vpmultishiftqb`` each (AVX-512 VBMI): it rotates each 64-bit pair of lanes right by a
    per-byte count and keeps the low byte, so count ``32*(r % 2) + first + k - 4`` puts row r's bit
    at bit 4. The other bits are neighbours' bits; the caller masks them."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V32I8, [_V32I8, _V32I8]), "llvm.x86.avx512.pmultishift.qb.256"
    )
    qb = builder.bitcast(qh, _V32I8)

    def bits(first):
        counts = [(32 * (r % 2) + first + k - 4) % 64 for r in range(8) for k in range(4)]
        return builder.bitcast(builder.call(fn, [_byte_consts(counts), qb]), _V8I32)

    return bits


def five_bit_units(builder, qh, qs, vbmi=_VBMI):
    """The 32 five-bit values (0..31) of a block for 8 rows, as ``legacy_x8`` units.

    ``qh`` is the fifth-bit word of each row (8 x i32), ``qs`` the four 4-byte units of nibbles.
    qs unit i gives values 4i..4i+3 (low nibbles, fifth bits 4i.. of qh) and 16+4i..16+4i+3
    (high nibbles, fifth bits 16+4i..). Spreading qh's bits one per byte is most of the work: one
    ``vpmultishiftqb`` per unit where the target has AVX-512 VBMI, else a shuffle and two byte ops.
    """
    spread = _fifth_bits_multishift(builder, qh) if vbmi else lambda first: _fifth_bits_shuffled(builder, qh, first)
    units = []
    for i, unit in enumerate(qs):
        for nib, first in ((unit, 4 * i), (builder.lshr(unit, _words(4)), 16 + 4 * i)):
            five = builder.and_(spread(first), _words(0x10101010))
            units.append((builder.bitcast(builder.or_(builder.and_(nib, _words(0x0F0F0F0F)), five), _V32I8), first))
    return units


_F16C = "f16c" in target_features()


def f16_lanes_to_f32(builder, bits):
    """IR: a vector of f16 bit patterns (i16 lanes) -> float32 lanes, exact: one ``vcvtph2ps`` where the target has
    F16C, else the integer decode of ``f16_to_f32``.

    The vector conversion writes a whole register from a load, so it has none of the false
    dependency that made the scalar ``fpext half`` slow, and it costs one instruction where the
    integer decode costs a dozen per block, a large share of a 32-value block's work.
    """
    if not _F16C:
        return f16_to_f32(builder, bits)
    lanes = bits.type.count
    return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(_F32T, lanes))


def legacy_x8(fields, type_size, values, offset, min_at=None, isa=SIMD_ISA):
    """Build ``dot_rows_x8`` (see ``interleave.row_dot_x8``) for a 32-value format.

    ``values(blk)`` gives the block's weights as ``(units, signed)``: ``units`` a list of
    ``(vector, k)``, a 32-byte vector whose lane r holds 4 values of row r that pair with
    activation bytes ``k..k+3``, together covering the 32 values once; ``signed`` says they are
    int8 (else unsigned, at most 127 unless ``lane_dots`` is VNNI). The format's integer value is
    the vector's minus ``offset``, so per block and activation row the integer dot is
    ``sum q*a - offset*asum``, exact in int32, starting its accumulator at ``-offset*asum``.
    The float part is ``row_dot``'s: ``d_w*d_a*isum`` in float64 per block, plus
    ``m_w*d_a*asum`` when the block has an f16 minimum at byte ``min_at`` (Q5_1).

    Two accumulator chains per activation row halve the dependent ``vpdpbusd`` chain (12% faster
    than one for a single token; four gain nothing). The integers equal the row-major kernels';
    the float64 sums differ only in the order of the adds.
    """

    def emit(blk, n):
        b = blk.builder
        d = f16_lanes_to_f32(b, blk.halves(0))
        m = f16_lanes_to_f32(b, blk.halves(min_at)) if min_at is not None else None
        units, signed = values(blk)
        out = []
        for t in range(n):
            bsum = blk.bsum(t, 0)
            start = splat(b, b.mul(bsum, ir.Constant(_I32, -offset)), _V8I32) if offset else _ZERO8
            chains = [start, _ZERO8]
            for j, (v, k) in enumerate(units):
                chains[j % 2] = lane_dots(b, v, blk.act(t, k), chains[j % 2], isa=isa, signed=signed)
            terms = [(d, b.add(*chains), False)]
            if m is not None:
                terms.append((m, splat(b, bsum, _V8I32), False))
            out.append(terms)
        return out

    return row_dot_x8(fields, type_size, 32, 1, emit)


def q8_x8(isa=SIMD_ISA):
    """Q8_0's ``dot_rows_x8`` for the ``lane_dots`` instruction set ``isa``.

    With VNNI the int8 weights go in as ``q xor 0x80`` = q+128 (unsigned, the 8-bit range
    ``vpdpbusd`` takes without saturating) and the block pays -128*asum once; the AVX2 pair sums
    would saturate on values above 127, so there they go in signed (``vpsignb``).
    """
    offset = 128 if isa == "vnni" else 0

    def values(blk):
        units = [blk.unit(2, u) for u in range(8)]
        if offset:
            units = [blk.builder.xor(v, ir.Constant(_V32I8, [-128] * 32)) for v in units]
        return [(v, 4 * u) for u, v in enumerate(units)], not offset

    return legacy_x8(FIELDS, TYPE_SIZE, values, offset, isa=isa)


dot_rows_x8 = q8_x8()
