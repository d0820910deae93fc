"""Half-precision conversions and the legacy / float quant formats against independent oracles.

Oracles: numpy's float16 cast (IEEE round-to-nearest-even) for f16, ggml's bf16 rounding rule
written in vectorized numpy for bf16, and `gguf.quants` (dequantize, and quantize for the types it
supports) for the block formats.
"""

from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from peer import ggml_quantize, requires_peer

from qwenlite import quant
from qwenlite.errors import QwenliteError
from qwenlite.quant.activation import quantize_q8_0, quantize_q8_k, quantize_rows_q8_0, quantize_rows_q8_k
from qwenlite.quant.halfprec import bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits


@pytest.fixture(scope="module")
def real_model_reader(real_model_path: Path) -> GGUFReader:
    """gguf's own reader on the real 0.5B model (conftest's ``real_model_path``: pulled once)."""
    return GGUFReader(real_model_path)


@numba.njit(cache=True)
def _to_f16(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_f16_bits(x[i])
    return out


@numba.njit(cache=True)
def _from_f16(h: np.ndarray) -> np.ndarray:
    out = np.empty(h.size, np.float32)
    for i in range(h.size):
        out[i] = f16_bits_to_f32(h[i])
    return out


@numba.njit(cache=True)
def _to_bf16(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = f32_to_bf16_bits(x[i])
    return out


@numba.njit(cache=True)
def _from_bf16(h: np.ndarray) -> np.ndarray:
    out = np.empty(h.size, np.float32)
    for i in range(h.size):
        out[i] = bf16_bits_to_f32(h[i])
    return out


def _edge_f32() -> np.ndarray:
    """Values where f16 rounding goes wrong in ports: ties, range ends, subnormal boundaries."""
    special = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.99, 65520.0, 65536.0, 1e30, np.inf, -np.inf,
               2.0**-14, 2.0**-24, 2.0**-25, 1.5 * 2.0**-25, 2.0**-26, 3 * 2.0**-25, 1e-45,
               np.finfo(np.float32).max, np.finfo(np.float32).tiny]
    x = np.array(special, np.float32)
    # Every f16 value and the exact midpoints between neighbours, plus one ulp around them.
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    around = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(1e9))])
    x = np.concatenate([x, h, around])
    return np.concatenate([x, -x])


def test_f16_to_f32_all_patterns() -> None:
    h = np.arange(65536, dtype=np.uint16)
    got = _from_f16(h)
    want = h.view(np.float16).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_f32_to_f16_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    random_bits = rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    # Dense coverage of the f32 range that maps to finite, subnormal and overflowing f16.
    dense_bits = rng.integers(0x32000000, 0x48000000, size=2_000_000, dtype=np.uint64).astype(np.uint32)
    dense_bits |= (rng.integers(0, 2, size=dense_bits.size) << 31).astype(np.uint32)
    x = np.concatenate([random_bits.view(np.float32), dense_bits.view(np.float32), _edge_f32()])
    x = x[~np.isnan(x)]
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(_to_f16(x), want)


def test_f32_to_f16_nan_is_ggml_canonical() -> None:
    # ggml_compute_fp32_to_fp16 returns sign | 0x7E00 for every NaN, whatever the payload.
    nans = np.array([0x7FC00000, 0x7F800001, 0xFFFFFFFF, 0xFF812345, 0x7FBFFFFF], np.uint32).view(np.float32)
    assert _to_f16(nans).tolist() == [0x7E00, 0x7E00, 0xFE00, 0xFE00, 0x7E00]


