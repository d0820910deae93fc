"""kernels.matmul against float64 references built from gguf-dequantized weights.

Two references per case:

* exact: the weights as gguf dequantizes them times the activations as our quantizer rounded them
  (``ad * aq``), in float64. The kernel computes the same sum with integer block products, so only
  float rounding separates them: relative 1e-5 of sum |w||x|.
* true: the same weights times the float activations. The gap is the activation quantization
  error, bounded by sum_j |w_j| * d_block(j) / 2 (each activation moves by at most half a step);
  the test asserts the kernel stays within that bound.

F32/F16/BF16 weights take float activations, so their tolerance is the tight 1e-5 relative one.
"""

from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from qwenlite import quant
from qwenlite.errors import QwenliteError
from qwenlite.kernels.matmul import matmul
from qwenlite.quant.activation import quantize_rows_q8_0, quantize_rows_q8_k

ALL = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]


@pytest.fixture(scope="module")
def real_model_reader(real_model_path: Path) -> GGUFReader:
    """gguf's own reader on the real 0.5B model (conftest's ``real_model_path``: pulled once)."""
    return GGUFReader(real_model_path)


def _activation_steps(x: np.ndarray, act: str) -> tuple[np.ndarray, np.ndarray]:
    """(x as the kernel sees it after quantization, per-value quantization step) for ``act``."""
    if act == "q8_0":
        aq, ad, _ = quantize_rows_q8_0(x)
        d = np.repeat(ad, 32, axis=1).astype(np.float64)
    elif act == "q8_k":
        aq, ad, _ = quantize_rows_q8_k(x)  # d is negative when the block's extreme value is positive
        d = np.repeat(ad, 256, axis=1).astype(np.float64)
    else:
        return x.astype(np.float64), np.zeros_like(x, dtype=np.float64)
    return aq.astype(np.float64) * d, np.abs(d)


def _check(raw: np.ndarray, qtype: T, x: np.ndarray, got: np.ndarray) -> None:
    n_out = raw.shape[0]
    w = gguf_dequantize(raw, qtype).reshape(n_out, -1).astype(np.float64)
    xq, step = _activation_steps(x, quant.FORMATS[qtype].ACT)
    scale = np.abs(xq) @ np.abs(w).T
    exact = xq @ w.T
    assert np.all(np.abs(got - exact) <= 1e-5 * scale + 1e-30), "differs from the quantized-activation sum"
    true = x.astype(np.float64) @ w.T
    bound = (step / 2) @ np.abs(w).T
    assert np.all(np.abs(got - true) <= bound * (1 + 1e-4) + 1e-5 * scale + 1e-30)


def _weights(rng: np.random.Generator, n_out: int, k: int) -> np.ndarray:
    w = rng.standard_normal((n_out, k)).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 6.0
    return w


@pytest.mark.parametrize("qtype", ALL)
@pytest.mark.parametrize("t", [1, 3, 17])
def test_matmul_random(qtype: T, t: int) -> None:
    rng = np.random.default_rng(100 * int(qtype) + t)
    k = 768 if quant.FORMATS[qtype].BLOCK_SIZE == 256 else 288
    n_out = 37
    raw = quant.quantize(_weights(rng, n_out, k), qtype)
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, 5] = 9.0  # an outlier activation, as real hidden states have
    got = matmul(raw, qtype, x)
    assert got.shape == (t, n_out) and got.dtype == np.float32
    _check(raw, qtype, x, got)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F16])
def test_matmul_prefill_tiles_and_threads(qtype: T) -> None:
    """Many tokens and rows (several row chunks and token tiles): same bits for any thread count."""
    rng = np.random.default_rng(7)
    k = 512
    raw = quant.quantize(_weights(rng, 83, k), qtype)
    x = rng.standard_normal((70, k)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = matmul(raw, qtype, x)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = matmul(raw, qtype, x)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(one, two)
    _check(raw, qtype, x, one)
    # Each row of a prefill equals the decode of that token alone.
    assert np.array_equal(one[41], matmul(raw, qtype, x[41]))


@pytest.mark.parametrize(
    ("name", "qtype", "rows"),
    [("blk.11.ffn_down.weight", T.Q4_K, None), ("blk.0.ffn_down.weight", T.Q6_K, None),
     ("blk.0.attn_q.weight", T.Q5_0, None), ("blk.0.attn_v.weight", T.Q8_0, None),
     ("output.weight", T.Q8_0, 3000)],
)
def test_matmul_real_tensors(real_model_reader: GGUFReader, name: str, qtype: T, rows: int | None) -> None:
    t = next(t for t in real_model_reader.tensors if t.name == name)
    assert t.tensor_type == qtype
    k, n_out = int(t.shape[0]), int(t.shape[1])
    raw = np.asarray(t.data).reshape(n_out, -1)  # read-only memmap view, as the loader passes it
    assert not raw.flags.writeable
    if rows is not None:
        raw = raw[:rows]
    x = np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)
    got = matmul(raw, qtype, x)
    _check(np.asarray(raw), qtype, x, got)


