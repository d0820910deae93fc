"""IEEE half (f16) and bfloat16 conversions as bit patterns, usable inside Numba kernels.

Every quant block carries f16 scales, and ggml's reference quantizers round them with
`ggml_compute_fp32_to_fp16` (portable software, ggml-impl.h): round to nearest even, subnormals
kept, overflow to inf -- the same result as x86 F16C and numpy's float16 cast for every non-NaN
input. For NaN the three differ; we follow ggml (canonical quiet NaN 0x7E00 with the sign), since
byte-identity with ggml is the goal. Done with integer arithmetic so the result never depends on
the CPU running qwenlite. bfloat16 follows ggml's software rounding
(`ggml_compute_fp32_to_bf16`: round to nearest even, NaN forced quiet, no subnormal flushing).

The reinterpreting casts between float32 and uint32 are LLVM bitcasts (`_f32_as_u32`,
`_u32_as_f32`) so they cost nothing in hot loops and need no temporary arrays.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _u32_as_f32(typingctx, bits):  # noqa: ARG001 - signature fixed by numba
    """Reinterpret an integer's low 32 bits as a float32 (LLVM bitcast)."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        as_u32 = context.cast(builder, args[0], signature.args[0], types.uint32)
        return builder.bitcast(as_u32, ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_as_u32(typingctx, value):  # noqa: ARG001 - signature fixed by numba
    """Reinterpret a float32 as its uint32 bit pattern (LLVM bitcast)."""
    if not isinstance(value, types.Float):
        return None
    sig = types.uint32(value)

    def codegen(context, builder, signature, args):
        as_f32 = context.cast(builder, args[0], signature.args[0], types.float32)
        return builder.bitcast(as_f32, ir.IntType(32))

    return sig, codegen


_TWO_POW_112 = np.float32(2.0**112)


@njit(cache=True)
def f32_as_u32(x: np.float32) -> np.uint32:
    """Bit pattern of a float32."""
    return _f32_as_u32(np.float32(x))


@njit(cache=True)
def u32_as_f32(bits: np.uint32) -> np.float32:
    """float32 with the given bit pattern."""
    return _u32_as_f32(np.uint32(bits))


@njit(cache=True)
def f32_to_f16_bits(x: np.float32) -> np.uint16:
    """Round a float32 to the nearest f16 (ties to even); NaN -> signed canonical NaN, as ggml."""
    bits = _f32_as_u32(np.float32(x))
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    mag = bits & np.uint32(0x7FFFFFFF)
    if mag > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if mag >= np.uint32(0x477FF000):
        # >= 65520 (half-way between 65504 and 2**16) rounds to infinity.
        return np.uint16(sign | np.uint32(0x7C00))
    if mag >= np.uint32(0x38800000):
        # Normal f16: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
        h = (mag >> np.uint32(13)) - np.uint32(112 << 10)
        rest = mag & np.uint32(0x1FFF)
        if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (h & np.uint32(1)) != 0):
            h += np.uint32(1)
        return np.uint16(sign | h)
    exp = mag >> np.uint32(23)
    if exp < np.uint32(102):
        # Below 2**-25: rounds to (signed) zero; this also covers f32 zeros and subnormals.
        return np.uint16(sign)
    # f16 subnormal: value = mant * 2**(exp-150), in units of 2**-24 that is mant >> (126 - exp).
    mant = (mag & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - exp
    h = mant >> shift
    rest = mant & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rest > half or (rest == half and (h & np.uint32(1)) != 0):
        h += np.uint32(1)
    return np.uint16(sign | h)


@njit(cache=True)
def f16_bits_to_f32(h: np.uint16) -> np.float32:
    """Exact float32 value of an f16 bit pattern (every f16 is representable in float32).

    Branch-free because every quant block pays for one or two of these in the dot kernels: the
    exponent and mantissa bits shifted into float32 position read as 2**-112 times the value
    (subnormal halves become float32 subnormals with the same property), so one exact
    multiplication by 2**112 rebiases them; only inf/NaN (exponent 31) need their exponent forced.
    """
    hb = np.uint32(h)
    sign = (hb & np.uint32(0x8000)) << np.uint32(16)
    body = (hb & np.uint32(0x7FFF)) << np.uint32(13)
    value = _u32_as_f32(body) * _TWO_POW_112
    bits = _f32_as_u32(value)
    if body >= np.uint32(0x0F800000):
        bits = body | np.uint32(0x7F800000)
    return _u32_as_f32(bits | sign)


@njit(cache=True)
def f32_to_bf16_bits(x: np.float32) -> np.uint16:
    """Round a float32 to bfloat16 like ggml: nearest even, NaN kept as a quiet NaN."""
    bits = _f32_as_u32(np.float32(x))
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((bits >> np.uint32(16)) | np.uint32(64))
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((bits + rounding) >> np.uint32(16))


@njit(cache=True)
def bf16_bits_to_f32(h: np.uint16) -> np.float32:
    """Exact float32 value of a bfloat16 bit pattern (its upper 16 bits)."""
    return _u32_as_f32(np.uint32(h) << np.uint32(16))