def _bf16_oracle(x: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16 in vectorized numpy."""
    u = x.view(np.uint32).astype(np.uint64)
    is_nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(is_nan, (u >> 16) | 64, rounded).astype(np.uint16)


def test_bf16_roundtrip_and_rounding() -> None:
    h = np.arange(65536, dtype=np.uint16)
    want = (h.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(_from_bf16(h).view(np.uint32), want.view(np.uint32))
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.integers(0, 2**32, size=2_000_000, dtype=np.uint64).astype(np.uint32)
                        .view(np.float32), _edge_f32()])
    assert np.array_equal(_to_bf16(x), _bf16_oracle(x))
    # Known answers: a tie rounds to even, the largest float rounds to inf, NaN stays quiet.
    known = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800001], np.uint32).view(np.float32)
    assert _to_bf16(known).tolist() == [0x3F80, 0x3F82, 0x7F80, 0x7FC0]


@pytest.mark.parametrize("bits", [0x3C00, 0x0001, 0x8400, 0x7BFF])
def test_f16_known_answers(bits: int) -> None:
    value = {0x3C00: 1.0, 0x0001: 2.0**-24, 0x8400: -(2.0**-14), 0x7BFF: 65504.0}[bits]
    assert _from_f16(np.array([bits], np.uint16))[0] == value
    assert _to_f16(np.array([value], np.float32))[0] == bits


# --------------------------------------------------------------------------------------------------
# Block formats F32 / F16 / BF16 / Q8_0 / Q4_0 / Q5_0 / Q5_1


LEGACY = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1]


def _raw_gguf(qtype: T, x: np.ndarray) -> np.ndarray:
    """gguf's quantizer output as uint8 rows (F16/BF16 come back as 16-bit arrays)."""
    return np.ascontiguousarray(gguf_quantize(x, qtype)).view(np.uint8).reshape(x.shape[0], -1)


def _hard_rows(n: int, seed: int) -> np.ndarray:
    """Rows that exercise every branch of the reference quantizers.

    Gaussian rows with outliers, plus blocks of zeros, constants, negative maxima, exact ties
    (x/d landing on .5), values near f16 overflow and underflow, and duplicated |max| of both signs.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, n)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] *= 10.0
    x[0] = 0.0
    x[1] = 1.0
    x[2] = -3.0
    x[3] = (rng.integers(-64, 65, n) / 8.0).astype(np.float32)  # many exact ties
    x[4] = (rng.integers(-16, 17, n)).astype(np.float32)
    x[5] *= np.float32(6e4)  # scales near the f16 range end
    x[6] *= np.float32(1e-6)  # f16-subnormal scales
    x[7] *= np.float32(1e-30)  # scales that flush to zero in f16
    x[8, ::32] = 5.0
    x[8, 1::32] = -5.0  # |max| tie between signs: the first one wins
    x[9, ::2] = 0.0
    x[10] = np.abs(x[10])
    x[11] = -np.abs(x[11])
    return x


@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_matches_gguf_bytes(qtype: T) -> None:
    # gguf.quants is bit-exact with ggml's reference quantizers for these types (checked against
    # libggml itself in test_quantize_matches_ggml_bytes and tests/test_peer_smoke.py).
    for n, seed in ((32, 1), (288, 2), (1024, 3)):
        x = _hard_rows(n, seed)
        with np.errstate(over="ignore"):
            want = _raw_gguf(qtype, x)
        got = quant.quantize(x, qtype)
        assert got.shape == want.shape
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, f"{qtype.name}: rows {bad.tolist()} differ from gguf"


@pytest.mark.parametrize("qtype", LEGACY)
def test_dequantize_random_blocks_bitwise(qtype: T) -> None:
    """Random bytes (every nibble / bit pattern) with finite f16 scales, decoded like gguf."""
    rng = np.random.default_rng(int(qtype))
    fmt = quant.FORMATS[qtype]
    n = 32 * 40
    raw = rng.integers(0, 256, size=(16, n // fmt.BLOCK_SIZE * fmt.TYPE_SIZE), dtype=np.uint8)
    if qtype == T.F32:
        raw = rng.standard_normal((16, n)).astype(np.float32).view(np.uint8)
    elif qtype in (T.F16, T.BF16):
        halves = raw.view(np.uint16)
        exp_bits = 0x7C00 if qtype == T.F16 else 0x7F80
        halves[(halves & exp_bits) == exp_bits] &= np.uint16(0xBFFF)  # no inf/NaN
    else:
        blocks = raw.reshape(16, -1, fmt.TYPE_SIZE)
        n_halves = 2 if qtype == T.Q5_1 else 1
        for k in range(n_halves):
            blocks[..., 2 * k + 1] &= 0x7B  # f16 exponent < 31: finite scales, subnormals included
    got = quant.dequantize(raw, qtype, n)
    want = gguf_dequantize(raw, qtype).reshape(16, n)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(
    ("name", "qtype"),
    [("output.weight", T.Q8_0), ("blk.0.attn_v.weight", T.Q8_0), ("token_embd.weight", T.Q5_0),
     ("blk.0.ffn_up.weight", T.Q5_0), ("output_norm.weight", T.F32)],
)
def test_dequantize_real_model_tensors(real_model_reader: GGUFReader, name: str, qtype: T) -> None:
    t = next(t for t in real_model_reader.tensors if t.name == name)
    assert t.tensor_type == qtype
    n = int(t.shape[0])
    raw = np.asarray(t.data).view(np.uint8).reshape(-1, quant.row_nbytes(qtype, n))[:3000]
    got = quant.dequantize(raw, qtype, n)
    want = gguf_dequantize(raw, qtype)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    # And our quantizer reproduces the file's bytes from its own dequantized values where the
    # format is a fixed point of quantize(dequantize(.)): Q8_0 rows re-quantize to themselves.
    if qtype == T.Q8_0:
        again = quant.quantize(got, qtype)
        assert (again == raw).all(axis=1).mean() > 0.99


def test_known_answers() -> None:
    ones = np.ones((1, 32), np.float32)
    # Q8_0: d = 1/127 -> f16 0x2008, q = 127.
    assert quant.quantize(ones, T.Q8_0)[0].tolist() == [0x08, 0x20] + [127] * 32
    # Q4_0: the max (-1) maps to -8: d = 0.125 (0x3000), every q = 0.
    assert quant.quantize(-ones, T.Q4_0)[0].tolist() == [0x00, 0x30] + [0] * 16
    # Q5_1 on 0..31: d = 1 (0x3C00), m = 0, q_j = j, fifth bits set for values 16..31.
    ramp = np.arange(32, dtype=np.float32)[None, :]
    raw = quant.quantize(ramp, T.Q5_1)[0]
    assert raw[:8].tolist() == [0x00, 0x3C, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF]
    assert raw[8:].tolist() == [j | (j << 4) for j in range(16)]
    assert quant.dequantize(raw, T.Q5_1, 32).tolist() == ramp[0].tolist()
    # Q5_0 on a block whose max is +16: d = -1, q = 16 - x.
    x = np.arange(-15, 17, dtype=np.float32)[None, :]
    raw = quant.quantize(x, T.Q5_0)[0]
    assert raw[:2].tolist() == [0x00, 0xBC]
    assert quant.dequantize(raw, T.Q5_0, 32).tolist() == x[0].tolist()
    # All-zero blocks keep ggml's negative-zero scale for the max/-8 and max/-16 formats.
    zeros = np.zeros((1, 32), np.float32)
    assert quant.quantize(zeros, T.Q4_0)[0, :2].tolist() == [0x00, 0x80]
    assert quant.quantize(zeros, T.Q8_0)[0, :2].tolist() == [0x00, 0x00]
    # BF16 / F16 of 1.0, and F32 is the identity.
    assert quant.quantize(ones[:, :1], T.BF16)[0].tolist() == [0x80, 0x3F]
    assert quant.quantize(ones[:, :1], T.F16)[0].tolist() == [0x00, 0x3C]
    assert quant.quantize(ones[:, :1], T.F32)[0].tolist() == [0x00, 0x00, 0x80, 0x3F]


@pytest.mark.peer
@requires_peer
@pytest.mark.parametrize("qtype", LEGACY)
def test_quantize_matches_ggml_bytes(qtype: T) -> None:
    """The primary oracle: ggml_quantize_chunk from llama.cpp's libggml, byte for byte."""
    for n, seed in ((32, 4), (288, 5), (4096, 6)):
        x = _hard_rows(n, seed)
        if qtype in (T.F16, T.BF16):
            x[12, :4] = [np.nan, -np.nan, np.inf, -np.inf]  # NaN rounding follows ggml, not numpy
        want = np.frombuffer(ggml_quantize(qtype, x), np.uint8).reshape(x.shape[0], -1)
        got = quant.quantize(x, qtype)
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, f"{qtype.name}: rows {bad.tolist()} differ from ggml"


# --------------------------------------------------------------------------------------------------
# Registry


def test_registry_covers_formats() -> None:
    assert set(quant.FORMATS) == {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K}
    for qtype, fmt in quant.FORMATS.items():
        assert qtype == fmt.TYPE
        assert fmt.ACT in ("q8_0", "q8_k", "f32")
        assert quant.row_nbytes(qtype, 256 * 7) == 256 * 7 // fmt.BLOCK_SIZE * fmt.TYPE_SIZE
        bs, ts = GGML_QUANT_SIZES[qtype]
        assert (bs, ts) == (fmt.BLOCK_SIZE, fmt.TYPE_SIZE)


def test_registry_errors() -> None:
    with pytest.raises(QwenliteError, match="IQ2_XXS"):
        quant.row_nbytes(T.IQ2_XXS, 256)
    with pytest.raises(QwenliteError, match="unknown type id 1234"):
        quant.row_nbytes(1234, 256)
    with pytest.raises(QwenliteError, match="multiple of 32"):
        quant.row_nbytes(T.Q8_0, 100)
    with pytest.raises(QwenliteError, match="multiple of 256"):
        quant.quantize(np.zeros((2, 288), np.float32), T.Q4_K)
    with pytest.raises(QwenliteError, match=r"uint8 \[\.\.\., 34\]"):
        quant.dequantize(np.zeros((2, 33), np.uint8), T.Q8_0, 32)
    with pytest.raises(QwenliteError):
        quant.quantize(np.zeros((2, 32), np.int32), T.Q8_0)


def test_registry_shapes() -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    raw = quant.quantize(x, T.Q8_0)
    assert raw.shape == (2, 3, 68)
    back = quant.dequantize(raw, T.Q8_0, 64)
    assert back.shape == (2, 3, 64)
    assert np.array_equal(back, gguf_dequantize(raw.reshape(6, 68), T.Q8_0).reshape(2, 3, 64))
    assert quant.dequantize(np.zeros((0, 34), np.uint8), T.Q8_0, 32).shape == (0, 32)
    assert quant.quantize(x[0, 0], T.F16).shape == (128,)


# --------------------------------------------------------------------------------------------------
# Activation quantizers


def test_activation_q8_0_matches_ggml_reference() -> None:
    """aq and the f16-rounded scale must equal the bytes of ggml's quantize_row_q8_0_ref (via gguf)."""
    x = _hard_rows(288, 7)[:7]  # rows with f16-representable block scales
    aq, ad, asum = quantize_rows_q8_0(x)
    ref = _raw_gguf(T.Q8_0, x).reshape(x.shape[0], -1, 34)
    assert np.array_equal(aq.view(np.uint8).reshape(x.shape[0], -1, 32), ref[..., 2:])
    d16 = ad.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1, 2)
    assert np.array_equal(d16, ref[..., :2])
    amax = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2)
    assert np.array_equal(ad, amax / np.float32(127))
    assert np.array_equal(asum, aq.reshape(x.shape[0], -1, 32).astype(np.int32).sum(axis=2))