def test_matmul_out_and_vector() -> None:
    rng = np.random.default_rng(5)
    raw = quant.quantize(_weights(rng, 10, 64), T.Q8_0)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    out = np.full((2, 10), np.nan, np.float32)
    assert matmul(raw, T.Q8_0, x, out=out) is out
    assert np.array_equal(out, matmul(raw, T.Q8_0, x))
    assert matmul(raw, T.Q8_0, x[1]).shape == (10,)
    assert matmul(raw, T.Q8_0, np.zeros((0, 64), np.float32)).shape == (0, 10)
    assert np.array_equal(matmul(raw, T.Q8_0, x.astype(np.float64)), out)


def test_matmul_errors() -> None:
    raw = quant.quantize(np.ones((4, 64), np.float32), T.Q8_0)
    x = np.ones((2, 64), np.float32)
    with pytest.raises(QwenliteError, match="IQ2_XXS"):
        matmul(raw, T.IQ2_XXS, x)
    with pytest.raises(QwenliteError, match="multiple of 32"):
        matmul(raw, T.Q8_0, np.ones((2, 60), np.float32))
    with pytest.raises(QwenliteError, match=r"uint8 \[N, 68\]"):
        matmul(raw[:, :60], T.Q8_0, x)
    with pytest.raises(QwenliteError, match=r"K=96 must be uint8 \[N, 102\]"):
        matmul(raw, T.Q8_0, np.ones((2, 96), np.float32))
    with pytest.raises(QwenliteError, match="activations"):
        matmul(raw, T.Q8_0, np.ones((1, 2, 64), np.float32))
    with pytest.raises(QwenliteError, match="out must be"):
        matmul(raw, T.Q8_0, x, out=np.empty((2, 5), np.float32))
    with pytest.raises(QwenliteError, match="multiple of 256"):
        matmul(quant.quantize(np.ones((4, 256), np.float32), T.Q4_K), T.Q4_K, np.ones((1, 288), np.float32))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q6_K, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("interleaved", [False, True])
def test_matmul_experts_equals_matmul_per_expert(qtype: T, interleaved: bool) -> None:
    """One grouped call over segments (including an empty one and a repeated expert) gives exactly
    what a matmul per segment gives."""
    from qwenlite.kernels.matmul import X8_TYPES, matmul_experts

    if interleaved and int(qtype) not in X8_TYPES:
        pytest.skip("no interleaved kernel")
    rng = np.random.default_rng(int(qtype))
    n_exp, n, k = 5, 40, 512
    raw = quant.quantize(rng.standard_normal((n_exp * n, k)).astype(np.float32), int(qtype)).reshape(n_exp, n, -1)
    ws = quant.interleave_rows(raw, int(qtype)) if interleaved else raw
    x = rng.standard_normal((9, k)).astype(np.float32)
    starts, experts = np.array([0, 1, 1, 5, 9]), np.array([3, 0, 4, 3])
    got = matmul_experts(ws, int(qtype), x, starts, experts, interleaved=interleaved)
    exact = qtype != T.Q5_0 or not interleaved  # 32-value x8 kernels sum in another float64 order
    for j, e in enumerate(experts):
        ref = matmul(raw[e], int(qtype), x[starts[j] : starts[j + 1]])
        seg = got[starts[j] : starts[j + 1]]
        assert seg.shape == ref.shape
        if exact:
            np.testing.assert_array_equal(seg, ref)
        elif ref.size:
            np.testing.assert_allclose(seg, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_matmul_experts_checks_its_segments() -> None:
    from qwenlite.kernels.matmul import matmul_experts

    ws = np.zeros((2, 8, 144), np.uint8)
    x = np.zeros((3, 256), np.float32)
    with pytest.raises(QwenliteError, match="rise from 0"):
        matmul_experts(ws, int(T.Q4_K), x, np.array([0, 2]), np.array([1]))
    with pytest.raises(QwenliteError, match="expert ids"):
        matmul_experts(ws, int(T.Q4_K), x, np.array([0, 3]), np.array([2]))
    with pytest.raises(QwenliteError, match="3-D"):
        matmul_experts(ws[0], int(T.Q4_K), x, np.array([0, 3]), np.array([0]))
