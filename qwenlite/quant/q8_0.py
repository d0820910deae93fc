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
from numba.core import cgutils
from numba.extending import intrinsic

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant.halfprec import f16_bits_to_f32, f32_to_f16_bits

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


def _nibbles(builder, packed):
    """16 packed bytes -> 32 values: low nibbles are values 0..15, high nibbles values 16..31."""
    lo = builder.and_(packed, ir.Constant(_V16I8, [15] * 16))
    hi = builder.lshr(packed, ir.Constant(_V16I8, [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_V32I32, list(range(32))))


def _sum_products(builder, wv, av, w_signed):
    """sum_j w_j * a_j over 32 lanes in int32 (|sum| <= 32*128*128, no overflow)."""
    wide_w = builder.sext(wv, _V32I32) if w_signed else builder.zext(wv, _V32I32)
    prod = builder.mul(wide_w, builder.sext(av, _V32I32))
    reduce_add = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_I32, [_V32I32]), "llvm.vector.reduce.add.v32i32"
    )
    return builder.call(reduce_add, [prod])


def _check_dot_args(w, a):
    return (
        isinstance(w, types.Array)
        and isinstance(a, types.Array)
        and w.dtype in (types.uint8, types.int8)
        and a.dtype == types.int8
    )


@intrinsic
def dot_q8_block(typingctx, w, wo, a, ao):  # noqa: ARG001 - signature fixed by numba
    """sum_{j<32} int8(w[wo+j]) * a[ao+j] as int32: the Q8_0 block dot."""
    if not _check_dot_args(w, a):
        return None

    def codegen(context, builder, sig, args):
        wv = _load_vector(context, builder, sig.args[0], args[0], sig.args[1], args[1], _V32I8)
        av = _load_vector(context, builder, sig.args[2], args[2], sig.args[3], args[3], _V32I8)
        return _sum_products(builder, wv, av, True)

    return types.int32(w, wo, a, ao), codegen


@intrinsic
def dot_q4_block(typingctx, w, wo, a, ao):  # noqa: ARG001 - signature fixed by numba
    """sum_{j<32} q_j * a[ao+j] for the 32 unsigned nibbles packed in w[wo:wo+16] (legacy order)."""
    if not _check_dot_args(w, a):
        return None

    def codegen(context, builder, sig, args):
        packed = _load_vector(context, builder, sig.args[0], args[0], sig.args[1], args[1], _V16I8)
        av = _load_vector(context, builder, sig.args[2], args[2], sig.args[3], args[3], _V32I8)
        return _sum_products(builder, _nibbles(builder, packed), av, False)

    return types.int32(w, wo, a, ao), codegen


@intrinsic
def dot_q5_block(typingctx, w, wo, a, ao):  # noqa: ARG001 - signature fixed by numba
    """sum_{j<32} q_j * a[ao+j] for a Q5 block body at w[wo:]: little-endian uint32 ``qh`` (bit j
    adds 16 to value j), then 16 bytes of nibbles (legacy order). Values are 0..31."""
    if not _check_dot_args(w, a):
        return None

    def codegen(context, builder, sig, args):
        qh = _load_vector(context, builder, sig.args[0], args[0], sig.args[1], args[1], _I32)
        intp = context.get_value_type(types.intp)
        qs_off = builder.add(context.cast(builder, args[1], sig.args[1], types.intp), ir.Constant(intp, 4))
        packed = _load_vector(context, builder, sig.args[0], args[0], types.intp, qs_off, _V16I8)
        av = _load_vector(context, builder, sig.args[2], args[2], sig.args[3], args[3], _V32I8)
        bits = builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32))
        fifth = builder.select(bits, ir.Constant(_V32I8, [16] * 32), ir.Constant(_V32I8, [0] * 32))
        return _sum_products(builder, builder.or_(_nibbles(builder, packed), fifth), av, False)

    return types.int32(w, wo, a, ao), codegen


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
    """One Q8_0 row . one Q8_0 activation row: int32 sums per block, one float multiply per block.

    ``asum`` is unused (Q8_0 has no offset term); it is part of the shared signature.
    """
    n = aq.shape[0]
    check_blocks(n, w.shape[0], TYPE_SIZE)
    check_q8_0(n, ad, asum)
    total = 0.0
    for i in range(n // 32):
        o = i * TYPE_SIZE
        s = dot_q8_block(w, o + 2, aq, i * 32)
        total += np.float64(load_f16(w, o) * ad[i]) * np.float64(s)
    return np.float32(total)
