"""The SIMD building blocks of the integer dot kernels, on every code path the host can run.

* ``lane_dots``: each instruction-set path (VNNI, AVX2, portable) against numpy, lane by lane,
  at the extremes of its documented input range.
* ``f16_to_f32`` against numpy's float16 cast for all 65536 bit patterns.
* ``dot_rows``: the multi-token row dots (prefill) give bit for bit what the one-token dot gives
  (decode), for every integer format, with odd block counts (the unrolled loop's tail).
* Legacy block dots at extreme integers (-128 activations, -128 Q8_0 weights) against a float64
  sum of gguf-dequantized weights.
"""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from qwenlite import quant
from qwenlite.quant import q4_0, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from qwenlite.quant.activation import quantize_rows_q8_0, quantize_rows_q8_k

_FEATURES = q8_0.target_features()
_ISAS = ["generic"] + (["avx2"] if "avx2" in _FEATURES else []) + (
    ["vnni"] if q8_0.simd_isa(_FEATURES) == "vnni" else []
)
_INT_FORMATS = {T.Q4_0: q4_0, T.Q5_0: q5_0, T.Q5_1: q5_1, T.Q8_0: q8_0, T.Q4_K: q4_k, T.Q5_K: q5_k, T.Q6_K: q6_k}


def _store(context, builder, aryty, ary, vec):
    data = context.make_array(aryty)(context, builder, ary).data
    builder.store(vec, builder.bitcast(data, vec.type.as_pointer()), align=1)


def _lane_dots_kernel(isa: str, signed: bool):
    @intrinsic
    def lanes(typingctx, w, a, out):  # noqa: ARG001
        def codegen(context, builder, sig, args):
            zero = context.get_constant(types.intp, 0)
            v32 = ir.VectorType(ir.IntType(8), 32)
            wv = q8_0.load_at(context, builder, sig.args[0], args[0], zero, v32)
            av = q8_0.load_at(context, builder, sig.args[1], args[1], zero, v32)
            acc = ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(8)))
            result = q8_0.lane_dots(builder, wv, av, acc, isa=isa, signed=signed)
            _store(context, builder, sig.args[2], args[2], result)
            return context.get_dummy_value()

        return types.none(w, a, out), codegen

    @njit
    def run(w, a, out):
        lanes(w, a, out)

    return run


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("isa", _ISAS)
def test_lane_dots_every_path(isa: str, signed: bool) -> None:
    """Unsigned weights 0..127 with any activation; signed weights -128..127 with activations
    -127..127 (the documented ranges), extremes first."""
    run = _lane_dots_kernel(isa, signed)
    rng = np.random.default_rng(1)
    wdt = np.int8 if signed else np.uint8
    lo_w, lo_a = (-128, -127) if signed else (0, -128)
    cases = [(np.full(32, lo_w, wdt), np.full(32, lo_a, np.int8)), (np.full(32, 127, wdt), np.full(32, 127, np.int8)),
             (np.full(32, 127, wdt), np.full(32, lo_a, np.int8)), (np.full(32, lo_w, wdt), np.full(32, 127, np.int8))]
    for _ in range(50):
        cases.append((rng.integers(lo_w, 128, 32).astype(wdt), rng.integers(lo_a, 128, 32).astype(np.int8)))
    for w, a in cases:
        out = np.zeros(8, np.int32)
        run(w, a, out)
        want = (w.astype(np.int64) * a).reshape(8, 4).sum(axis=1) + np.arange(8)
        assert np.array_equal(out, want), isa


def _f16_kernel():
    @intrinsic
    def conv(typingctx, h, out):  # noqa: ARG001
        def codegen(context, builder, sig, args):
            zero = context.get_constant(types.intp, 0)
            bits = q8_0.load_at(context, builder, sig.args[0], args[0], zero, ir.IntType(16))
            _store(context, builder, sig.args[1], args[1], q8_0.f16_to_f32(builder, bits))
            return context.get_dummy_value()

        return types.none(h, out), codegen

    @njit
    def run(h, out):
        for i in range(h.shape[0]):
            conv(h[i:], out[i:])

    return run


def test_f16_to_f32_all_patterns() -> None:
    """Bit-exact against numpy for all 65536 patterns: signed zeros, subnormals, inf, NaN payloads."""
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    _f16_kernel()(h, out)
    assert np.array_equal(out.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def _activations(qtype: T, x: np.ndarray):
    return (quantize_rows_q8_k if quant.FORMATS[qtype].ACT == "q8_k" else quantize_rows_q8_0)(x)


@pytest.mark.parametrize("qtype", list(_INT_FORMATS), ids=lambda t: t.name)
def test_dot_rows_four_tokens_equal_one(qtype: T) -> None:
    mod = _INT_FORMATS[qtype]
    rng = np.random.default_rng(int(qtype))
    k = mod.BLOCK_SIZE * 5  # odd block count: the loop's tail
    raw = quant.quantize(rng.standard_normal((3, k)).astype(np.float32), qtype)
    aq, ad, asum = _activations(qtype, rng.standard_normal((4, k)).astype(np.float32))
    dot_rows = mod.dot_rows

    @njit
    def four(w):
        return dot_rows(w, (aq[0], aq[1], aq[2], aq[3]), (ad[0], ad[1], ad[2], ad[3]),
                        (asum[0], asum[1], asum[2], asum[3]), k // mod.BLOCK_SIZE)

    for r in range(3):
        got = np.array(four(raw[r]), np.float32)
        one = np.array([mod.dot_row(raw[r], aq[t], ad[t], asum[t]) for t in range(4)], np.float32)
        assert np.array_equal(got, one)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_legacy_dot_row_extreme_integers(qtype: T) -> None:
    """Largest weights (and Q8_0's -128) against -127/127 activations (the activation quantizers'
    range): no overflow, no saturation."""
    mod = _INT_FORMATS[qtype]
    nb = 7
    rng = np.random.default_rng(9)
    raw = quant.quantize(rng.standard_normal((1, 32 * nb)).astype(np.float32), qtype)[0].reshape(nb, -1)
    one = np.array([np.float16(1.0)]).view(np.uint8)
    raw[:, 0:2] = one  # d = 1
    if qtype == T.Q8_0:
        raw[:, 2:] = rng.choice(np.array([0x80, 0x7F, 0x81], np.uint8), size=(nb, 32))
    else:
        raw[:, 2 + (2 if qtype == T.Q5_1 else 0):] = 0xFF  # every value at its maximum
        if qtype == T.Q5_1:
            raw[:, 2:4] = np.array([np.float16(-3.0)]).view(np.uint8)
    raw = raw.reshape(-1)
    aq = np.where(rng.random(32 * nb) < 0.5, -127, 127).astype(np.int8)
    ad = np.full(nb, 1.0, np.float32)
    asum = aq.reshape(nb, 32).astype(np.int32).sum(axis=1).astype(np.int32)
    want = float(gguf_dequantize(raw, qtype).astype(np.float64) @ aq.astype(np.float64))
    assert float(mod.dot_row(raw, aq, ad, asum)) == pytest.approx(want, rel=1e-6)