def test_activation_q8_k_semantics() -> None:
    """quantize_row_q8_K_ref re-derived in vectorized numpy: iscale = -127/max (signed max)."""
    x = _hard_rows(768, 8)
    aq, ad, asum = quantize_rows_q8_k(x)
    blocks = x.reshape(x.shape[0], -1, 256)
    idx = np.abs(blocks).argmax(axis=2)[..., None]
    mx = np.take_along_axis(blocks, idx, axis=2)
    with np.errstate(divide="ignore"):
        iscale = np.where(mx == 0, np.float32(0), np.float32(-127.0) / mx).astype(np.float32)
    q = np.minimum(127, np.rint(iscale * blocks)).astype(np.int8)  # rint: ties to even like nearest_int
    assert np.array_equal(aq.reshape(blocks.shape), q)
    with np.errstate(divide="ignore"):
        want_d = np.where(mx == 0, np.float32(0), np.float32(1) / iscale).astype(np.float32)[..., 0]
    assert np.array_equal(ad, want_d)
    assert np.array_equal(asum, aq.reshape(x.shape[0], -1, 16).astype(np.int32).sum(axis=2))
    assert (ad[0] == 0).all() and (aq[0] == 0).all() and (asum[0] == 0).all()


def test_activation_rejects_bad_lengths() -> None:
    with pytest.raises(QwenliteError, match="multiple of 32"):
        quantize_q8_0(np.zeros(40, np.float32), np.zeros(40, np.int8), np.zeros(2, np.float32), np.zeros(2, np.int32))
    with pytest.raises(QwenliteError, match="multiple of 256"):
        quantize_q8_k(np.zeros(96, np.float32), np.zeros(96, np.int8), np.zeros(1, np.float32), np.zeros(6, np.int32))
