"""Half-precision conversions and the legacy / float quant formats against independent oracles.

Oracles: numpy's float16 cast (IEEE round-to-nearest-even) for f16, ggml's bf16 rounding rule
written in vectorized numpy for bf16, and `gguf.quants` (dequantize, and quantize for the types it
supports) for the block formats.
"""

import numba
import numpy as np
import pytest

from qwenlite.quant.halfprec import bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits


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
